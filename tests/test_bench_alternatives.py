"""`mine bench`'s alternatives do the miner's work, on the model the miner runs, without changing that model.

A tiny random Llama (SmolLM2's tokenizer). nnsight and TransformerLens are the `alternatives` extra: where one
is not installed its cases are skipped, and the bench reports it as skipped (test_bench.py)."""

import importlib.util

import numpy as np
import pytest
import torch

from mining.bench import BenchConfig, Workload, iter_batches
from mining.bench_alternatives import (alternative_runners, cache_then_reduce, hook_capture, keep_then_reduce,
                                       nnsight_capture, transformer_lens_capture)
from mining.engine import ShardMiner, histogram_bins
from mining.hooks import resolve_hooks

K = 8


@pytest.fixture(scope="module")
def work(tmp_path_factory, smol_tokenizer):
    from mining.tiny import tiny_model

    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", vocab_size=len(smol_tokenizer)).save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    return Workload(BenchConfig(model=str(folder), tokens=300, context_length=64, batch_size=4, top_k=K))


def points_of(work):
    return resolve_hooks(work.loaded.model, work.spec("mining").hooks)


def first_batch(work):
    ids, attention, toks = next(iter_batches(work.shards, 4, work.loaded.device))
    return ids, attention, toks >= 0


@pytest.mark.parametrize("library, make", [("nnsight", nnsight_capture), ("transformer_lens", transformer_lens_capture)])
def test_library_captures_what_the_hooks_capture(work, library, make):
    pytest.importorskip(library)
    points = points_of(work)
    ids, attention, mask = first_batch(work)
    with torch.inference_mode():
        want = hook_capture(work.loaded.model, points)(ids, attention, mask)
        got = make(work.loaded, points)(ids, attention, mask)
    assert set(got) == {p.name for p in points} and len(want) == len(points)
    for name, x in want.items():
        assert got[name].shape == x.shape == (int(mask.sum()), points[0].width) and got[name].dtype == torch.float16
        if library == "nnsight":  # the same modules run: the same bits
            assert torch.equal(got[name], x), name
        else:  # the bridge runs eager attention: float16 images of values equal to ~1e-7
            torch.testing.assert_close(got[name], x, rtol=2e-3, atol=1e-3)


def test_alternatives_reduce_what_the_miner_keeps(work, tmp_path):
    """Top-k values and tokens, moments: what the miner stores, from float16 caches (to float16's precision)."""
    spec = work.spec("mining")
    points = points_of(work)
    names = [p.name for p in points]
    capture = hook_capture(work.loaded.model, points)
    details, on_disk = cache_then_reduce(capture, work.loaded, work.shards, 4, names, K, histogram_bins(spec),
                                         str(tmp_path))
    _, in_memory = keep_then_reduce(capture, work.loaded, work.shards, 4, names, K, histogram_bins(spec))
    assert details["cache_bytes"] >= work.n_tokens * work.n_neurons * 2 and details["reduce_s"] > 0
    miner = ShardMiner(spec, work.loaded)
    results = [miner.mine(s) for s in work.shards]
    for name in names:
        stats = results[0].stats[name]
        for r in results[1:]:
            stats = stats.merge(r.stats[name])
        values, toks = stats.top.finalize()
        cached_values, cached_toks = on_disk[name]["top"]
        assert torch.equal(cached_values, in_memory[name]["top"][0])
        np.testing.assert_allclose(cached_values.numpy(), values.numpy(), rtol=1e-3, atol=1e-3)
        # the best token of a neuron is the same unless float16 ties it with the runner-up
        clear = (values[0] - values[1]).abs() > 1e-2 * values[0].abs() + 1e-3
        assert torch.equal(cached_toks[0][clear], toks[0][clear]) and clear.float().mean() > 0.8
        moments = stats.moments.finalize()
        assert (moments["count"] == work.n_tokens).all()
        np.testing.assert_allclose(on_disk[name]["moments"][0].numpy(), moments["mean"], rtol=1e-2, atol=1e-3)
        counts = on_disk[name]["histogram"]
        assert counts.shape == stats.histogram.finalize().shape and (counts.sum(1) == work.n_tokens).all()


def test_alternatives_leave_the_miners_model_as_it_was(work, tmp_path):
    model = work.loaded.model
    before = {name: type(m) for name, m in model.named_modules()}
    attention = model.config._attn_implementation
    runs, skipped = alternative_runners(work.loaded, points_of(work), K, histogram_bins(work.spec("mining")), 4,
                                        str(tmp_path))
    for module, name in (("nnsight", "nnsight_to_disk"), ("transformer_lens", "transformer_lens")):
        if importlib.util.find_spec(module) is None:
            assert "not installed" in skipped[name]["skipped"]
        else:
            assert name in runs and name not in skipped
    for name, run in runs.items():
        out = run(work.shards)
        assert out["capture_s"] > 0 and out["cache_bytes"] > 0, name
    assert {name: type(m) for name, m in model.named_modules()} == before
    assert model.config._attn_implementation == attention
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert not [name for name, m in model.named_modules() if "forward" in vars(m)]  # nnsight patches forwards


def test_a_missing_library_is_reported_not_fatal(work, tmp_path, monkeypatch):
    """Without the `alternatives` extra the bench still runs the plain-hooks route and says how to add the others."""
    import mining.bench_alternatives as alternatives

    real = importlib.util.find_spec
    monkeypatch.setattr(alternatives.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("nnsight", "transformer_lens") else real(name, *a))
    runs, skipped = alternative_runners(work.loaded, points_of(work), K, histogram_bins(work.spec("mining")), 4,
                                        str(tmp_path))
    assert list(runs) == ["cache_to_disk"]
    for name in ("nnsight_to_disk", "transformer_lens"):
        assert "not installed" in skipped[name]["skipped"] and ".[alternatives]" in skipped[name]["skipped"]


@pytest.mark.parametrize("arch", ["opt", "phi3"])
def test_nnsight_takes_the_same_activations_where_a_module_is_flat_or_fused(arch):
    """OPT's MLP sees the stream as (B*T, d), Phi-3's gate and up are halves of one matmul: nnsight saves the modules'
    raw tensors, and the bench shapes them as the miner's hooks do."""
    pytest.importorskip("nnsight")
    from types import SimpleNamespace

    from mining.hooks import available_sites
    from mining.tiny import tiny_model

    model = tiny_model(arch)
    points = resolve_hooks(model, [f"blocks.*.{s}" for s in available_sites(model) if s.startswith("mlp.")])
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    attention, mask = torch.ones_like(ids), torch.ones_like(ids, dtype=torch.bool)
    mask[1, :3] = False
    with torch.inference_mode():
        want = hook_capture(model, points)(ids, attention, mask)
        got = nnsight_capture(SimpleNamespace(model=model), points)(ids, attention, mask)
    assert set(got) == set(want) == {p.name for p in points}
    for name, x in want.items():
        assert x.shape == (15, 64) and torch.equal(got[name], x), name
