"""The numba CPU kernels against the torch code they stand in for, on hostile data (ties, signed
zeros, NaN, infinities, subnormals, out-of-range magnitudes), column counts that are not a multiple
of the block, and the reducers' results with the kernels on and off."""

import numpy as np
import pytest
import torch

from mining.reducers import ContextTopK, Histogram, HistogramBins, Moments, TopK, kernels
from mining.reducers.moments import _batch_moments
from mining.reducers.topk import decode

from test_reducers import make_x, same_state

pytestmark = pytest.mark.skipif(kernels.numba is None, reason="numba is not installed")


def hostile(seed: int, M: int = 300, N: int = 150) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    x = make_x(rng, M, N)
    x[rng.random((M, N)) < 0.002] = np.nan
    x[rng.random((M, N)) < 0.002] = np.inf
    x[rng.random((M, N)) < 0.002] = -np.inf
    x[rng.random((M, N)) < 0.002] = np.float32(1e-41)  # subnormal
    return torch.from_numpy(x)


@pytest.fixture
def torch_ops(monkeypatch):
    """Run the block with the kernels turned off."""
    def off(fn):
        monkeypatch.setenv("MINING_KERNELS", "torch")
        try:
            return fn()
        finally:
            monkeypatch.delenv("MINING_KERNELS")
    return off


@pytest.mark.parametrize("seed", range(2))
def test_histogram_kernel_equals_bincount(seed, torch_ops):
    x = hostile(seed)
    for bins in (HistogramBins(), HistogramBins(2, -126, 127), HistogramBins(0, -3, 2)):
        fast, ref = Histogram(bins), Histogram(bins)
        for part in (x[:100], x[100:101], x[101:]):
            fast.update(part.contiguous())
            torch_ops(lambda: ref.update(part.contiguous()))
        assert fast._pending is not None  # the kernel ran
        assert torch.equal(fast.finalize(), ref.finalize())
        assert same_state(fast.state_dict(), ref.state_dict())
        merged = fast.merge(ref)  # a flushed state merges like any other
        assert torch.equal(merged.finalize(), 2 * ref.finalize())


def test_moments_combine_kernel_gives_the_torch_bits(torch_ops):
    """Merging running moments (every hook, every batch) in the compiled loop: the bits of moments._combine's
    torch ops, NaN and infinities included, over a chain of batches of different sizes."""
    parts = [_batch_moments(hostile(seed, M=20 + 37 * seed, N=150)) for seed in range(5)]
    parts[2]["mean"][3] = float("inf")  # a state already non-finite
    parts[3]["m2"][4] = float("nan")

    def chain() -> Moments:
        m = Moments()
        for p in parts:
            m.add_batch(p)
        return m

    fast, ref = chain(), torch_ops(chain)
    assert fast.count == ref.count
    for k in ("mean", "m2", "m3", "m4", "min", "max"):
        a, b = getattr(fast, k), getattr(ref, k)
        nan = torch.isnan(b)  # a NaN's sign bit is the CPU's choice of operand, not arithmetic
        assert nan.any() and torch.equal(torch.isnan(a), nan), k
        assert torch.equal(a[~nan].view(torch.int64), b[~nan].view(torch.int64)), k
    assert torch.equal(fast.n_active, ref.n_active)
    assert kernels.combined_moments(1.0, parts[0], 2.0, {**parts[1], "m3": parts[1]["m3"].float()}) is None


@pytest.mark.parametrize("seed", range(2))
def test_moments_kernel_equals_torch(seed, torch_ops):
    x = hostile(seed)
    fast = _batch_moments(x)
    ref = torch_ops(lambda: _batch_moments(x))
    for k in ("count", "n_active", "min", "max"):
        assert torch.equal(torch.as_tensor(fast[k]).nan_to_num(7.0), torch.as_tensor(ref[k]).nan_to_num(7.0)), k
    finite = torch.isfinite(ref["m4"])
    assert torch.equal(finite, torch.isfinite(fast["m4"]))
    for k in ("mean", "m2", "m3", "m4"):
        torch.testing.assert_close(fast[k][finite], ref[k][finite], rtol=1e-9, atol=1e-12, msg=k)


def test_moments_kernel_is_centred_where_a_shift_would_cancel():
    """A neuron at 1e4 with spread 1e-3: the centred second pass keeps the variance."""
    rng = np.random.default_rng(0)
    x = torch.from_numpy((1e4 + rng.normal(size=(4096, 70)) * 1e-3).astype(np.float32))
    m = Moments()
    m.update(x)
    ref = x.double()
    torch.testing.assert_close(torch.from_numpy(m.finalize()["std"]), ref.std(0, unbiased=False), rtol=1e-6, atol=0)


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("largest", [True, False])
def test_topk_kernel_equals_torch(seed, largest, torch_ops):
    x = hostile(seed)
    toks = torch.randperm(10 * len(x))[: len(x)]
    fast, ref = TopK(5, largest), TopK(5, largest)
    for lo, hi in ((0, 7), (7, 60), (60, 61), (61, 300)):  # dense first, then sparse
        fast.update(x[lo:hi].contiguous(), toks[lo:hi])
        torch_ops(lambda: ref.update(x[lo:hi].contiguous(), toks[lo:hi]))
        assert torch.equal(fast.keys, ref.keys)


def test_candidate_count():
    x = torch.arange(12, dtype=torch.float32).view(3, 4).contiguous()
    kth = torch.tensor([4.0, 100.0, -1.0, float("nan")])
    assert kernels.count_candidates(x, kth, largest=True) == int((x >= kth).sum()) == 5
    assert kernels.count_candidates(x, kth, largest=False) == int((x <= kth).sum()) == 5


@pytest.mark.parametrize("seed", range(2))
def test_context_peaks_kernel_equals_torch_max(seed):
    rng = np.random.default_rng(seed)
    x = hostile(seed, M=5 * 40, N=130).view(5, 40, 130)
    x[:, :, :20] = torch.from_numpy(rng.integers(-2, 3, (5, 40, 20)).astype(np.float32))  # ties
    mined = torch.from_numpy(rng.random((5, 40)) < 0.7)
    mined[3] = False  # a context with nothing mined
    peak, where = kernels.context_peaks(x.contiguous(), mined)
    ref_peak, ref_where = x.masked_fill(~mined[..., None], float("-inf")).max(dim=1)
    assert torch.equal(peak.isnan(), ref_peak.isnan())
    ok = ~ref_peak.isnan()
    assert torch.equal(peak[ok], ref_peak[ok])
    finite = torch.isfinite(ref_peak)  # the only peaks whose position is used (see ContextTopK)
    assert torch.equal(where[finite], ref_where[finite])


@pytest.mark.parametrize("seed", range(2))
def test_context_topk_same_with_kernels_on_and_off(seed, torch_ops):
    x = hostile(seed, M=6 * 30, N=70).view(6, 30, 70).contiguous()
    tok = torch.arange(6 * 30).view(6, 30)
    tok[:, 25:] = -1  # padding
    fast, ref = ContextTopK(3), ContextTopK(3)
    for lo, hi in ((0, 2), (2, 6)):
        fast.update(x[lo:hi], tok[lo:hi])
        torch_ops(lambda: ref.update(x[lo:hi], tok[lo:hi]))
    assert torch.equal(fast.top.keys, ref.top.keys)


def test_non_contiguous_and_half_inputs_take_the_torch_path():
    x = torch.randn(20, 30)
    assert kernels.usable(x)
    assert not kernels.usable(x.T)
    assert not kernels.usable(x.half())
    h = Histogram(HistogramBins())
    h.update(x.T)
    assert h._pending is None and h.finalize().sum() == 600


def standard_set(k: int = 4):
    return TopK(k, True), TopK(k, False), ContextTopK(k), Histogram(HistogramBins()), Moments()


def feed_each(reducers, x, tok, mined):
    """The standard set fed one reducer at a time, as HookStats does where update_hook does not apply."""
    top, bottom, contexts, hist, mom = reducers
    flat = x[mined]
    top.update(flat, tok[mined])
    bottom.update(flat, tok[mined])
    contexts.update(x, tok, rising=True)
    hist.update(flat)
    mom.update(flat)


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("floored", [False, True])
def test_fused_hook_update_equals_the_reducers_one_by_one(seed, floored, torch_ops):
    """update_hook (one pass for top, bottom, contexts, histogram, moments) leaves the states the
    reducers' own torch updates leave: bit for bit, moments to rounding. Batches with padding, NaN and
    infinities (their columns take ContextTopK's exact path), ties, and floors from another shard. The first
    batch too: without floors, its first rows' k-th best seeds them (fused.seed_floor)."""
    from mining.reducers.fused import update_hook

    rng = np.random.default_rng(seed)
    B, T, N = 6, 30, 70
    fast, ref = standard_set(), standard_set()
    if floored:  # floors as an actor gets them from a shard it stored
        other = standard_set()
        xo = hostile(seed + 10, M=B * T, N=N)
        other[0].update(xo, torch.arange(10**6, 10**6 + B * T))
        other[1].update(xo, torch.arange(10**6, 10**6 + B * T))
        for s in (fast, ref):
            s[0].set_floor(other[0].threshold())
            s[1].set_floor(other[1].threshold())
    took = []
    for i in range(4):
        x = hostile(seed * 7 + i, M=B * T, N=N).view(B, T, N).contiguous()
        if i < 2:  # ties, in the batch that seeds the floors and against the kept keys
            x[:, :, :10] = torch.from_numpy(rng.integers(-2, 3, (B, T, 10)).astype(np.float32))
        if i == 2:
            x = torch.from_numpy(rng.normal(size=(B, T, N)).astype(np.float32))  # all finite: no exact path
        tok = torch.arange(i * B * T, (i + 1) * B * T).view(B, T)
        tok[:, 20 + i:] = -1  # padding / unmined tail
        tok[i % B, :] = -1  # a context with nothing mined
        mined = tok >= 0
        took.append(update_hook(*fast, x, tok, mined))
        if not took[-1]:
            feed_each(fast, x, tok, mined)
        torch_ops(lambda: feed_each(ref, x, tok, mined))
    assert took == [True] * 4
    for a, b in zip(fast[:3], ref[:3]):
        keys_a = a.top.keys if isinstance(a, ContextTopK) else a.keys
        keys_b = b.top.keys if isinstance(b, ContextTopK) else b.keys
        assert torch.equal(keys_a, keys_b)
    assert torch.equal(fast[3].finalize(), ref[3].finalize())
    fa, fb = fast[4].finalize(), ref[4].finalize()
    for key in ("count", "frac_active", "min", "max"):
        np.testing.assert_array_equal(fa[key], fb[key], err_msg=key)
    for key in ("mean", "std", "skew", "kurtosis"):
        np.testing.assert_allclose(fa[key], fb[key], rtol=1e-9, atol=1e-12, err_msg=key)


@pytest.mark.parametrize("seed", range(2))
def test_fused_ranked_update_equals_the_reducers_one_by_one(seed, torch_ops):
    """update_ranked (DLA's top, bottom and moments in one pass) against the reducers fed one by one."""
    from mining.reducers.fused import update_ranked

    fast, ref = (TopK(4, True), TopK(4, False), Moments()), (TopK(4, True), TopK(4, False), Moments())
    took = []
    for i in range(3):
        x = hostile(seed * 5 + i, M=90, N=70)
        tok = torch.arange(i * 90, (i + 1) * 90)
        took.append(update_ranked(*fast, x, tok))
        if not took[-1]:
            for r in fast[:2]:
                r.update(x, tok)
            fast[2].update(x)

        def feed():
            for r in ref[:2]:
                r.update(x, tok)
            ref[2].update(x)
        torch_ops(feed)
    assert took == [True, True, True]
    for a, b in zip(fast[:2], ref[:2]):
        assert torch.equal(a.keys, b.keys)
    fa, fb = fast[2].finalize(), ref[2].finalize()
    for key in ("count", "frac_active", "min", "max"):
        np.testing.assert_array_equal(fa[key], fb[key], err_msg=key)
    for key in ("mean", "std", "skew", "kurtosis"):
        np.testing.assert_allclose(fa[key], fb[key], rtol=1e-9, atol=1e-12, err_msg=key)


def test_fused_and_flat_kernels_give_the_same_moment_bits():
    """An actor with top-k floors takes the fused kernel from a shard's first batch, one without them the
    flat kernels: the moments must be the same bits either way, or a resumed job's store would differ."""
    from mining.reducers import layer_kernel

    rng = np.random.default_rng(3)
    B, T, N = 5, 60, 70
    x = torch.from_numpy((rng.standard_t(3, (B, T, N)) + 4).astype(np.float32))
    mined = torch.from_numpy(rng.random((B, T)) < 0.8)
    tok = torch.where(mined, torch.arange(B * T).view(B, T), -1)
    empty = (torch.full((3, N), -2**63, dtype=torch.int64), None)
    fused, _ = layer_kernel.layer_update(x, mined, tok, empty, (empty[0].clone(), None), (empty[0].clone(), None), None,
                                         int(mined.sum()))
    flat = kernels.moments(x[mined].contiguous())
    assert int(mined.sum()) > 2 * kernels.CHUNK_ROWS
    for k in ("mean", "m2", "m3", "m4", "n_active", "min", "max"):
        assert torch.equal(fused[k], flat[k]), k


def test_histogram_past_the_uint16_counts(torch_ops):
    """More rows than a uint16 count takes, in one update and in one fused batch; and bins too fine for
    uint16 indices take the torch path."""
    from mining.reducers.fused import update_hook

    rng = np.random.default_rng(4)
    x = torch.from_numpy(rng.normal(size=(kernels.HIST_ROWS + 5000, 3)).astype(np.float32))
    x[:50000, 0] = 1.0  # one bin counted past 2**16 over the two updates
    fast, ref = Histogram(HistogramBins()), Histogram(HistogramBins())
    for part in (x, x[:20000]):
        fast.update(part.contiguous())
        torch_ops(lambda: ref.update(part.contiguous()))
    assert torch.equal(fast.finalize(), ref.finalize()) and int(fast.finalize().max()) > 2**16

    B, T, N = 3, 30000, 40
    xb = torch.from_numpy(rng.normal(size=(B, T, N)).astype(np.float32))
    tok = torch.arange(B * T).view(B, T)
    fast, ref = standard_set(), standard_set()
    for t in (fast[0], fast[1]):
        t.set_floor(torch.full((N,), 2**62, dtype=torch.int64))  # settled: the fused kernel takes the batch
    assert update_hook(*fast, xb, tok, tok >= 0)
    torch_ops(lambda: ref[3].update(xb.view(-1, N)))
    assert torch.equal(fast[3].finalize(), ref[3].finalize())
    assert fast[4].count == B * T

    fine = HistogramBins(8, -126, 127)
    assert fine.n_bins > kernels.HIST_MAX_BINS
    h = Histogram(fine)
    h.update(x[:100].contiguous())
    assert h._pending is None and int(h.finalize().sum()) == 300


@pytest.mark.parametrize("seed", range(2))
def test_fused_product_equals_the_values_it_stands_for(seed):
    """gain_product in the hook, then update_ranked with a scale (DLA's division by the final norm's scale, a chunk at a
    time) leave the states that update_ranked leaves on the values computed whole, as DlaBatch computes them
    without deferring: bit for bit, moments too."""
    from mining.reducers.fused import update_ranked
    from mining.reducers.layer_kernel import gain_product

    rng = np.random.default_rng(seed)
    B, T, N, U = 4, 50, 70, 9
    fast, ref = (TopK(4, True), TopK(4, False), Moments()), (TopK(4, True), TopK(4, False), Moments())
    took = []
    for i in range(3):
        x = hostile(seed * 3 + i, M=B * T, N=N).view(B, T, N).contiguous()
        mined = rng.random((B, T)) < 0.7
        tok = np.where(mined, np.arange(i * B * T, (i + 1) * B * T).reshape(B, T), -1)
        M = int(mined.sum())
        gain = torch.from_numpy(rng.normal(size=(U, N)).astype(np.float32))
        inverse = rng.integers(0, U, M)
        scale = rng.uniform(0.5, 3.0, M).astype(np.float32)
        values = gain.index_select(0, torch.from_numpy(inverse)).mul_(x.view(-1, N)[torch.from_numpy(mined.reshape(-1))])
        values = values.div_(torch.from_numpy(scale)[:, None])
        toks = torch.from_numpy(tok[mined])
        u = gain_product(x, np.flatnonzero(mined), gain, inverse, torch.empty(M, N))
        took.append(update_ranked(*fast, u, toks, scale))
        for reducers, fed in ((fast, took[-1]), (ref, False)):
            if not fed and not update_ranked(*reducers, values, toks):
                reducers[0].update(values, toks)
                reducers[1].update(values, toks)
                reducers[2].update(values)
    assert took == [True, True, True]
    for a, b in zip(fast[:2], ref[:2]):
        assert torch.equal(a.keys, b.keys)
    for k in ("mean", "m2", "m3", "m4", "n_active", "min", "max"):
        assert torch.equal(getattr(fast[2], k).nan_to_num(7.0), getattr(ref[2], k).nan_to_num(7.0)), k


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_half_precision_model_on_the_cpu_takes_the_single_pass(dtype, tiny_job, monkeypatch, torch_ops):
    """A bfloat16 or float16 model on the CPU (bfloat16 runs 2.5-3.7 times faster than float32 on a CPU with AMX):
    its activations are converted to float32 once and go through the single-pass kernel, and the states are
    those of the reducers one by one (kernels off), DLA included."""
    from dataclasses import replace

    from mining import engine
    from mining.models import load_model

    from test_device import mine_all, same_results

    spec, _, shards = tiny_job
    spec = replace(spec, model=replace(spec.model, dtype=dtype))
    loaded = load_model(spec.model)
    shards = shards[:2]  # the second mined with the first's floors
    ref = torch_ops(lambda: mine_all(spec, loaded, shards))
    took = []
    original = engine.update_hook
    monkeypatch.setattr(engine, "update_hook", lambda *a, **k: took.append(original(*a, **k)) or took[-1])
    same_results(mine_all(spec, loaded, shards), ref)
    assert any(took)  # once the top-k thresholds settle (after the first batches), each hook in one pass


def test_a_floor_is_seeded_only_where_the_rows_rank_k_values(torch_ops):
    """seed_floor settles an empty top-k from a batch's first rows, or leaves it as it was: a column whose rows
    hold fewer than k ranked values (NaN ranks nowhere), or fewer rows than k. Such a batch takes the torch path
    and leaves the same keys."""
    from mining.reducers.fused import seed_floor, update_hook

    rng = np.random.default_rng(5)
    B, T, N = 3, 40, 20
    x = torch.from_numpy(rng.normal(size=(B, T, N)).astype(np.float32))
    tok = torch.arange(B * T).view(B, T)
    few = TopK(4, True)
    few._start(N, x.device)
    seed_floor(few, x[0, :3], tok[0, :3])  # three rows: no k-th value
    assert few.floor is None and not few.settled()
    x[:, 1:, 7] = np.nan  # column 7 ranks one value in each context
    fast, ref = standard_set(), standard_set()
    assert not update_hook(*fast, x, tok, tok >= 0)
    assert fast[0].floor is None and fast[1].floor is None
    feed_each(fast, x, tok, tok >= 0)
    torch_ops(lambda: feed_each(ref, x, tok, tok >= 0))
    for a, b in zip(fast[:2], ref[:2]):
        assert torch.equal(a.keys, b.keys)
    seeded = TopK(4, False)
    seeded._start(N, x.device)
    seed_floor(seeded, x[1].nan_to_num(0.0), tok[1])
    kth = torch.sort(x[1].nan_to_num(0.0), dim=0).values[3]  # the 4th lowest of each column
    assert torch.equal(decode(seeded.floor, False)[0], kth) and seeded.settled()


def test_the_layer_kernels_states_do_not_depend_on_its_thread_count(monkeypatch):
    """An actor runs the kernels on one thread, `mine bench` and an in-process run on two: each thread takes a range
    of columns, so the states must be the same bits whatever the split (the column count is not a multiple of the
    parts' width, so the last part is short). DLA's ranked pass too."""
    from mining.reducers.fused import update_hook, update_ranked

    def run(threads: int) -> list[dict[str, torch.Tensor]]:
        monkeypatch.setenv("MINING_KERNEL_THREADS", str(threads))
        hook, ranked = standard_set(), (TopK(4, True), TopK(4, False), Moments())
        for i in range(3):
            x = hostile(40 + i, M=4 * 50, N=150).view(4, 50, 150).contiguous()
            tok = torch.arange(i * 200, (i + 1) * 200).view(4, 50)
            tok[:, 45:] = -1
            assert update_hook(*hook, x, tok, tok >= 0)
            flat = hostile(50 + i, M=120, N=150)
            if not update_ranked(*ranked, flat, torch.arange(i * 120, (i + 1) * 120)):
                for r in ranked[:2]:
                    r.update(flat, torch.arange(i * 120, (i + 1) * 120))
                ranked[2].update(flat)
        return [r.state_dict() for r in (*hook, *ranked)]

    if kernels.numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba has one thread here")
    one, two = run(1), run(2)
    for a, b in zip(one, two):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key].reshape(-1).view(torch.uint8), b[key].reshape(-1).view(torch.uint8)), key

