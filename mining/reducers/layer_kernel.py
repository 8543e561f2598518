"""One read of a hook's batch for its whole standard set: top/bottom-k, top contexts, histogram, moments.

The CPU kernel behind reducers/fused.py. What it costs is memory traffic more than arithmetic, so the
layout follows the memory:

- Each thread owns a contiguous range of columns (a part: half the columns with two threads) and walks
  the mined rows in order. A row's part is kilobytes of contiguous floats, which the hardware prefetcher
  streams; 64-column blocks (kernels.py's layout) read 256-byte pieces 6 KiB apart, which it cannot,
  and measured twice as slow on a batch fresh from the MLP.
- Rows go in chunks of CHUNK_ROWS (64 rows x 768 columns x 4 B = 192 KiB at 1,536 columns on two
  threads), small enough to stay in L2: the moments' centred second pass re-reads the chunk from
  there, about the chunk's own mean, and the chunk merges into the batch's moments with Pébay's
  formulas (as moments.py merges batches). kernels._moments uses the same chunks, so a batch's moments
  are the same bits whichever kernel ran it (an actor with top-k floors takes this one sooner).
- Every value is tested against its column's top and bottom thresholds in the same vectorised loop as
  the statistics; the rare candidates then go into a (columns, k) copy of the top-k keys, whose columns
  are contiguous, and the copy goes back at the end.
- Histogram bins are written per row as uint16 into a scratch buffer laid out by sub-block, then added
  to Histogram.pending's L1-sized uint16 blocks one sub-block at a time.

tests/test_kernels.py checks the states it leaves against the reducers' own torch updates: bit for bit,
moments to rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import kernels
from .kernels import CHUNK_ROWS, HIST_SB, numba


if numba is not None:
    from numba import njit, prange
    from numba.cpython.unsafe.numbers import trailing_zeros

    from .kernels import _bins_to, _centred_row, _count_bins, _fold_chunk, _insert, _jit, _key, _kth

    i32 = np.int32
    _inline = dict(inline="always", boundscheck=False)

    @njit(**_inline)
    def _row_pass(row, s, mn, mx, na, bad, tk, bk, cand, best, at, t, do_ctx):  # pragma: no cover - compiled
        """Statistics, candidate flags (cand) and the context's running peak of one row; returns the number of
        candidates. Branch-free, so it vectorises; the two loops spare the ranked case the peak."""
        n = 0
        if do_ctx:
            for j in range(len(row)):
                v = row[j]
                s[j] += v
                mn[j] = min(mn[j], v)
                mx[j] = max(mx[j], v)
                na[j] += v > 0
                bad[j] += (v - v) != 0  # NaN for NaN and for +-inf
                c = (v >= tk[j]) | (v <= bk[j])
                cand[j] = c
                n += c
                gt = v > best[j]  # strict: the first position of the peak stays
                best[j] = v if gt else best[j]
                at[j] = t if gt else at[j]
        else:
            for j in range(len(row)):
                v = row[j]
                s[j] += v
                mn[j] = min(mn[j], v)
                mx[j] = max(mx[j], v)
                na[j] += v > 0
                bad[j] += (v - v) != 0
                c = (v >= tk[j]) | (v <= bk[j])
                cand[j] = c
                n += c
        return n

    @njit(**_inline)
    def _insert_local(keys, j, key):  # pragma: no cover - compiled
        """kernels._insert on a (columns, k) copy: the column's keys are contiguous, so the insert can be
        branch-free and vectorised: slot p keeps its key, takes the new one, or takes slot p - 1's (walked
        downwards, p - 1 is still the old key). 8 against 12 ns an insert where a shift loop mispredicts its exit."""
        k = keys.shape[1]
        if key <= keys[j, k - 1]:
            return
        col = keys[j]
        for p in range(k - 1, 0, -1):
            col[p] = max(col[p], min(col[p - 1], key))
        col[0] = max(col[0], key)

    @njit(**_inline)
    def _insert_candidates(row, bits_row, tok, tk, bk, top, top_floor, bot, bot_floor, c0, cand):  # pragma: no cover
        words = cand.view(np.uint64)  # eight 0/1 flags at a time, visited by their set bits: no branch per flag
        for q in range(len(words)):
            wq = words[q]
            while wq:
                j = 8 * q + (trailing_zeros(wq) >> 3)
                wq &= wq - np.uint64(1)
                if row[j] >= tk[j]:
                    key = _key(bits_row[j], tok, True)
                    if key >= top_floor[c0 + j]:
                        _insert_local(top, j, key)
                if row[j] <= bk[j]:
                    key = _key(bits_row[j], tok, False)
                    if key >= bot_floor[c0 + j]:
                        _insert_local(bot, j, key)

    @njit(**_inline)
    def _quotient_row(u, scale, out):  # pragma: no cover - compiled
        """u / scale in float32, as DlaBatch's torch division: the same bits."""
        for j in range(len(u)):
            out[j] = np.float32(u[j] / scale)

    @njit(**_inline)
    def _quotient_has_nan(xf, rows, scale, M, c):  # pragma: no cover - compiled
        for i in range(M):
            v = np.float32(xf[rows[i], c] / scale[i])
            if v != v:
                return True
        return False

    @njit(**_inline)
    def _product_row(a, kept, fresh, r, c0, o):  # pragma: no cover - compiled
        """o = g[c0:c0 + len(a)] * a in float32 (DlaBatch's torch product: the same bits), g the row kept[r] if r >= 0,
        else fresh[-1 - r]."""
        g = kept[r] if r >= 0 else fresh[-1 - r]
        for j in range(len(a)):
            o[j] = g[c0 + j] * a[j]

    @njit(**_jit)
    def _gain_product(x, sel, kept, fresh, src, out):  # pragma: no cover - compiled
        """out[i] = g * x[sel[i]] in float32, the product DlaBatch's torch ops take (the same bits), with g the row
        kept[src[i]] where src[i] >= 0, else fresh[-1 - src[i]]."""
        for i in prange(len(sel)):
            _product_row(x[sel[i]], kept, fresh, src[i], 0, out[i])

    @njit(**_inline)
    def _local_keys(keys, c0, w):  # pragma: no cover - compiled
        k = keys.shape[0]
        out = np.empty((w, k), np.int64)
        for i in range(k):
            for j in range(w):
                out[j, i] = keys[i, c0 + j]
        return out

    @njit(**_inline)
    def _store_keys(keys, local, c0):  # pragma: no cover - compiled
        w, k = local.shape
        for i in range(k):
            for j in range(w):
                keys[i, c0 + j] = local[j, i]

    @njit(boundscheck=False, nogil=True, cache=True)
    def _count_part(bins, pending, c0, w, M):  # pragma: no cover - compiled
        """A part's histogram scratch (subs, >= M, HIST_SB) added to its columns' pending blocks, one sub-block at a
        time. A function of its own, called, not inlined: the same loop inlined into _layer's parallel body ran
        0.3-0.5 ms a layer slower (of about 5)."""
        for q in range(0, w, HIST_SB):
            _count_bins(bins[q // HIST_SB, :M, :min(HIST_SB, w - q)], pending[(c0 + q) // HIST_SB])

    @njit(**_jit)
    def _layer(x, xi, mined, tok, top, top_floor, bot, bot_floor, do_ctx, ctx, ctx_floor, ctx_bad,
               hist, shift, offset, R, zero_bin, n_bins, pending, bin_rows, step,
               divide, scale, mean, m2, m3, m4, active, lo, hi,
               prod, urow, kept, fresh, src, u):  # pragma: no cover - compiled
        """x (B, T, N), xi its bits; each part of `step` columns (a multiple of HIST_SB) is one thread's.
        bin_rows: scratch (parts, step // HIST_SB, M, HIST_SB) uint16 for the histogram. Columns whose
        context peaks are not all finite are flagged in ctx_bad and left to ContextTopK's exact path.
        divide: the values are not x but, for the i-th mined row, x[row] / scale[i] (direct logit attribution's
        division by the final norm's scale), computed a chunk at a time and never stored whole.
        prod: also write DLA's numerator while each row is in L1 (see gain_product): u[urow[i]] = g * x[rows[i]] where
        urow[i] >= 0, g the row kept[src[s]] or fresh[-1 - src[s]] of s = urow[i]."""
        B, T, N = x.shape
        shift, offset, R, zero_bin, n_bins = i32(shift), i32(offset), i32(R), i32(zero_bin), i32(n_bins)
        rows = np.empty(B * T, np.int64)  # the mined positions, in order
        M = 0
        for b in range(B):
            for t in range(T):
                if mined[b, t]:
                    rows[M] = b * T + t
                    M += 1
        xf, xif = x.reshape(B * T, N), xi.reshape(B * T, N)
        for part in prange((N + step - 1) // step):
            c0 = part * step
            c1 = min(N, c0 + step)
            w = c1 - c0
            tk, bk, ck = _kth(top, top_floor, c0, w, True), _kth(bot, bot_floor, c0, w, False), _kth(ctx, ctx_floor, c0, w, True)
            top_l, bot_l = _local_keys(top, c0, w), _local_keys(bot, c0, w)
            s = np.zeros(w)  # the chunk's sum
            mn, mx = np.full(w, np.inf, np.float32), np.full(w, -np.inf, np.float32)
            na, bad = np.zeros(w, np.int64), np.zeros(w, np.int64)
            cm, c2, c3, c4 = np.zeros(w), np.zeros(w), np.zeros(w), np.zeros(w)  # the batch's moments so far
            total = np.zeros(w)  # the batch's sum: its mean, as torch's, is -inf, not NaN, where a -inf is mined
            a2, a3, a4 = np.zeros(w), np.zeros(w), np.zeros(w)  # the chunk's
            cand = np.zeros((w + 7) // 8 * 8, np.uint8)
            peaks = np.empty((B, w), np.float32)  # each context's peak and its first position
            peak_bits = peaks.view(np.int32)
            where = np.empty((B, w), np.int32)
            has = np.zeros(B, np.bool_)
            best = np.empty(w, np.float32)
            at = np.empty(w, np.int32)
            bins = bin_rows[part]
            vals = np.empty((CHUNK_ROWS if divide else 1, w), np.float32)  # a chunk of divided values
            val_bits = vals.view(np.int32)
            cur = -1  # the context being walked
            done = 0.0
            for r0 in range(0, M, CHUNK_ROWS):
                r1 = min(M, r0 + CHUNK_ROWS)
                s[:] = 0.0
                if divide:
                    for i in range(r0, r1):
                        _quotient_row(xf[rows[i], c0:c1], scale[i], vals[i - r0])
                for i in range(r0, r1):
                    p = rows[i]
                    b = p // T
                    t = p - b * T
                    if b != cur:
                        if cur >= 0:
                            peaks[cur] = best
                            where[cur] = at
                        cur = b
                        has[b] = True
                        best[:] = -np.inf
                        at[:] = np.int32(t)
                    row = vals[i - r0] if divide else xf[p, c0:c1]
                    bits_row = val_bits[i - r0] if divide else xif[p, c0:c1]
                    if prod and urow[i] >= 0:
                        _product_row(row, kept, fresh, src[urow[i]], c0, u[urow[i], c0:c1])
                    if _row_pass(row, s, mn, mx, na, bad, tk, bk, cand, best, at, np.int32(t), do_ctx):
                        _insert_candidates(row, bits_row, tok[b, t], tk, bk, top_l, top_floor, bot_l, bot_floor, c0, cand)
                    if hist:
                        for q in range(0, w, HIST_SB):
                            _bins_to(bits_row[q:q + HIST_SB], shift, offset, R, zero_bin, n_bins, bins[q // HIST_SB, i])
                n_chunk = float(r1 - r0)
                mu = s / n_chunk
                a2[:] = 0.0
                a3[:] = 0.0
                a4[:] = 0.0
                for i in range(r0, r1):  # centred, in float64, while the chunk is in L2
                    _centred_row(vals[i - r0] if divide else xf[rows[i], c0:c1], mu, a2, a3, a4)
                _fold_chunk(done, n_chunk, mu, a2, a3, a4, cm, c2, c3, c4)
                done += n_chunk
                total += s
            if cur >= 0:
                peaks[cur] = best
                where[cur] = at
            if hist:
                _count_part(bins, pending, c0, w, M)
            for j in range(w):  # a column with a NaN or infinity anywhere is left to the exact path, whole
                if do_ctx and bad[j] == 0:
                    for b in range(B):
                        if has[b] and peaks[b, j] >= ck[j]:
                            key = _key(peak_bits[b, j], tok[b, where[b, j]], True)
                            if key >= ctx_floor[c0 + j]:
                                _insert(ctx, c0 + j, key)
            for j in range(w):  # NaN sticks, as in torch.amin / amax (min and max above skip it)
                if bad[j] and divide:
                    if _quotient_has_nan(xf, rows, scale, M, c0 + j):
                        mn[j] = mx[j] = np.nan
                elif bad[j]:
                    for b in range(B):
                        if np.isnan(x[b, :, c0 + j][mined[b]]).any():
                            mn[j] = mx[j] = np.nan
            _store_keys(top, top_l, c0)
            _store_keys(bot, bot_l, c0)
            mean[c0:c1] = total / done
            m2[c0:c1] = c2
            m3[c0:c1] = c3
            m4[c0:c1] = c4
            active[c0:c1] = na
            lo[c0:c1] = mn
            hi[c0:c1] = mx
            ctx_bad[c0:c1] = bad > 0


_scratch: dict[str, np.ndarray] = {}


def _bin_rows(parts: int, subs: int, M: int) -> np.ndarray:
    """The histogram's (parts, subs, M, HIST_SB) uint16 scratch, kept between calls (a fresh one costs page faults)."""
    need = parts * subs * M * HIST_SB
    buf = _scratch.get("bins")
    if buf is None or buf.size < need:
        buf = _scratch["bins"] = np.empty(need, np.uint16)
    return buf[:need].reshape(parts, subs, M, HIST_SB)


def layer_update(x: torch.Tensor, mined: torch.Tensor, tok: torch.Tensor, top: tuple, bottom: tuple, contexts: tuple,
                 hist: tuple | None, n_mined: int, scale: np.ndarray | None = None,
                 product: "Numerator | None" = None) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """One batch x (B, T, N) with n_mined mined positions for a hook's standard reducers (see reducers/fused.py).
    top, bottom, contexts: (keys (k, N) int64 updated in place, floor (N,) int64 or None); contexts None: no top
    contexts; hist: None or (shift, offset, R, zero_bin, n_bins, pending (n_sub, n_bins, HIST_SB) uint16 added to
    in place, room for n_mined more rows). Returns the batch's moments (as moments.py's _batch_moments) and the
    columns whose contexts need the exact path. scale: None, or (n_mined,) float32 to take, for the i-th
    mined position, x / scale[i] as its values. product: DLA's numerator to write on the way (its `done` is set)."""
    kernels._threads()
    N = x.shape[2]
    parts = max(1, min(numba.get_num_threads(), N // HIST_SB))
    step = -(-N // parts // HIST_SB) * HIST_SB if N >= HIST_SB else HIST_SB
    parts = -(-N // step)
    xn = x.numpy()
    out = {k: np.empty(N) for k in ("mean", "m2", "m3", "m4")}
    active = np.empty(N, np.int64)
    lo, hi = np.empty(N, np.float32), np.empty(N, np.float32)
    bad = np.empty(N, np.bool_)
    if hist is None:
        hist = (0, 0, 0, 0, 1, np.zeros((1, 1, HIST_SB), np.uint16))
        rows = _bin_rows(parts, 1, 0)  # empty, but one per part: _layer takes its part's view
        on = False
    else:
        rows = _bin_rows(parts, step // HIST_SB, n_mined)
        on = True
    ctx_keys, ctx_floor = contexts if contexts is not None else (torch.full((1, N), -2**63, dtype=torch.int64), None)
    keys = []
    for k, floor in (top, bottom):
        keys += [k.numpy(), kernels._floor(floor, k)]
    divide = (False, np.zeros(1, np.float32)) if scale is None else (True, np.ascontiguousarray(scale, np.float32))
    if product is None:
        none = np.zeros((1, 1), np.float32)
        prod = (False, np.zeros(1, np.int64), none, none, np.zeros(1, np.int64), none)
    else:
        prod = (True, product.urow, product.kept.numpy(), product.fresh.numpy(), product.src, product.u.numpy())
    _layer(xn, xn.view(np.int32), mined.contiguous().numpy(), tok.contiguous().numpy(), *keys, contexts is not None,
           ctx_keys.numpy(), kernels._floor(ctx_floor, ctx_keys), bad, on, *hist, rows, step, *divide,
           out["mean"], out["m2"], out["m3"], out["m4"], active, lo, hi, *prod)
    if product is not None:
        product.done = True
    res = {k: torch.from_numpy(v) for k, v in out.items()}
    res.update(n_active=torch.from_numpy(active), min=torch.from_numpy(lo).double(), max=torch.from_numpy(hi).double())
    return res, np.flatnonzero(bad)


@dataclass
class Numerator:
    """DLA's numerator for the statistics kernel to write while it reads a layer's rows (gain_product's work
    without a second read of the activations): u[urow[i]] = g * x[rows[i]], for the i-th mined row where
    urow[i] >= 0, g = kept[src[s]] if src[s] >= 0 else fresh[-1 - src[s]], s = urow[i]."""

    urow: np.ndarray
    kept: torch.Tensor
    fresh: torch.Tensor
    src: np.ndarray
    u: torch.Tensor
    done: bool = False


def gain_product(x: torch.Tensor, sel: np.ndarray, gain: torch.Tensor, inverse: np.ndarray, out: torch.Tensor,
                 fresh: torch.Tensor | None = None) -> torch.Tensor:
    """out (M, N) = gain[inverse[i]] * x[sel[i]] for x (..., N) flattened to rows, gain (U, N): DLA's numerator, taken
    while the hook's activations are fresh in cache; the same bits as DlaBatch's torch ops. fresh: a second table,
    whose row r a negative inverse[i] = -1 - r names (dla.GainCache: kept rows and this batch's new ones)."""
    kernels._threads()
    fresh = gain[:1] if fresh is None else fresh
    _gain_product(x.reshape(-1, x.shape[-1]).numpy(), sel, gain.numpy(), fresh.numpy(), inverse, out.numpy())
    return out
