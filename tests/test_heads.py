"""Attention-head scores and head ablation: tiny models against brute force, SmolLM2's induction heads
against the loss they carry."""

from __future__ import annotations

import math
import random

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from synthetic_store import make_synthetic_store

from mining.analyses import (
    HEAD_SCORES,
    ablate_heads_loss,
    attention_patterns,
    head_ablation_table,
    head_scores_table,
    next_token_loss,
    repeated_random_tokens,
)
from mining.analyses import heads as heads_module
from mining.analyses.heads import SCHEMA, _repeat_sums, head_means
from mining.errors import UserError
from mining.hooks import record
from mining.query import connect, run_named
from mining.tiny import tiny_model

N = 6  # random half length for tiny models: sequences of 13 tokens


def brute_scores(a: torch.Tensor, n: int) -> dict[str, np.ndarray]:
    """Scores by explicit loops over one batch of patterns (layers, batch, heads, T, T)."""
    L, B, H, T, _ = a.shape
    out = {name: np.zeros((L, H)) for name in HEAD_SCORES}
    for layer in range(L):
        for h in range(H):
            for b in range(B):
                p = a[layer, b, h].double()
                out["prev_token"][layer, h] += np.mean([p[i, i - 1].item() for i in range(1, T)]) / B
                out["duplicate"][layer, h] += np.mean([p[i, i - n].item() for i in range(n + 1, 2 * n + 1)]) / B
                out["induction"][layer, h] += np.mean([p[i, i - n + 1].item() for i in range(n + 1, 2 * n + 1)]) / B
                out["bos"][layer, h] += np.mean([p[i, 0].item() for i in range(1, T)]) / B
                ent = [-sum(x * math.log(x) for x in p[i].tolist() if x > 0) for i in range(1, T)]
                out["entropy"][layer, h] += np.mean(ent) / B
    return out


def test_repeated_random_tokens():
    model = tiny_model("llama", vocab_size=64)
    ids = repeated_random_tokens(model, None, seq_len=20, n_seqs=5, seed=3, bos_id=7)
    assert ids.shape == (5, 41) and (ids[:, 0] == 7).all()
    assert torch.equal(ids[:, 1:21], ids[:, 21:])
    special = {model.config.bos_token_id, model.config.eos_token_id}
    for row in ids[:, 1:21]:
        assert len(set(row.tolist())) == 20 and not special & set(row.tolist())
    assert torch.equal(ids, repeated_random_tokens(model, None, seq_len=20, n_seqs=5, seed=3, bos_id=7))
    assert not torch.equal(ids, repeated_random_tokens(model, None, seq_len=20, n_seqs=5, seed=4, bos_id=7))
    with pytest.raises(UserError, match="positions"):
        repeated_random_tokens(tiny_model("gpt2", vocab_size=512), None, seq_len=64)  # 129 > 128 positions


def test_the_heads_table_fits_its_sequences_to_a_model_with_few_positions():
    """A job's heads table takes the default length where it fits (2 x 64 + 1 positions) and the longest that fits
    otherwise (2 x 63 + 1 = 127 of a tiny model's 128): it never fails after the mining for want of positions."""
    model = tiny_model("gpt2", vocab_size=512)
    assert model.config.n_positions == 128
    seen = []
    original = heads_module.repeated_random_tokens
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(heads_module, "repeated_random_tokens", lambda *a, **kw: seen.append(a[2]) or original(*a, **kw))
        table = head_scores_table(model, None, n_seqs=2)
        head_scores_table(tiny_model("gpt2", vocab_size=512, n_positions=512), None, n_seqs=2)
    assert seen == [63, 64] and table.num_rows == 2 * 4


def test_detector_indexing_on_ideal_patterns():
    n, T = 5, 11
    eye = torch.eye(T)
    prev = torch.zeros(T, T)
    prev[0, 0] = 1
    prev[1:, :-1] += eye[1:, 1:]  # A[i, i-1] = 1
    dup, ind = prev.clone(), prev.clone()
    for i in range(n + 1, T):
        dup[i] = 0
        dup[i, i - n] = 1
        ind[i] = 0
        ind[i, i - n + 1] = 1
    a = torch.stack([prev, dup, ind])[None, None]  # (1 layer, 1 seq, 3 heads, T, T)
    s = _repeat_sums(a, n)
    assert s["prev_token"][0].tolist() == pytest.approx([1.0, 0.5, 0.5])
    assert s["duplicate"][0].tolist() == pytest.approx([0.0, 1.0, 0.0])
    assert s["induction"][0].tolist() == pytest.approx([0.0, 0.0, 1.0])


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "llama", "qwen2", "gemma2", "gemma3", "olmo", "olmo2", "opt",
                                  "bloom", "cohere", "granite", "olmo3", "vaultgemma", "glm4", "falcon", "flex_olmo",
                                  "granitemoe", "mpt", "codegen", "persimmon", "xglm"])
def test_tiny_scores_match_brute_force(arch):
    model = tiny_model(arch, seed=1)
    before = model.config._attn_implementation
    table = head_scores_table(model, None, seq_len=N, n_seqs=3, seed=0, batch_size=2)
    assert model.config._attn_implementation == before  # switched to eager and back
    assert table.schema == SCHEMA and table.num_rows == 2 * 4
    ids = repeated_random_tokens(model, None, N, 3, 0)
    a = attention_patterns(model, ids)
    assert a.shape == (2, 3, 4, 2 * N + 1, 2 * N + 1)
    assert torch.allclose(a.sum(-1), torch.ones(())) and (a.triu(1) == 0).all()  # causal, rows sum to 1
    want = brute_scores(a, N)
    cols = table.to_pydict()
    for name in HEAD_SCORES:
        np.testing.assert_allclose(np.array(cols[name]).reshape(2, 4), want[name], rtol=1e-5, atol=1e-6)
    assert cols["layer"] == [0, 0, 0, 0, 1, 1, 1, 1] and cols["head"] == [0, 1, 2, 3] * 2
    mha = ("gpt2", "gpt_neox", "opt", "bloom", "mpt", "codegen", "persimmon", "xglm")
    expect_kv = [0, 1, 2, 3] * 2 if arch in mha else [0, 0, 1, 1] * 2  # GQA: 2 KV heads
    expect_kv = [0] * 8 if arch == "falcon" else expect_kv  # multi-query: one KV head
    assert cols["kv_head"] == expect_kv
    again = head_scores_table(model, None, seq_len=N, n_seqs=3, seed=0, batch_size=3)  # batching-independent
    for name in HEAD_SCORES:
        np.testing.assert_allclose(again.column(name).to_numpy(), table.column(name).to_numpy(), rtol=1e-5)


def test_corpus_ids_drive_bos_and_entropy():
    model = tiny_model("llama", seed=2)
    corpus = torch.randint(0, 512, (4, 9), generator=torch.Generator().manual_seed(0))
    with_corpus = head_scores_table(model, None, seq_len=N, n_seqs=2, corpus_ids=corpus).to_pydict()
    plain = head_scores_table(model, None, seq_len=N, n_seqs=2).to_pydict()
    want = brute_scores(attention_patterns(model, corpus), n=4)  # n is irrelevant to bos/entropy
    np.testing.assert_allclose(with_corpus["bos"], want["bos"].ravel(), rtol=1e-5)
    np.testing.assert_allclose(with_corpus["entropy"], want["entropy"].ravel(), rtol=1e-5)
    assert with_corpus["induction"] == plain["induction"] and with_corpus["bos"] != plain["bos"]
    with pytest.raises(UserError, match="corpus_ids"):
        head_scores_table(model, None, seq_len=N, n_seqs=2, corpus_ids=torch.zeros(5, dtype=torch.long))


def _zero_head_weights(model, arch: str, layer: int, head: int, d_head: int) -> None:
    """Cut a head out at the weights: its columns of W_O (rows of GPT-2's Conv1D (in, out) weight)."""
    sl = slice(head * d_head, (head + 1) * d_head)
    with torch.no_grad():
        if arch == "gpt2":
            model.transformer.h[layer].attn.c_proj.weight[sl, :] = 0
        else:
            model.model.layers[layer].self_attn.o_proj.weight[:, sl] = 0


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_zero_ablation_equals_zeroed_weights(arch):
    heads = [(0, 1), (1, 3), (1, 0)]
    ids = torch.randint(0, 500, (3, 10), generator=torch.Generator().manual_seed(1))
    model = tiny_model(arch, seed=4)
    got = ablate_heads_loss(model, heads, ids, "zero", loss_from=2, batch_size=2)
    assert next_token_loss(model, ids, 2) != pytest.approx(got)  # the hooks are gone afterwards
    cut = tiny_model(arch, seed=4)
    for layer, head in heads:
        _zero_head_weights(cut, arch, layer, head, d_head=8)
    assert got == pytest.approx(next_token_loss(cut, ids, 2), rel=1e-5)


def test_mean_ablation_equals_bias_shift():
    """Replacing z_h by its mean m_h is the same as zeroing W_O's head columns and adding W_O[:, h] m_h
    to the output bias."""
    ids = torch.randint(0, 500, (4, 10), generator=torch.Generator().manual_seed(2))
    model = tiny_model("llama", seed=5, attention_bias=True)
    means = head_means(model, ids, [1])
    with torch.no_grad(), record(model, ["blocks.1.attn.hook_z"]) as acts:
        model(ids)
    z = acts["blocks.1.attn.hook_z"].double().mean((0, 1)).unflatten(0, (4, 8))
    torch.testing.assert_close(means[1], z)
    got = ablate_heads_loss(model, [(1, 2)], ids, "mean")
    o_proj = model.model.layers[1].self_attn.o_proj
    with torch.no_grad():
        o_proj.bias += o_proj.weight[:, 16:24] @ means[1][2].float()
        o_proj.weight[:, 16:24] = 0
    assert got == pytest.approx(next_token_loss(model, ids), rel=1e-5)


def test_head_ablation_table_and_errors():
    model = tiny_model("gpt_neox", seed=0)
    ids = torch.randint(0, 500, (2, 8), generator=torch.Generator().manual_seed(0))
    table = head_ablation_table(model, ids, kinds=("zero", "mean"))
    assert table.num_rows == 2 * 2 * 4 and table.column_names == ["layer", "head", "kind", "loss_delta"]
    row = table.to_pylist()[5]
    clean = next_token_loss(model, ids)
    loss = ablate_heads_loss(model, [(row["layer"], row["head"])], ids, row["kind"])
    assert row["loss_delta"] == pytest.approx(loss - clean, rel=1e-4, abs=1e-6)
    with pytest.raises(UserError, match="does not exist"):
        ablate_heads_loss(model, [(0, 4)], ids)
    with pytest.raises(UserError, match="ablation kind"):
        ablate_heads_loss(model, [(0, 1)], ids, "noise")
    with pytest.raises(UserError, match="loss_from"):
        next_token_loss(model, ids, loss_from=8)


def test_heads_sql(tmp_path):
    store = make_synthetic_store(tmp_path)
    table = head_scores_table(tiny_model("llama", seed=0), None, seq_len=N, n_seqs=2)
    pq.write_table(table, store / "heads.parquet")
    con = connect(store)
    top = run_named(con, "heads", {}).to_pydict()
    assert top["rank"] == list(range(1, 9)) and top["score"] == top["induction"]
    assert top["induction"] == sorted(top["induction"], reverse=True)
    prev = run_named(con, "heads", {"order_by": "prev_token", "limit": "3"}).to_pydict()
    best = sorted(zip(table.column("prev_token").to_pylist(), table.column("layer").to_pylist(),
                      table.column("head").to_pylist()), key=lambda r: -r[0])[:3]
    assert list(zip(prev["score"], prev["layer"], prev["head"])) == best
    with pytest.raises(UserError, match="order_by must be"):
        run_named(con, "heads", {"order_by": "layer"})


@pytest.mark.slow
def test_smollm2_induction_heads_carry_the_repeat_loss(smollm2):
    """Ablating the top induction heads raises the loss on the repeated half far more than ablating
    as many random other heads (GQA: 9 query heads per layer are scored separately)."""
    model, tok = smollm2.model, smollm2.tokenizer
    n, k = 40, 4
    scores = head_scores_table(model, tok, seq_len=n, n_seqs=4, seed=0)
    assert scores.num_rows == 30 * 9 and max(scores.column("kv_head").to_pylist()) == 2
    rows = sorted(scores.to_pylist(), key=lambda r: (-r["induction"], r["layer"], r["head"]))
    assert rows[0]["induction"] > 0.5  # SmolLM2 has strong induction heads
    assert max(scores.column("prev_token").to_pylist()) > 0.5  # and previous-token heads
    top = [(r["layer"], r["head"]) for r in rows[:k]]
    others = [(r["layer"], r["head"]) for r in rows[k:]]

    ids = repeated_random_tokens(model, tok, n, 4, seed=1)  # fresh sequences, not the scoring ones
    loss_from = n + 2  # tokens 2..n of the repeat: predictable only by induction
    clean = next_token_loss(model, ids, loss_from)
    top_rise = ablate_heads_loss(model, top, ids, loss_from=loss_from) - clean
    rand_rises = [ablate_heads_loss(model, random.Random(s).sample(others, k), ids, loss_from=loss_from) - clean
                  for s in range(3)]
    rand_rise = float(np.mean(rand_rises))
    print(f"clean {clean:.3f}  top-{k} {top}: +{top_rise:.3f}  random: {[round(r, 3) for r in rand_rises]}")
    assert top_rise > 1.0
    assert top_rise > 3 * max(rand_rise, 0.05)
