"""A real pair: SmolLM2-135M against a copy fine-tuned briefly on Python source (`mine finetune`, last two
blocks only), diffed over a corpus of code and prose documents: B's log-prob gains fall on code, and the
weight diff finds exactly the layers that trained."""

import pytest

from mining.cli import main
from mining.corpus import iter_documents
from mining.query import connect, run_named
from mining.spec import CorpusSpec

pytestmark = [pytest.mark.slow, pytest.mark.ray]

JOB = """
name: finetune-diff
models: {a: {id: smollm2-135m}, b: {id: 'FT'}}
corpus: {source: "files:CORPUS/*.txt", max_tokens: 1536, context_length: 128}
hooks: ["blocks.29.mlp.hook_post"]
stats: {top_k: 4}
compute: {actors: 2, batch_size: 4, shard_tokens: 768}
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    assert main(["finetune", "--out", str(root / "ft"), "--steps", "8", "--lr", "3e-4", "--layers", "28,29"]) == 0
    corpus = root / "corpus"
    corpus.mkdir()
    code = [d for d in iter_documents(CorpusSpec(source="builtin:python-stdlib")) if len(d.text) > 3000][40:44]
    prose = [d for d in iter_documents(CorpusSpec(source="builtin:python-docs")) if len(d.text) > 3000][:4]
    for i, (c, p) in enumerate(zip(code, prose)):  # interleaved, so both kinds are mined within max_tokens
        (corpus / f"{2 * i:02d}-code.txt").write_text(c.text[:1200])
        (corpus / f"{2 * i + 1:02d}-prose.txt").write_text(p.text[:1200])
    job = root / "job.yaml"
    job.write_text(JOB.replace("FT", str(root / "ft")).replace("CORPUS", str(corpus)))
    assert main(["run", str(job), "--store", str(root / "store"), "--no-progress"]) == 0
    return root / "store"


def test_gains_fall_on_code(store):
    con = connect(store)
    docs = run_named(con, "doc-diff", {}).to_pylist()
    code = [d["mean_gain"] for d in docs if d["path"].endswith("code.txt")]
    prose = [d["mean_gain"] for d in docs if d["path"].endswith("prose.txt")]
    assert code and prose
    print("mean gain per token: code", [round(g, 3) for g in code], "prose", [round(g, 3) for g in prose])
    assert sum(code) / len(code) > sum(prose) / len(prose) + 0.02
    top = run_named(con, "token-gains", {"k": "20"}).to_pylist()
    paths = dict(con.sql("SELECT doc_id, path FROM docs").fetchall())
    assert sum(paths[t["doc_id"]].endswith("code.txt") for t in top) >= 14


def test_weight_diff_finds_the_trained_layers(store):
    con = connect(store)
    params = run_named(con, "weight-changes", {"what": "param", "limit": "1000"}).to_pylist()
    changed = {p["layer"] for p in params if p["change"] > 0}
    assert changed == {28, 29}
    neurons = run_named(con, "weight-changes", {"what": "neuron", "limit": "50"}).to_pylist()
    assert {n["layer"] for n in neurons} <= {28, 29}


def test_the_copy_keeps_the_sources_kv_cache_setting(store):
    """load_model turns the KV cache off for mining; the copy a user may generate from keeps the source's setting."""
    import json

    from mining.models import load_config
    from mining.spec import ModelSpec

    saved = json.loads((store.parent / "ft" / "config.json").read_text())
    assert saved["use_cache"] is load_config(ModelSpec(id="smollm2-135m")).use_cache is True
