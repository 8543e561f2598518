"""QuantileSamples against brute force on the concatenated data, under random sharding and merge trees."""

import numpy as np
import pytest
import torch
from test_reducers import cuts, make_toks, make_x, merge_tree, roundtrip, same_state, sharded

from mining.reducers import Histogram, HistogramBins, QuantileSamples
from mining.reducers.samples import FRAC_BANDS, RANK_BANDS, priority

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SMALL = HistogramBins(2, -6, 3)  # few bins, so cells overflow m and truncation is exercised

# ---------------------------------------------------------------- brute force

M31 = (1 << 31) - 1


def _round31(z):
    z = (z * 0x7FEB352D) & M31
    z ^= z >> 15
    z = (z * 0x846CA68B) & M31
    return z ^ (z >> 16)


def np_priority(toks: np.ndarray, n: int) -> np.ndarray:
    """Independent numpy (uint64, no wrapping tricks) version of the hash: (M, n)."""
    t = toks.astype(np.uint64)
    a = _round31(_round31(t ^ (t >> np.uint64(16))))
    z = (np.arange(n, dtype=np.uint64) ^ np.uint64(0x5DEECE66D1234567)) + np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    b = (z ^ (z >> np.uint64(31))) >> np.uint64(33)
    return _round31(a[:, None] ^ b[None, :]).astype(np.int64)


def brute_cells(q: QuantileSamples, x: np.ndarray, toks: np.ndarray):
    """Per (neuron, cell): toks and values of the m smallest priorities, ascending."""
    M, N = x.shape
    cell = q.cell_of_bin()[q.bins.index(torch.from_numpy(x)).numpy()]
    prio = np_priority(toks, N)
    out_t = np.full((N, q.n_cells, q.m), -1, np.int64)
    out_v = np.full((N, q.n_cells, q.m), np.nan, np.float32)
    for n in range(N):
        for c in np.unique(cell[:, n]):
            rows = np.nonzero(cell[:, n] == c)[0]
            rows = rows[np.argsort(prio[rows, n])][: q.m]
            out_t[n, c, : len(rows)], out_v[n, c, : len(rows)] = toks[rows], x[rows, n]
    return out_t, out_v


def brute_band(bins, x, toks, prio, n, kind, a, b, vmax):
    """All band tokens of neuron n in the order the band is sampled: (e, tok) ascending."""
    col = x[:, n]
    binidx = bins.index(torch.from_numpy(col.copy())).numpy()
    counts = np.bincount(binidx, minlength=bins.n_bins)
    if kind == "frac_max":
        if not vmax > 0:
            return np.zeros(0, np.int64), np.zeros(0)
        lo, hi = a / 100 * vmax, b / 100 * vmax
        keep = (col.astype(np.float64) > lo) & (col.astype(np.float64) <= hi)
        e = prio[:, n].astype(np.float64)
    else:
        ok = col > 0 if kind == "firing" else np.ones(len(col), bool)
        ok |= np.isnan(col) & (kind == "firing")  # NaN sits in the positive overflow bin
        srt = np.sort(binidx[ok], kind="stable")  # the bins of the order statistics
        r_lo, r_hi = (a * len(srt)) // 100 + 1, (b * len(srt)) // 100
        w = np.bincount(srt[r_lo - 1: r_hi], minlength=bins.n_bins) if r_hi >= r_lo else np.zeros(bins.n_bins, np.int64)
        keep = ok & (w[binidx] > 0)
        with np.errstate(divide="ignore"):
            s = counts / np.where(w > 0, w, 1)
        e = prio[:, n] * s[binidx]
    rows = np.nonzero(keep)[0]
    rows = rows[np.lexsort((toks[rows], e[rows]))]
    return toks[rows], col[rows]


def feed_all(rng, x, toks, q_make, device):
    xt, tt = torch.from_numpy(x).to(device), torch.from_numpy(toks).to(device)
    states = sharded(rng, len(x), q_make, lambda r, lo, hi: r.update(xt[lo:hi], tt[lo:hi]))
    if not any(s.prio is not None for s in states):
        states[0].update(xt[:0], tt[:0])
    return states


# ---------------------------------------------------------------- tests


def test_priority_matches_numpy_and_is_a_bijection():
    toks = np.concatenate([np.arange(5000), 2**31 - 1 - np.arange(100), [2**30, 12345678]]).astype(np.int64)
    p = priority(torch.from_numpy(toks), 37).numpy()
    np.testing.assert_array_equal(p, np_priority(toks, 37))
    assert p.min() >= 0 and p.max() < 2**31
    for n in range(37):
        assert len(np.unique(p[:, n])) == len(toks)  # distinct per neuron: no ties to break
    # roughly uniform, and neurons look independent
    u = p / 2**31
    assert abs(u.mean() - 0.5) < 0.01 and abs(np.corrcoef(u[:, 0], u[:, 1])[0, 1]) < 0.05


def test_cells_match_bins():
    for bins, coarse in [(HistogramBins(), None), (HistogramBins(), 4), (SMALL, 0), (HistogramBins(0, -126, 127), 0)]:
        q = QuantileSamples(bins, 3, coarse)
        x = make_x(np.random.default_rng(0), 200, 9) * np.float32(3.0)
        x[0, :6] = [np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0]
        x[1, :3] = np.frombuffer(np.uint32([0xFFC00000, 1, 0x80000001]).tobytes(), np.float32)  # -NaN, denormals
        xt = torch.from_numpy(x)
        want = q.cells.index32(xt) + torch.arange(9, dtype=torch.int32) * q.n_cells
        assert torch.equal(q._flat_cell(xt), want)
        cob = q.cell_of_bin()
        assert np.all(np.diff(cob) >= 0) and cob[-1] == q.n_cells - 1
        np.testing.assert_array_equal(cob[bins.index(xt).numpy()], q.cells.index(xt).numpy())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(4))
def test_cells_exact_under_sharding(device, seed):
    rng = np.random.default_rng(seed)
    M, N, m = int(rng.integers(0, 500)), 18, int(rng.choice([1, 3, 8]))
    x, toks = make_x(rng, M, N), make_toks(rng, M)
    if seed == 3:
        x[rng.random(x.shape) < 0.03] = np.nan
    want_t, want_v = brute_cells(QuantileSamples(SMALL, m, 1), x, toks)
    finals = []
    for _ in range(3):
        states = feed_all(rng, x, toks, lambda: QuantileSamples(SMALL, m, 1), device)
        before = [s.state_dict() for s in states]
        merged = merge_tree(rng, states)
        assert all(same_state(b, s.state_dict()) for b, s in zip(before, states)), "merge mutated an input"
        assert merged.prio.device.type == device
        sd = merged.state_dict()
        np.testing.assert_array_equal(sd["toks"].numpy(), want_t)
        np.testing.assert_array_equal(sd["values"].numpy(), want_v)
        finals.append(sd)
        again = roundtrip(merged)
        assert same_state(again.state_dict(), sd)
        assert torch.equal(again.prio.cpu(), merged.prio.cpu()) and torch.equal(again._limit.cpu(), merged._limit.cpu())
    assert same_state(finals[0], finals[1]) and same_state(finals[1], finals[2])


def test_roundtrip_keeps_updating_identically():
    rng = np.random.default_rng(7)
    x, toks = make_x(rng, 600, 11), make_toks(rng, 600)
    xt, tt = torch.from_numpy(x), torch.from_numpy(toks)
    a = QuantileSamples(SMALL, 4, 1)
    a.update(xt[:300], tt[:300])
    b = roundtrip(a)
    for r in (a, b):
        r.update(xt[300:], tt[300:])
    assert same_state(a.state_dict(), b.state_dict())
    empty = roundtrip(QuantileSamples(SMALL, 4, 1))
    assert empty.prio is None and empty.merge(a).state_dict()["toks"].shape == (11, a.n_cells, 4)


def finalize_for(q, x):
    h = Histogram(q.bins)
    h.update(torch.from_numpy(x))
    return q.finalize(h.finalize().numpy(), np.nanmin(x, axis=0), np.nanmax(x, axis=0))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("m,coarse", [(3, 1), (8, 2), (400, 2)])
def test_bands_exact_prefix_and_bounds(seed, m, coarse):
    rng = np.random.default_rng(100 + seed)
    M, N = int(rng.integers(50, 500)), 18
    x, toks = make_x(rng, M, N), make_toks(rng, M)
    if seed == 3:
        x[:, 0] = rng.standard_cauchy(M) ** 3  # extreme heavy tail
        x[:5, 1] = np.nan
    bins = SMALL if seed % 2 else HistogramBins()
    states = feed_all(rng, x, toks, lambda: QuantileSamples(bins, m, min(coarse, bins.mantissa_bits)), "cpu")
    res = finalize_for(merge_tree(rng, states), x)
    prio = np_priority(toks, N)
    lo_e, hi_e = bins.edges()
    vmax = np.nanmax(x, axis=0)
    for kind, bands in [("all", RANK_BANDS), ("firing", RANK_BANDS), ("frac_max", FRAC_BANDS)]:
        r = res[kind]
        assert r["labels"][0] == f"{bands[0][0]}-{bands[0][1]}" and r["values"].shape == (N, len(bands), m)
        for j, (a, b) in enumerate(bands):
            for n in range(N):
                bt, bv = brute_band(bins, x, toks, prio, n, kind, a, b, vmax[n])
                t, v, k = r["toks"][n, j], r["values"][n, j], r["n_exact"][n, j]
                got = t >= 0
                assert got.sum() <= min(m, len(bt)), (kind, a, n)
                assert np.all(got[: got.sum()]) and k <= got.sum()
                np.testing.assert_array_equal(t[:k], bt[:k])  # exact: the brute-force band sample
                np.testing.assert_array_equal(v[:k], bv[:k])
                assert set(t[got]) <= set(bt)  # everything returned belongs to the band
                if m >= M:  # nothing was ever truncated: the whole answer is exact
                    assert k == min(m, len(bt)) == got.sum()
                vv = v[got][~np.isnan(v[got])].astype(np.float64)
                if kind == "frac_max":
                    assert np.all((vv > r["lo"][n, j]) & (vv <= r["hi"][n, j]))
                elif got.any():
                    assert np.all((vv >= r["lo"][n, j]) & (vv <= r["hi"][n, j]))
                    if kind == "all" and not np.isnan(x[:, n]).any():
                        # lo/hi are the band's exact value range widened by at most one bin per edge
                        srt = np.sort(x[:, n].astype(np.float64))
                        r_lo, r_hi = (a * M) // 100 + 1, (b * M) // 100
                        e_lo, e_hi = srt[r_lo - 1], srt[r_hi - 1]
                        b_lo, b_hi = bins.index(torch.tensor([e_lo, e_hi]).float()).numpy()
                        assert r["lo"][n, j] <= e_lo and r["hi"][n, j] >= e_hi
                        assert r["lo"][n, j] >= max(lo_e[b_lo], srt[0]) and r["hi"][n, j] <= min(hi_e[b_hi], srt[-1])
                        assert r["n"][n, j] == r_hi - r_lo + 1


def test_bands_mostly_exact_on_smooth_data():
    """Default cells, a realistic shape: most bands get m exact samples, none of them off-band."""
    rng = np.random.default_rng(5)
    M, N, m = 20000, 12, 8
    x = (rng.normal(size=(M, N)) * np.exp(rng.normal(size=(M, 1)))).astype(np.float32)
    x[:, :4] = np.maximum(x[:, :4], 0)  # relu-like: half zeros
    toks = make_toks(rng, M)
    q = QuantileSamples(HistogramBins(), m)
    for lo, hi in cuts(rng, M, 20):
        q.update(torch.from_numpy(x[lo:hi]), torch.from_numpy(toks[lo:hi]))
    res = finalize_for(q, x)
    prio, vmax = np_priority(toks, N), x.max(axis=0)
    for kind, bands in [("all", RANK_BANDS), ("firing", RANK_BANDS), ("frac_max", FRAC_BANDS)]:
        size = np.array([[len(brute_band(q.bins, x, toks, prio, n, kind, a, b, vmax[n])[0]) for a, b in bands]
                         for n in range(N)])
        want = np.minimum(size, m)  # what a brute-force band sample would return
        k, got = res[kind]["n_exact"], (res[kind]["toks"] >= 0).sum(-1)
        assert np.all(k <= got) and np.all(got <= want)
        assert np.mean(k == want) > 0.75 and k.sum() > 0.85 * want.sum(), (kind, k, want)  # measured 0.80 / 0.90
        assert np.mean(got == want) > 0.95, (kind, got, want)
    # the half-zero neurons: the 0-25 and 25-50 bands are exact zeros
    assert np.all(res["all"]["values"][:4, :2] == 0) and np.all(res["all"]["n_exact"][:4, :2] == m)


def test_validation():
    with pytest.raises(ValueError):
        QuantileSamples(HistogramBins(), 0)
    with pytest.raises(ValueError):
        QuantileSamples(HistogramBins(2, -4, 3), 4, coarse=3)
    q = QuantileSamples(SMALL, 2)
    q.update(torch.zeros(3, 4), torch.arange(3))
    with pytest.raises(ValueError):
        q.update(torch.zeros(3, 5), torch.arange(3))
    with pytest.raises(ValueError):
        q.merge(QuantileSamples(SMALL, 3))
    with pytest.raises(ValueError):
        q.update(torch.zeros(1, 4), torch.tensor([2**31]))
