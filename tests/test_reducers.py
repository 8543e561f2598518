"""Reducers against brute force on the concatenated data, under random sharding and merge trees."""

import time

import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from mining.reducers import (ContextTopK, Histogram, HistogramBins, Moments, TopK, fraction_of_max,
                             quantile_error_bound, quantile_from_counts)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BINS = HistogramBins()  # the job default: 4 mantissa bits, exponents [-12, 8)


# ---------------------------------------------------------------- data and sharding

def make_x(rng: np.random.Generator, M: int, N: int) -> np.ndarray:
    """Columns of many kinds: ties, negatives, exact zeros, heavy tails, out-of-range magnitudes."""
    kinds = [
        lambda: rng.normal(size=M),
        lambda: rng.integers(-3, 4, M) * 0.5,  # few distinct levels: ties everywhere
        lambda: np.maximum(rng.normal(size=M), 0) * (rng.random(M) < 0.3),  # mostly zeros
        lambda: rng.standard_cauchy(M),
        lambda: rng.normal(size=M) * 10.0 ** rng.uniform(-7, 5, M),  # below and above the bin range
        lambda: np.full(M, 1.5),  # constant
        lambda: np.zeros(M),  # dead
        lambda: -rng.exponential(size=M) * 1e-5,  # negative underflow only
        lambda: np.where(rng.random(M) < 0.5, -0.0, 0.0) + (rng.random(M) < 0.1) * 3.0,  # signed zeros
    ]
    return np.stack([kinds[j % len(kinds)]() for j in range(N)], axis=1).astype(np.float32)


def make_toks(rng: np.random.Generator, M: int) -> np.ndarray:
    """Unique global token indices in random order, some close to the 2**31 - 1 limit."""
    toks = rng.choice(10 * M + 10, M, replace=False).astype(np.int64)
    toks[: min(3, M)] = 2**31 - 1 - np.arange(min(3, M))
    return rng.permutation(toks)


def cuts(rng: np.random.Generator, n: int, pieces: int) -> list[tuple[int, int]]:
    """Random contiguous pieces of range(n), empty and single-row pieces included."""
    points = list(rng.integers(0, n + 1, pieces - 1))
    if n >= 2:
        c = int(rng.integers(0, n - 1))
        points += [c, c + 1, c + 1]  # one single-row piece and one empty piece
    b = [0, *sorted(points), n]
    return list(zip(b[:-1], b[1:]))


def sharded(rng, n: int, make, feed) -> list:
    """One reducer per shard, each fed its rows in several random batches (some never fed)."""
    states = []
    for lo, hi in cuts(rng, n, int(rng.integers(1, 7))):
        r = make()
        if hi > lo or rng.random() < 0.5:
            for blo, bhi in cuts(rng, hi - lo, int(rng.integers(1, 5))):
                feed(r, lo + blo, lo + bhi)
        states.append(r)
    return states


def merge_tree(rng, states: list):
    pool = list(rng.permutation(len(states)))
    pool = [states[i] for i in pool]
    while len(pool) > 1:
        i, j = sorted(rng.choice(len(pool), 2, replace=False))
        a, b = pool.pop(j), pool.pop(i)
        pool.append(a.merge(b) if rng.random() < 0.5 else b.merge(a))
    return pool[0]


def roundtrip(r):
    sd = r.state_dict()
    for t in sd.values():
        assert t.device.type == "cpu" and t.is_contiguous()
    return type(r).from_state_dict(st_load(st_save(sd)))


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """torch.equal, but NaN equals NaN (empty states keep NaN means)."""
    a, b = a.cpu().contiguous(), b.cpu().contiguous()
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(bitwise_equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- brute force

def brute_topk(x: np.ndarray, toks: np.ndarray, k: int, largest: bool):
    M, N = x.shape
    values = np.full((k, N), -np.inf if largest else np.inf, np.float32)
    out_toks = np.full((k, N), -1, np.int64)
    for n in range(N):
        keep = ~np.isnan(x[:, n])
        col, t = x[keep, n], toks[keep]
        order = np.lexsort((t, -col if largest else col))[:k]  # value first, then lower tok
        values[: len(order), n] = col[order]
        out_toks[: len(order), n] = t[order]
    return values, out_toks


def brute_bin(bins: HistogramBins, v: np.ndarray) -> np.ndarray:
    lo, hi = bins.edges()
    v = v.astype(np.float64)
    pos = np.searchsorted(lo, v, side="right") - 1  # last bin with lo <= v
    neg = np.searchsorted(hi, v, side="left")  # first bin with hi >= v
    out = np.where(v > 0, pos, neg)
    out = np.where(v == 0, bins.zero_bin, out)
    return np.where(np.isnan(v), bins.n_bins - 1, out)


# ---------------------------------------------------------------- top-k

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(4))
def test_topk_exact_under_sharding(device, seed):
    rng = np.random.default_rng(seed)
    M, N, k = int(rng.integers(0, 400)), 27, int(rng.choice([1, 5, 40]))
    x, toks = make_x(rng, M, N), make_toks(rng, M)
    if seed == 3:
        x[rng.random(x.shape) < 0.05] = np.nan
        x[0, :3], x[1, :3] = np.inf, -np.inf
    xt, tt = torch.from_numpy(x).to(device), torch.from_numpy(toks).to(device)
    for largest in (True, False):
        want_v, want_t = brute_topk(x, toks, k, largest)
        finals = []
        for _ in range(3):
            states = sharded(rng, M, lambda: TopK(k, largest), lambda r, lo, hi: r.update(xt[lo:hi], tt[lo:hi]))
            if not any(s.keys is not None for s in states):
                states[0].update(xt[:0], tt[:0])  # learn N
            before = [s.state_dict() for s in states]
            merged = merge_tree(rng, states)
            assert all(same_state(b, s.state_dict()) for b, s in zip(before, states)), "merge mutated an input"
            v, t = merged.finalize()
            assert v.device.type == device and v.dtype == torch.float32 and t.dtype == torch.int64
            np.testing.assert_array_equal(t.cpu().numpy(), want_t)
            np.testing.assert_array_equal(v.cpu().numpy(), want_v)
            finals.append(merged.state_dict())
            again = roundtrip(merged)
            assert same_state(again.state_dict(), merged.state_dict())
        assert same_state(finals[0], finals[1]) and same_state(finals[1], finals[2])  # bitwise order-free
        assert not np.isnan(finals[0]["values"].numpy()[finals[0]["toks"].numpy() >= 0]).any()


def test_topk_roundtrip_keeps_updating_identically():
    rng = np.random.default_rng(7)
    x, toks = torch.from_numpy(make_x(rng, 300, 18)), torch.from_numpy(make_toks(rng, 300))
    for largest in (True, False):
        a = TopK(9, largest)
        a.update(x[:100], toks[:100])
        b = roundtrip(a)
        a.update(x[100:], toks[100:])
        b.update(x[100:], toks[100:])
        assert same_state(a.state_dict(), b.state_dict())
        empty = roundtrip(TopK(9, largest))
        assert empty.keys is None and same_state(empty.merge(a).state_dict(), a.state_dict())


def test_topk_too_few_rows_and_limits():
    t = TopK(4, largest=False)
    t.update(torch.tensor([[1.0, np.nan], [-2.0, np.nan]]), torch.tensor([5, 3]))
    v, tok = t.finalize()
    assert tok.tolist() == [[3, -1], [5, -1], [-1, -1], [-1, -1]]
    assert v[2:].isinf().all() and (v[2:] > 0).all() and v[:, 1].isposinf().all()
    with pytest.raises(ValueError, match="2\\*\\*31"):
        t.update(torch.zeros(1, 2), torch.tensor([2**31]))
    with pytest.raises(ValueError, match="2\\*\\*31"):
        t.update(torch.zeros(1, 2), torch.tensor([-1]))
    with pytest.raises(ValueError):
        t.merge(TopK(4, largest=True))
    with pytest.raises(ValueError):
        t.merge(TopK(5, largest=False))


# ---------------------------------------------------------------- contexts

def brute_contexts(x: np.ndarray, toks: np.ndarray, k: int):
    B, T, N = x.shape
    values = np.full((k, N), -np.inf, np.float32)
    out = np.full((k, N), -1, np.int64)
    for n in range(N):
        peaks, peak_toks = [], []
        for b in range(B):
            ok = (toks[b] >= 0) & ~np.isnan(x[b, :, n])
            if not ok.any():
                continue
            col, t = x[b, ok, n], toks[b, ok]
            peaks.append(col.max())
            peak_toks.append(t[col == col.max()].min())
        peaks, peak_toks = np.array(peaks, np.float32), np.array(peak_toks, np.int64)
        order = np.lexsort((peak_toks, -peaks))[:k]
        values[: len(order), n] = peaks[order]
        out[: len(order), n] = peak_toks[order]
    return values, out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(3))
def test_context_topk_exact_under_sharding(device, seed):
    rng = np.random.default_rng(100 + seed)
    B, T, N, k = int(rng.integers(1, 40)), 11, 14, int(rng.choice([1, 3, 50]))
    x = make_x(rng, B * T, N).reshape(B, T, N)
    x[rng.random(x.shape) < 0.02] = np.nan
    toks = (np.arange(B * T, dtype=np.int64).reshape(B, T) * 7 + 2**30) % (2**31 - 1)
    length = rng.integers(0, T + 1, B)  # padding after `length`; length 0: nothing mined
    toks[np.arange(T)[None, :] >= length[:, None]] = -1
    toks[rng.random((B, T)) < 0.1] = -1  # not-mined positions inside a context too
    want_v, want_t = brute_contexts(x, toks, k)
    xt, tt = torch.from_numpy(x).to(device), torch.from_numpy(toks).to(device)
    finals = []
    for _ in range(3):
        states = sharded(rng, B, lambda: ContextTopK(k), lambda r, lo, hi: r.update(xt[lo:hi], tt[lo:hi]))
        merged = merge_tree(rng, states)
        v, t = merged.finalize()
        np.testing.assert_array_equal(t.cpu().numpy(), want_t)
        np.testing.assert_array_equal(v.cpu().numpy(), want_v)
        finals.append(roundtrip(merged).state_dict())
    assert same_state(finals[0], finals[1]) and same_state(finals[0], finals[2])


@pytest.mark.parametrize("seed", range(4))
def test_floors_from_other_shards_leave_the_merge_unchanged(seed):
    """A shard may drop whatever ranks below another completed shard's k-th key (the actors do this
    across the shards they mine): the merge of floored states is bit-identical to the exact one."""
    rng = np.random.default_rng(900 + seed)
    B, T, N, k = 48, 9, 20, int(rng.choice([1, 4, 16]))
    x = make_x(rng, B * T, N)
    x[rng.random(x.shape) < 0.02] = np.nan
    toks = np.arange(B * T, dtype=np.int64)
    ctx_toks = toks.reshape(B, T).copy()
    ctx_toks[rng.random((B, T)) < 0.1] = -1
    xt, tt, ct = torch.from_numpy(x), torch.from_numpy(toks), torch.from_numpy(ctx_toks)
    shards = cuts(rng, B, 5)
    kinds = {"top": lambda: TopK(k, True), "bottom": lambda: TopK(k, False), "contexts": lambda: ContextTopK(k)}

    def feed(r, lo, hi):  # shard = contexts lo..hi; rows in batches of 2 contexts
        for b in range(lo, hi, 2):
            e = min(hi, b + 2)
            if isinstance(r, ContextTopK):
                r.update(xt[b * T:e * T].view(e - b, T, N), ct[b:e])
            else:
                r.update(xt[b * T:e * T], tt[b * T:e * T])

    for name, make in kinds.items():
        exact = []
        for lo, hi in shards:
            r = make()
            feed(r, lo, hi)
            exact.append(r)
        keys = [(r.top if isinstance(r, ContextTopK) else r).keys for r in exact]
        floored = []
        for i, (lo, hi) in enumerate(shards):
            others = [j for j in range(len(shards)) if j != i and keys[j] is not None and rng.random() < 0.7]
            r = make()
            if others:
                r.set_floor(torch.stack([keys[j][-1] for j in others]).amax(0))
            feed(r, lo, hi)
            floored.append(r)
        want, got = exact[0], floored[0]
        for a, b in zip(exact[1:], floored[1:]):
            want, got = want.merge(a), got.merge(b)
        for w, g in zip(want.finalize(), got.finalize()):
            np.testing.assert_array_equal(g.numpy(), w.numpy(), err_msg=name)


def test_long_stream_ranks_sparsely_and_exactly():
    """Many batches: thresholds settle, later batches take the sparse path; still exact."""
    rng = np.random.default_rng(11)
    M, N, k = 6000, 40, 5
    x = make_x(rng, M, N)
    x[:, 1] = 0.0  # all ties: every row is a candidate at the threshold, dense path kept
    toks = rng.permutation(M).astype(np.int64)
    for largest in (True, False):
        r = TopK(k, largest)
        for lo in range(0, M, 300):
            r.update(torch.from_numpy(x[lo:lo + 300]), torch.from_numpy(toks[lo:lo + 300]))
        want_v, want_t = brute_topk(x, toks, k, largest)
        v, t = r.finalize()
        np.testing.assert_array_equal(t.numpy(), want_t)
        np.testing.assert_array_equal(v.numpy(), want_v)


def test_context_topk_half_precision_input():
    rng = np.random.default_rng(5)
    x = torch.from_numpy(make_x(rng, 60, 8).reshape(6, 10, 8)).to(torch.bfloat16)
    toks = torch.arange(60).reshape(6, 10)
    c = ContextTopK(4)
    c.update(x, toks)
    want_v, want_t = brute_contexts(x.float().numpy(), toks.numpy(), 4)
    v, t = c.finalize()
    np.testing.assert_array_equal(t.numpy(), want_t)
    np.testing.assert_array_equal(v.numpy(), want_v)


# ---------------------------------------------------------------- histogram and quantiles

@pytest.mark.parametrize("bins", [BINS, HistogramBins(1, -3, 2), HistogramBins(7, -126, 127)])
def test_bins_layout(bins):
    lo, hi = bins.edges()
    R = (bins.max_exp - bins.min_exp) * 2**bins.mantissa_bits
    assert bins.n_bins == 2 * R + 5 == len(lo) == len(hi)
    assert np.all(lo <= hi) and np.all(np.diff(lo) >= 0) and np.all(np.diff(hi) >= 0)
    assert lo[bins.zero_bin] == hi[bins.zero_bin] == 0
    assert lo[0] == -np.inf and hi[-1] == np.inf and hi[0] == -(2.0**bins.max_exp) and lo[-1] == 2.0**bins.max_exp
    assert hi[bins.zero_bin - 1] == 0 and lo[bins.zero_bin + 1] == 0  # underflow bins end at 0
    assert list(bins.positive_bins) == list(range(bins.zero_bin + 1, bins.n_bins))
    reg = np.r_[1 : R + 1, R + 4 : 2 * R + 4]
    octave = 2.0 ** np.floor(np.log2(np.minimum(abs(lo), abs(hi))[reg]))  # 2**e of the bin's |x|
    np.testing.assert_array_equal((hi - lo)[reg] / octave, 2.0**-bins.mantissa_bits)
    # every float32 edge maps into its own bin, and the float below/above into the neighbour
    edges = np.unique(np.r_[lo[1:-1], hi[1:-1]]).astype(np.float32)
    probe = np.r_[edges, np.nextafter(edges, np.float32(-np.inf)), np.nextafter(edges, np.float32(np.inf)),
                  np.float32([np.inf, -np.inf, np.nan, -np.nan, 1e-45, -1e-45, 3e38, -3e38])].astype(np.float32)
    got = bins.index(torch.from_numpy(probe)).numpy()
    np.testing.assert_array_equal(got, brute_bin(bins, probe))
    assert bins == HistogramBins.from_state_dict(bins.state_dict())


def check_bin_membership(bins: HistogramBins, v: np.ndarray, idx: np.ndarray) -> None:
    lo, hi = bins.edges()
    v = v.astype(np.float64)
    ok = ~np.isnan(v)
    v, idx = v[ok], idx[ok]
    pos, neg, zero = v > 0, v < 0, v == 0
    top = idx == bins.n_bins - 1  # positive overflow includes +inf
    assert np.all((lo[idx] <= v) & ((v < hi[idx]) | top) | ~pos)
    assert np.all((lo[idx] < v) & (v <= hi[idx]) | ~neg | (idx == 0))  # negative bins are (lo, hi]
    assert np.all((v <= hi[idx]) | (idx != 0))  # negative overflow includes -inf
    assert np.all(idx[zero] == bins.zero_bin) and np.all(idx[~zero] != bins.zero_bin)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(3))
def test_histogram_counts_exact_under_sharding(device, seed):
    rng = np.random.default_rng(200 + seed)
    bins = [BINS, HistogramBins(2, -3, 3), HistogramBins(6, -20, 20)][seed]
    M, N = int(rng.integers(1, 500)), 19
    x = make_x(rng, M, N)
    x[rng.random(x.shape) < 0.01] = np.inf
    x[rng.random(x.shape) < 0.01] = -np.inf
    x[rng.random(x.shape) < 0.01] = np.nan
    idx = brute_bin(bins, x)
    check_bin_membership(bins, x.ravel(), idx.ravel())
    np.testing.assert_array_equal(bins.index(torch.from_numpy(x)).numpy(), idx)
    want = np.stack([np.bincount(idx[:, n], minlength=bins.n_bins) for n in range(N)])
    xt = torch.from_numpy(x).to(device)
    finals = []
    for _ in range(3):
        states = sharded(rng, M, lambda: Histogram(bins), lambda r, lo, hi: r.update(xt[lo:hi]))
        before = [s.state_dict() for s in states]
        merged = merge_tree(rng, states)
        assert all(same_state(b, s.state_dict()) for b, s in zip(before, states))
        counts = merged.finalize()
        assert counts.dtype == torch.int64 and counts.device.type == device
        np.testing.assert_array_equal(counts.cpu().numpy(), want)
        again = roundtrip(merged)
        assert again.bins == bins and torch.equal(again.finalize(), counts.cpu())
        finals.append(counts.cpu())
    assert torch.equal(finals[0], finals[1]) and torch.equal(finals[0], finals[2])


QS = [0.0, 0.001, 0.01, 0.25, 0.5, 0.9, 0.999, 1.0]


@pytest.mark.parametrize("bins", [BINS, HistogramBins(2, -4, 3)])
def test_quantiles_within_bound(bins):
    rng = np.random.default_rng(300)
    M, N = 700, 36
    x = make_x(rng, M, N)
    h = Histogram(bins)
    for lo in range(0, M, 256):
        h.update(torch.from_numpy(x[lo : lo + 256]))
    counts = h.finalize().numpy()
    lo_e, hi_e = bins.edges()
    xd = x.astype(np.float64)
    vmin, vmax = xd.min(0), xd.max(0)
    for firing in (False, True):
        for q in QS:
            est = quantile_from_counts(counts, bins, q, vmin, vmax, firing_only=firing)
            assert est.shape == (N,)
            for n in range(N):
                col = np.sort(xd[:, n][xd[:, n] > 0] if firing else xd[:, n])
                if len(col) == 0:
                    assert np.isnan(est[n])
                    continue
                if q >= 1 or (q <= 0 and not firing):
                    assert est[n] == (col[-1] if q >= 1 else col[0])
                    continue
                true = col[max(1, int(np.ceil(q * len(col)))) - 1]
                b = int(brute_bin(bins, np.array([true]))[0])
                err = abs(est[n] - true)
                assert err <= quantile_error_bound(lo_e[b], hi_e[b], vmin[n], vmax[n]), (firing, q, n)
                if b in (bins.zero_bin - 1, bins.zero_bin + 1):
                    assert err <= 2.0 ** (bins.min_exp - 1)
                elif 0 < b < bins.n_bins - 1 and b != bins.zero_bin:
                    assert err <= 2.0 ** -(bins.mantissa_bits + 1) * abs(true)
            single = quantile_from_counts(counts[3], bins, q, vmin[3], vmax[3], firing_only=firing)
            assert isinstance(single, float) and (single == est[3] or np.isnan(single) and np.isnan(est[3]))
    assert np.isnan(quantile_from_counts(np.zeros(bins.n_bins, np.int64), bins, 0.5, np.nan, np.nan))
    assert fraction_of_max(4.0, 0.25) == 1.0
    np.testing.assert_array_equal(fraction_of_max(np.array([2.0, -4.0]), 0.5), [1.0, -2.0])


# ---------------------------------------------------------------- moments

def brute_moments(x: np.ndarray) -> dict:
    xd = x.astype(np.float64)
    n = len(xd)
    mean = xd.mean(0)
    d = xd - mean
    m2, m3, m4 = (d**2).mean(0), (d**3).mean(0), (d**4).mean(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        skew = np.where(m2 == 0, np.nan, m3 / m2**1.5)
        kurt = np.where(m2 == 0, np.nan, m4 / m2**2 - 3)
    return {"count": np.full(x.shape[1], n), "mean": mean, "std": np.sqrt(m2), "skew": skew, "kurtosis": kurt,
            "frac_active": (xd > 0).mean(0), "min": xd.min(0), "max": xd.max(0)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(3))
def test_moments_under_sharding(device, seed):
    rng = np.random.default_rng(400 + seed)
    M, N = int(rng.integers(1, 600)), 27
    x = make_x(rng, M, N)
    x[:, 3] = rng.standard_t(3, M) * 100 + 1e4  # heavy tail far from zero: centering matters
    want = brute_moments(x)
    xt = torch.from_numpy(x).to(device)
    for _ in range(3):
        states = sharded(rng, M, Moments, lambda r, lo, hi: r.update(xt[lo:hi]))
        before = [s.state_dict() for s in states]
        merged = merge_tree(rng, states)
        assert all(same_state(b, s.state_dict()) for b, s in zip(before, states))
        for got in (merged.finalize(), roundtrip(merged).finalize()):
            assert set(got) == set(want)
            np.testing.assert_array_equal(got["count"], want["count"])
            for key in ("min", "max", "frac_active"):
                np.testing.assert_array_equal(got[key], want[key])
            scale = np.where(want["std"] > 0, np.abs(want["mean"]) + want["std"], 1.0)
            np.testing.assert_allclose(got["mean"] / scale, want["mean"] / scale, rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(got["std"] / scale, want["std"] / scale, rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(got["skew"], want["skew"], rtol=1e-9, atol=1e-9)
            np.testing.assert_allclose(got["kurtosis"], want["kurtosis"], rtol=1e-9, atol=1e-9)
    dead = np.isnan(want["skew"])
    assert dead[5] and dead[6]  # constant and dead neurons


def test_moments_empty_is_identity():
    x = torch.from_numpy(make_x(np.random.default_rng(1), 50, 9))
    a = Moments()
    a.update(x)
    for empty in (Moments(), roundtrip(Moments())):
        fed_nothing = Moments()
        fed_nothing.update(x[:0])
        for e in (empty, fed_nothing):
            for m in (a.merge(e), e.merge(a)):
                assert same_state(m.state_dict(), a.state_dict())
    assert Moments().finalize()["mean"].shape == (0,)
    assert np.isnan(fed_nothing.finalize()["mean"]).all() and (fed_nothing.finalize()["count"] == 0).all()


# ---------------------------------------------------------------- timing (printed, not asserted)

def test_update_timings():
    torch.manual_seed(0)
    xs = [torch.randn(1024, 1536) for _ in range(6)]
    toks = [torch.arange(1024) + 1024 * i for i in range(6)]
    ctx = torch.randn(4, 256, 1536)

    def ms(f, reps=5):
        f()
        start = time.perf_counter()
        for _ in range(reps):
            f()
        return (time.perf_counter() - start) / reps * 1e3

    def stream(make):  # mean over 6 fresh batches fed in turn to one reducer
        r = make()
        start = time.perf_counter()
        for x, t in zip(xs, toks):
            r.update(x, t)
        return (time.perf_counter() - start) / len(xs) * 1e3

    x, tok = xs[0], toks[0]
    hist, mom, contexts = Histogram(BINS), Moments(), ContextTopK(32)
    print(f"\n(1024, 1536) float32 update on {torch.get_num_threads()} threads, ms:"
          f" torch.topk {ms(lambda: torch.topk(x, 32, dim=0)):.1f}"
          f" | TopK first batch {ms(lambda: TopK(32).update(x, tok)):.1f}"
          f" | TopK 6-batch stream {stream(lambda: TopK(32)):.1f}"
          f" | bottom-k 6-batch stream {stream(lambda: TopK(32, False)):.1f}"
          f" | ContextTopK (4, 256, 1536) {ms(lambda: contexts.update(ctx, tok.view(4, 256))):.1f}"
          f" | Histogram {ms(lambda: hist.update(x)):.1f}"
          f" | Moments {ms(lambda: mom.update(x)):.1f}")


@pytest.mark.parametrize("seed", range(4))
def test_context_topk_fast_path_equals_brute_force_with_ties(seed):
    """Rising toks (the miner's contexts) take the one-max-per-context path; ties (equal peaks, -0.0
    and +0.0), padding, NaN and -inf contexts must still give the brute-force answer."""
    rng = np.random.default_rng(700 + seed)
    B, T, N, k = 24, 9, 12, int(rng.choice([1, 4, 30]))
    x = rng.integers(-3, 4, (B, T, N)).astype(np.float32)  # small integers: many equal peaks
    x[x == 0] = np.where(rng.random((x == 0).sum()) < 0.5, -0.0, 0.0)
    toks = np.arange(B * T, dtype=np.int64).reshape(B, T) + 5
    toks[:, 0] = -1  # BOS
    toks[np.arange(T)[None, :] >= rng.integers(1, T + 1, B)[:, None]] = -1  # padding
    if seed % 2:
        x[0, 3, 2] = np.nan
        x[1, :, 4] = -np.inf
    want_v, want_t = brute_contexts(x, toks, k)
    c = ContextTopK(k)
    for lo in range(0, B, 5):
        c.update(torch.from_numpy(x[lo:lo + 5]), torch.from_numpy(toks[lo:lo + 5]))
    v, t = c.finalize()
    np.testing.assert_array_equal(t.numpy(), want_t)
    np.testing.assert_array_equal(v.numpy(), want_v)
