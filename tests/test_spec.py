"""Job spec: valid files load into frozen dataclasses; every mistake names its key."""

import dataclasses

import pytest

from mining.errors import UserError
from mining.spec import load_spec

GOOD = """
name: t
model: {id: smollm2-135m}
corpus: {source: "builtin:python-docs", max_tokens: 1000, context_length: 64}
hooks: ["blocks.*.mlp.hook_post"]
stats: {top_k: 8}
compute: {actors: 2, batch_size: 4}
"""


def write(tmp_path, text):
    p = tmp_path / "job.yaml"
    p.write_text(text)
    return p


def test_loads_frozen_with_defaults(tmp_path):
    spec = load_spec(write(tmp_path, GOOD))
    assert spec.model.id == "smollm2-135m" and spec.model.dtype == "float32"
    assert spec.corpus.max_tokens == 1000 and spec.stats.top_k == 8 and spec.stats.histogram
    assert spec.compute.actors == 2 and spec.hooks == ("blocks.*.mlp.hook_post",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.corpus.max_tokens = 5


def test_overrides_are_validated_like_the_file(tmp_path):
    spec = load_spec(write(tmp_path, GOOD), ["corpus.max_tokens=500", "model.dtype=bfloat16", "model=gpt2"])
    assert spec.corpus.max_tokens == 500 and spec.model.id == "gpt2"
    spec = load_spec(write(tmp_path, GOOD), ["compute.actors=auto", "hooks=[blocks.1.mlp.hook_pre]"])
    assert spec.compute.actors == "auto" and spec.hooks == ("blocks.1.mlp.hook_pre",)
    with pytest.raises(UserError, match="corpus.max_tokens: expected an integer"):
        load_spec(write(tmp_path, GOOD), ["corpus.max_tokens=lots"])
    with pytest.raises(UserError, match="expected key=value"):
        load_spec(write(tmp_path, GOOD), ["corpus.max_tokens"])


def test_an_sae_override_keys_on_the_whole_hook_name(tmp_path):
    """The key under `saes` is a hook name with dots in it: `--set saes.blocks.3.hook_resid_post=DIR` names one SAE."""
    hook = "blocks.3.hook_resid_post"
    spec = load_spec(write(tmp_path, GOOD), [f"saes.{hook}=/sae/a", "saes.blocks.4.hook_mlp_out.source=b/c",
                                             "saes.blocks.4.hook_mlp_out.subfolder=layers.4.mlp",
                                             "saes.blocks.4.ln2.hook_normalized=/transcoder"])
    assert {k: (v.source, v.subfolder) for k, v in spec.saes.items()} == {
        hook: ("/sae/a", None), "blocks.4.hook_mlp_out": ("b/c", "layers.4.mlp"),
        "blocks.4.ln2.hook_normalized": ("/transcoder", None)}
    spec = load_spec(write(tmp_path, GOOD + f"saes: {{{hook}: org/sae}}\n"), [f"saes.{hook}.revision=v2"])
    assert (spec.saes[hook].source, spec.saes[hook].revision) == ("org/sae", "v2")  # a shorthand source kept
    with pytest.raises(UserError, match=f"saes.{hook}.layer: expected"):  # not a field: read as a hook name
        load_spec(write(tmp_path, GOOD), [f"saes.{hook}.layer=3"])


@pytest.mark.parametrize("text, key", [
    (GOOD + "bogus: 1\n", "bogus: unknown key"),
    (GOOD.replace("top_k: 8", "top_kk: 8"), "stats.top_kk: unknown key"),
    (GOOD.replace("max_tokens: 1000", "max_tokens: many"), "corpus.max_tokens: expected an integer"),
    (GOOD.replace("max_tokens: 1000", "max_tokens: 0"), "corpus.max_tokens: must be positive"),
    (GOOD.replace("batch_size: 4", "batch_size: 0"), "compute.batch_size: must be positive"),
    (GOOD.replace("batch_size: 4", "batch_size: big"), "compute.batch_size: expected 'auto' or a positive integer"),
    (GOOD.replace("batch_size: 4", "shard_tokens: lots"), "compute.shard_tokens: expected 'auto' or a positive integer"),
    (GOOD.replace("model: {id: smollm2-135m}\n", ""), "model: missing"),
    (GOOD.replace('corpus: {source: "builtin:python-docs", max_tokens: 1000, context_length: 64}\n', ""), "corpus: missing"),
    (GOOD.replace("builtin:python-docs", "ftp:x"), "corpus.source: expected"),
    (GOOD.replace("{id: smollm2-135m}", "{id: smollm2-135m, dtype: float8}"), "model.dtype"),
    (GOOD.replace("stats: {top_k: 8}", "stats: {head_ablation_tokens: 0}"), "stats.head_ablation_tokens: must be positive"),
    (GOOD.replace("stats: {top_k: 8}", "stats: {histogram: yes please}"), "stats.histogram: expected true or false"),
    (GOOD.replace("actors: 2", "actors: many"), "compute.actors"),
    ("name: [unclosed\n", "malformed YAML"),
    ("- a\n- b\n", "expected a mapping"),
])
def test_mistakes_name_the_key(tmp_path, text, key):
    with pytest.raises(UserError, match=key.replace("[", r"\[")):
        load_spec(write(tmp_path, text))


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="job spec not found"):
        load_spec(tmp_path / "nope.yaml")


def test_every_shipped_job_spec_is_valid():
    """jobs/*.yaml are what users launch first: each parses, validates and names models that resolve here."""
    from pathlib import Path

    from mining.runner import validate

    jobs = sorted((Path(__file__).parent.parent / "jobs").glob("*.yaml"))
    assert len(jobs) >= 2
    for path in jobs:
        spec = load_spec(path)
        validate(spec)
