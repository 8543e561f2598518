"""`model.quantize`: weights rounded through llama.cpp's formats (gguf's quantizer), checked against a brute-force
q8_0 written here, on tiny models of each weight layout, on SmolLM2's own Q4_1 GGUF, and in a diff job."""

import numpy as np
import pytest
import torch
import yaml

from mining.errors import UserError
from mining.quantize import FORMATS, quantize_weights, weight_matrices
from mining.spec import ModelSpec, spec_from_dict
from mining.tiny import tiny_model


def q8_0_brute(rows: np.ndarray) -> np.ndarray:
    """ggml's q8_0, one block of 32 along a row at a time: scale max|x|/127 kept as float16, values rounded half away
    from zero."""
    out = np.empty_like(rows)
    for r in range(rows.shape[0]):
        for b in range(0, rows.shape[1], 32):
            x = rows[r, b:b + 32].astype(np.float32)
            d = np.float32(np.abs(x).max() / np.float32(127))
            inv = np.float32(1) / d if d else np.float32(0)
            v = x * inv
            q = np.sign(v) * np.floor(np.abs(v) + np.float32(0.5))
            out[r, b:b + 32] = np.float32(np.float16(d)) * q
    return out


def originals(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_q8_0_matches_brute_force_along_each_weights_rows(arch):
    """Blocks run along the input features: a Linear's rows, a GPT-2 Conv1D's columns, an embedding's rows."""
    model = tiny_model(arch, vocab_size=96)
    before = originals(model)
    matrices = {name for name, _, _ in weight_matrices(model)}
    used = quantize_weights(model, "q8_0")
    assert used == {"q8_0": len(matrices)}
    for name, p in model.named_parameters():
        old = before[name]
        if name not in matrices:
            assert torch.equal(p, old), name  # norms, biases, position tables stay
            continue
        conv1d = arch == "gpt2" and old.ndim == 2 and "wte" not in name and "wpe" not in name
        rows = (old.T if conv1d else old).numpy()
        expected = torch.from_numpy(q8_0_brute(rows))
        got = p.detach().T if conv1d else p.detach()
        assert torch.equal(got, expected), name
        assert not torch.equal(p, old), name


def test_tied_embeddings_are_quantized_once():
    model = tiny_model("llama", vocab_size=96, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    old = model.lm_head.weight.detach().clone()
    quantize_weights(model, "q4_0")
    names = [name for name, _, _ in weight_matrices(model)]
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    # once: a second round trip of a q4_0 grid is (almost everywhere) the identity, so compare with one pass
    from mining.quantize import round_trip

    once, _ = round_trip(old.numpy(), "q4_0")
    assert torch.equal(model.lm_head.weight.detach(), torch.from_numpy(once))


def test_rows_that_are_not_whole_blocks_stay_float16():
    """An MLP 48 wide: down_proj's rows (48) are not whole 32-blocks, so it is kept in float16, as llama.cpp does."""
    model = tiny_model("llama", vocab_size=96, intermediate_size=48)
    old = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    used = quantize_weights(model, "q4_0")
    assert used == {"q4_0": len(weight_matrices(model)) - 2, "f16": 2}
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, old.half().float())


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_rounds_and_loses_less_than_it_keeps(fmt):
    model = tiny_model("llama", vocab_size=96)
    w = model.model.layers[1].mlp.up_proj.weight
    old = w.detach().clone()
    quantize_weights(model, fmt)
    err = ((w - old).norm() / old.norm()).item()
    assert 0 < err < 0.2, (fmt, err)


def test_spec_errors_name_the_key():
    with pytest.raises(UserError, match=r"^model.quantize: expected one of q8_0.*got 'q4_k'.*\.gguf"):
        ModelSpec(id="x", quantize="q4_k")
    text = """
name: q
models: {a: {id: smollm2-135m}, b: {id: smollm2-135m, quantize: int3}}
corpus: {source: "builtin:python-docs"}
"""
    with pytest.raises(UserError, match=r"^models.b.quantize: expected one of"):
        spec_from_dict(yaml.safe_load(text))
    with pytest.raises(UserError, match=r"^models.a.dtype: expected float32"):
        spec_from_dict(yaml.safe_load(text.replace("{a: {id: smollm2-135m}", "{a: {id: smollm2-135m, dtype: float8}")))


# ---------------------------------------------------------------- real weights


@pytest.mark.slow
def test_smollm2_q4_1_gguf_requantized_to_q4_1_gives_its_own_weights_back():
    """The bundled GGUF stores 210 matrices as Q4_1 and token_embd as Q8_0: rounding the loaded model through q4_1
    gives back those 210 bit for bit and changes only the embedding; through q8_0, only the embedding stays. So the
    blocks line up with the file's, through transformers' GGUF loader (its Q/K row permutation included)."""
    from mining.models import load_model

    base = {n: w.detach().clone() for n, w, _ in weight_matrices(load_model(ModelSpec(id="smollm2-135m")).model)}
    assert len(base) == 211
    for fmt, same in [("q4_1", set(base) - {"model.embed_tokens.weight"}), ("q8_0", {"model.embed_tokens.weight"})]:
        model = load_model(ModelSpec(id="smollm2-135m", quantize=fmt)).model
        identical = {n for n, w, _ in weight_matrices(model) if torch.equal(w, base[n])}
        assert identical == same, fmt


DIFF_JOB = """
name: quantized-diff
models: {a: {id: smollm2-135m}, b: {id: smollm2-135m, quantize: q4_0}}
corpus: {source: "builtin:python-docs", max_tokens: 1024, context_length: 128}
hooks: ["blocks.29.mlp.hook_post"]
stats: {top_k: 4}
compute: {actors: 1, batch_size: 8}
"""


@pytest.mark.slow
@pytest.mark.ray
def test_a_diff_against_the_quantized_model_finds_the_loss_and_every_rounded_matrix(tmp_path):
    from mining.cli import main
    from mining.query import connect, run_named

    job = tmp_path / "job.yaml"
    job.write_text(DIFF_JOB)
    assert main(["run", str(job), "--store", str(tmp_path / "store"), "--no-progress"]) == 0
    con = connect(tmp_path / "store")
    mean_gain, n = con.sql("SELECT avg(diff), count(*) FROM token_diff").fetchall()[0]
    assert n == 1024 and mean_gain < -0.1  # re-rounding Q4_1 weights to Q4_0 costs about 0.3 nats a token
    changed = dict(con.sql("SELECT param, rel_norm FROM weight_diff").fetchall())
    rounded = {p for p, r in changed.items() if r > 0}
    assert len(rounded) == 211 and all(p.endswith("norm.weight") for p in set(changed) - rounded)
    assert all(0.05 < changed[p] < 0.2 for p in rounded)
    rows = run_named(con, "neuron-diff", {"order": "corr", "limit": "5"}).to_pylist()
    assert len(rows) == 5 and all(r["layer"] == 29 and r["corr"] < 0.9 for r in rows)
