"""Single-pass CPU kernels (numba) for the per-batch work of the reducers.

Each torch op is one pass over a (M, N) activation batch plus a temporary as large; a reducer
that chains ten of them costs more than the layer's forward pass on a CPU. These kernels walk a
batch in blocks of BLOCK columns (a block's rows stay in cache, each block is a thread's own work,
so no atomics) and compute exactly what the torch code beside them computes. `_layer` does a
hook's whole standard set in one read (reducers/fused.py); the others serve one reducer each
(moments, histogram, top-k, top contexts). The reducers call them for contiguous float32 CPU tensors
and keep their torch code for every other case (GPU, other dtypes, numba missing).
`MINING_KERNELS=torch` turns them off, e.g. to measure one against the other (`mine bench --parts
kernels`). tests/test_kernels.py checks each against its torch twin.
"""

from __future__ import annotations

import os

import numpy as np
import torch

try:
    import numba
    from numba import njit, prange
except ImportError:  # pragma: no cover - numba is a dependency; the torch paths still work without it
    numba = None

BLOCK = 64  # columns per block: 64 x 1,024 rows x 4 B = 256 KiB, an L2's worth


def usable(x: torch.Tensor) -> bool:
    """The kernels take contiguous float32 CPU tensors; anything else stays on the torch path."""
    return (numba is not None and x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous()
            and not x.requires_grad
            and os.environ.get("MINING_KERNELS", "numba") != "torch"
            and os.environ.get("MINING_DEVICE_PATH") != "1")  # reducers/device.py's paths, forced on the CPU


def _threads() -> None:
    """Use as many threads as torch does (one per actor under Ray), never more than numba has."""
    n = int(os.environ.get("MINING_KERNEL_THREADS", 0)) or torch.get_num_threads()
    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))


if numba is not None:
    _jit = dict(parallel=True, cache=True, boundscheck=False, nogil=True)
    _inline = dict(inline="always", boundscheck=False)
    # Row helpers: each walks one row of a block (w columns starting at c0); the kernels below are
    # loops over blocks (one per thread) and rows that call them.

    @njit(**_inline)
    def _stats_row(row, s, mn, mx, na, bad):  # pragma: no cover - compiled
        for j in range(len(row)):  # branch-free, so it vectorises
            v = row[j]
            s[j] += v
            mn[j] = min(mn[j], v)
            mx[j] = max(mx[j], v)
            na[j] += v > 0
            bad[j] += (v - v) != 0  # NaN for NaN and for +-inf

    @njit(**_inline)
    def _centred_row(row, mu, a2, a3, a4):  # pragma: no cover - compiled
        for j in range(len(row)):
            d = np.float64(row[j]) - mu[j]
            d2 = d * d
            a2[j] += d2
            a3[j] += d2 * d
            a4[j] += d2 * d2

    @njit(**_inline)
    def _bins_row(bits_row, c0, N, shift, offset, R, zero_bin, n_bins, idx, counts):  # pragma: no cover - compiled
        """HistogramBins.index32, branch-free, then one add per value to counts, a flat view of (n_bins, N)
        int32: bin-major, so a row's adds hit distinct entries."""
        for j in range(len(bits_row)):
            bits = bits_row[j]
            a = bits & 0x7FFFFFFF
            u = min(max((a >> shift) - offset, -1), R)
            u = R - u if bits < 0 else R + 4 + u
            u = zero_bin if a == 0 else u
            u = n_bins - 1 if a > 0x7F800000 else u
            idx[j] = u * N + c0 + j
        for j in range(len(bits_row)):
            counts[np.uint64(idx[j])] += 1  # unsigned: no negative-index wraparound per add

    @njit(**_inline)
    def _key(bits, tok, largest):  # pragma: no cover - compiled; topk.encode of one float32's bits
        o = np.int64(bits & 0x7FFFFFFF)
        if bits < 0:
            o = -o
        if not largest:
            o = -o
        return o * 2147483648 + (2147483647 - tok)

    @njit(**_inline)
    def _insert(state, c, key):  # pragma: no cover - compiled
        """Put key into column c of state (k, N), sorted descending, if it beats the k-th."""
        k = state.shape[0]
        if key <= state[k - 1, c]:
            return
        p = k - 1
        while p > 0 and state[p - 1, c] < key:
            state[p, c] = state[p - 1, c]
            p -= 1
        state[p, c] = key

    @njit(**_inline)
    def _insert_row(row, bits_row, tok, kth, floor, state, c0, largest):  # pragma: no cover - compiled
        """Insert the row's values at least as extreme as their column's kth (NaN never is) into state."""
        n = 0
        for j in range(len(row)):  # a vectorised count first: most rows have no candidate at all
            n += (row[j] >= kth[j]) if largest else (row[j] <= kth[j])
        if n:
            for j in range(len(row)):
                if (row[j] >= kth[j]) if largest else (row[j] <= kth[j]):
                    key = _key(bits_row[j], tok, largest)
                    if key >= floor[c0 + j]:
                        _insert(state, c0 + j, key)

    @njit(**_inline)
    def _kth(state, floor, c0, w, largest):  # pragma: no cover - compiled
        """topk.decode of each column's threshold (its k-th key or its floor if higher), as float32."""
        bits = np.empty(w, np.int32)
        out = bits.view(np.float32)
        k = state.shape[0]
        for j in range(w):
            key = max(state[k - 1, c0 + j], floor[c0 + j])
            if key == -9223372036854775808:  # EMPTY: anything enters
                bits[j] = 0
                out[j] = -np.inf if largest else np.inf
                continue
            o = key >> 31  # floor division by 2**31
            if not largest:
                o = -o
            bits[j] = np.int32(abs(o))
            if o < 0:
                out[j] = -out[j]
        return out

    @njit(**_inline)
    def _store_moments(c0, s, count, a2, a3, a4, na, mn, mx, mean, m2, m3, m4, active, lo, hi):  # pragma: no cover
        w = len(s)
        mean[c0:c0 + w] = s / count
        m2[c0:c0 + w] = a2
        m3[c0:c0 + w] = a3
        m4[c0:c0 + w] = a4
        active[c0:c0 + w] = na
        lo[c0:c0 + w] = mn
        hi[c0:c0 + w] = mx

    @njit(**_jit)
    def _moments(x, mean, m2, m3, m4, active, lo, hi):  # pragma: no cover - compiled
        M, N = x.shape
        for bi in prange((N + BLOCK - 1) // BLOCK):
            c0 = bi * BLOCK
            w = min(BLOCK, N - c0)
            s, a2, a3, a4 = np.zeros(w), np.zeros(w), np.zeros(w), np.zeros(w)
            mn, mx = np.full(w, np.inf, np.float32), np.full(w, -np.inf, np.float32)
            na, bad = np.zeros(w, np.int64), np.zeros(w, np.int64)
            for r in range(M):
                _stats_row(x[r, c0:c0 + w], s, mn, mx, na, bad)
            mu = s / M
            for r in range(M):  # second pass, centred, in float64; the block is still in cache
                _centred_row(x[r, c0:c0 + w], mu, a2, a3, a4)
            for j in range(w):  # NaN sticks, as in torch.amin / amax (min and max above skip it)
                if bad[j] and np.isnan(x[:, c0 + j]).any():
                    mn[j] = mx[j] = np.nan
            _store_moments(c0, s, M, a2, a3, a4, na, mn, mx, mean, m2, m3, m4, active, lo, hi)

    @njit(**_jit)
    def _histogram(xi, shift, offset, R, zero_bin, n_bins, counts):  # pragma: no cover - compiled
        M, N = xi.shape
        for bi in prange((N + BLOCK - 1) // BLOCK):
            c0 = bi * BLOCK
            idx = np.empty(min(BLOCK, N - c0), np.int64)
            for r in range(M):
                _bins_row(xi[r, c0:c0 + len(idx)], c0, N, shift, offset, R, zero_bin, n_bins, idx, counts)

    @njit(**_jit)
    def _count_candidates(x, kth, largest, per_block):  # pragma: no cover - compiled
        M, N = x.shape
        for bi in prange((N + BLOCK - 1) // BLOCK):
            c0 = bi * BLOCK
            w = min(BLOCK, N - c0)
            k = kth[c0:c0 + w]
            n = 0
            for r in range(M):
                row = x[r, c0:c0 + w]
                for j in range(w):
                    n += (row[j] >= k[j]) if largest else (row[j] <= k[j])
            per_block[bi] = n

    @njit(**_jit)
    def _topk_insert(state, floor, x, xi, kth, toks, largest):  # pragma: no cover - compiled
        M, N = x.shape
        for bi in prange((N + BLOCK - 1) // BLOCK):  # a block's columns are one thread's: no conflicts
            c0 = bi * BLOCK
            w = min(BLOCK, N - c0)
            for r in range(M):
                _insert_row(x[r, c0:c0 + w], xi[r, c0:c0 + w], toks[r], kth[c0:c0 + w], floor, state, c0, largest)

    @njit(**_jit)
    def _context_peaks(x, mined, peak, where):  # pragma: no cover - compiled
        B, T, N = x.shape
        for bi in prange((N + BLOCK - 1) // BLOCK):
            c0 = bi * BLOCK
            w = min(BLOCK, N - c0)
            for b in range(B):
                best = np.full(w, -np.inf, np.float32)
                at = np.zeros(w, np.int64)
                for t in range(T):
                    if not mined[b, t]:
                        continue
                    row = x[b, t, c0:c0 + w]
                    for j in range(w):
                        v = row[j]
                        if v > best[j] or (v != v and best[j] == best[j]):  # first maximum; first NaN wins
                            best[j] = v
                            at[j] = t
                peak[b, c0:c0 + w] = best
                where[b, c0:c0 + w] = at

    @njit(**_jit)
    def _context_insert(state, floor, peak, peak_bits, where, tok, has_mined, kth):  # pragma: no cover - compiled
        B, N = peak.shape
        for bi in prange((N + BLOCK - 1) // BLOCK):
            c0 = bi * BLOCK
            for c in range(c0, min(N, c0 + BLOCK)):
                for b in range(B):
                    if has_mined[b] and peak[b, c] >= kth[c]:
                        key = _key(peak_bits[b, c], tok[b, where[b, c]], True)
                        if key >= floor[c]:
                            _insert(state, c, key)

    @njit(**_jit)
    def _layer(x, xi, mined, tok, top, top_floor, bot, bot_floor, do_ctx, ctx, ctx_floor,
               ctx_bad, hist, shift, offset, R, zero_bin, n_bins, counts, mean, m2, m3, m4, active, lo, hi):
        # pragma: no cover - compiled
        """Everything a hook's standard reducers do with one batch, in one read of x (B, T, N): moments
        (a second, centred pass over the block while it is in cache), top/bottom-k inserts, context peaks
        and inserts (do_ctx), histogram (hist). Columns whose context peaks are not all finite are flagged
        in ctx_bad and left to ContextTopK's exact path."""
        B, T, N = x.shape
        for bi in prange((N + BLOCK - 1) // BLOCK):
            c0 = bi * BLOCK
            w = min(BLOCK, N - c0)
            tk, bk, ck = _kth(top, top_floor, c0, w, True), _kth(bot, bot_floor, c0, w, False), _kth(ctx, ctx_floor, c0, w, True)
            s, a2, a3, a4 = np.zeros(w), np.zeros(w), np.zeros(w), np.zeros(w)
            mn, mx = np.full(w, np.inf, np.float32), np.full(w, -np.inf, np.float32)
            na, bad = np.zeros(w, np.int64), np.zeros(w, np.int64)
            idx = np.empty(w, np.int64)
            peaks = np.empty((B, w), np.float32)  # each context's peak and its first position
            peak_bits = peaks.view(np.int32)
            where = np.empty((B, w), np.int32)
            has = np.zeros(B, np.bool_)
            best = np.empty(w, np.float32)  # this context's; local arrays, so the compiler sees no aliasing
            at = np.empty(w, np.int32)
            count = 0
            for b in range(B):
                for t in range(T):
                    if not mined[b, t]:
                        continue
                    if not has[b]:
                        has[b] = True
                        best[:] = -np.inf
                        at[:] = np.int32(t)
                    count += 1
                    row, bits_row = x[b, t, c0:c0 + w], xi[b, t, c0:c0 + w]
                    _stats_row(row, s, mn, mx, na, bad)
                    if do_ctx:  # ranked values (DLA) have no contexts
                        for j in range(w):
                            gt = row[j] > best[j]  # strict: the first position of the peak stays
                            best[j] = row[j] if gt else best[j]
                            at[j] = np.int32(t) if gt else at[j]
                    _insert_row(row, bits_row, tok[b, t], tk, top_floor, top, c0, True)
                    _insert_row(row, bits_row, tok[b, t], bk, bot_floor, bot, c0, False)
                    if hist:
                        _bins_row(bits_row, c0, N, shift, offset, R, zero_bin, n_bins, idx, counts)
                if has[b]:
                    peaks[b] = best
                    where[b] = at
            for j in range(w):  # a column with a NaN or infinity anywhere is left to the exact path, whole
                if do_ctx and bad[j] == 0:
                    for b in range(B):
                        if has[b] and peaks[b, j] >= ck[j]:
                            key = _key(peak_bits[b, j], tok[b, where[b, j]], True)
                            if key >= ctx_floor[c0 + j]:
                                _insert(ctx, c0 + j, key)
            mu = s / count
            for b in range(B):
                for t in range(T):
                    if mined[b, t]:
                        _centred_row(x[b, t, c0:c0 + w], mu, a2, a3, a4)
            for j in range(w):  # NaN sticks, as in torch.amin / amax (min and max above skip it)
                if bad[j]:
                    for b in range(B):
                        if np.isnan(x[b, :, c0 + j][mined[b]]).any():
                            mn[j] = mx[j] = np.nan
            _store_moments(c0, s, count, a2, a3, a4, na, mn, mx, mean, m2, m3, m4, active, lo, hi)
            ctx_bad[c0:c0 + w] = bad > 0


def topk_insert(state: torch.Tensor, floor: torch.Tensor | None, x: torch.Tensor, kth: torch.Tensor,
                toks: torch.Tensor, largest: bool) -> None:
    """Insert every entry of x (M, N) at least as extreme as kth[col] into the top-k keys state (k, N)
    in place, as topk.encode keys with the row's token index toks (M,); keys below floor are dropped."""
    _threads()
    _topk_insert(state.numpy(), _floor(floor, state), x.numpy(), x.numpy().view(np.int32), kth.float().contiguous().numpy(),
                 toks.contiguous().numpy(), largest)


def context_insert(state: torch.Tensor, floor: torch.Tensor | None, peak: torch.Tensor, where: torch.Tensor,
                   tok: torch.Tensor, has_mined: torch.Tensor, kth: torch.Tensor) -> None:
    """ContextTopK's fast path: each context's finite peak (B, N) at position where, tok (B, T)."""
    _threads()
    p = peak.contiguous().numpy()
    _context_insert(state.numpy(), _floor(floor, state), p, p.view(np.int32), where.contiguous().numpy(),
                    tok.contiguous().numpy(), has_mined.contiguous().numpy(), kth.float().contiguous().numpy())


def _floor(floor: torch.Tensor | None, state: torch.Tensor) -> np.ndarray:
    if floor is None:
        return np.full(state.shape[1], np.iinfo(np.int64).min, np.int64)
    return floor.to(torch.int64).contiguous().numpy()


def layer_update(x: torch.Tensor, mined: torch.Tensor, tok: torch.Tensor, top: tuple, bottom: tuple, contexts: tuple,
                 hist: tuple | None) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """One batch x (B, T, N) for a hook's standard reducers (see reducers/fused.py). top, bottom, contexts:
    (keys (k, N) int64 updated in place, floor (N,) int64 or None); contexts None: no top contexts; hist: None or
    (shift, offset, R, zero_bin, n_bins, counts (n_bins, N) int32 added to in place). Returns the batch's
    moments (as moments.py's _batch_moments) and the columns whose contexts need the exact path."""
    _threads()
    N = x.shape[2]
    xn = x.numpy()
    out = {k: np.empty(N) for k in ("mean", "m2", "m3", "m4")}
    active = np.empty(N, np.int64)
    lo, hi = np.empty(N, np.float32), np.empty(N, np.float32)
    bad = np.empty(N, np.bool_)
    h = hist if hist is not None else (0, 0, 0, 0, 1, np.zeros((1, N), np.int32))
    h = (*h[:5], h[5].reshape(-1))  # the kernels add to the flat (n_bins * N) view
    ctx_keys, ctx_floor = contexts if contexts is not None else (torch.full((1, N), -2**63, dtype=torch.int64), None)
    parts = []
    for keys, floor in (top, bottom):
        parts += [keys.numpy(), _floor(floor, keys)]
    parts += [contexts is not None, ctx_keys.numpy(), _floor(ctx_floor, ctx_keys)]
    _layer(xn, xn.view(np.int32), mined.contiguous().numpy(), tok.contiguous().numpy(), *parts, bad,
           hist is not None, *h, out["mean"], out["m2"], out["m3"], out["m4"], active, lo, hi)
    res = {k: torch.from_numpy(v) for k, v in out.items()}
    res.update(n_active=torch.from_numpy(active), min=torch.from_numpy(lo).double(), max=torch.from_numpy(hi).double())
    return res, np.flatnonzero(bad)


def moments(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-column mean and centred M2..M4 (float64, two-pass), count of x > 0, min and max of x (M, N), M > 0."""
    _threads()
    N = x.shape[1]
    out = {k: np.empty(N) for k in ("mean", "m2", "m3", "m4")}
    active = np.empty(N, np.int64)
    lo, hi = np.empty(N, np.float32), np.empty(N, np.float32)
    _moments(x.numpy(), out["mean"], out["m2"], out["m3"], out["m4"], active, lo, hi)
    res = {k: torch.from_numpy(v) for k, v in out.items()}
    res.update(n_active=torch.from_numpy(active), min=torch.from_numpy(lo).double(), max=torch.from_numpy(hi).double())
    return res


def histogram_add(x: torch.Tensor, shift: int, offset: int, R: int, zero_bin: int, n_bins: int,
                  counts: np.ndarray) -> None:
    """Add the bins of x (M, N) to counts (n_bins, N) int32 in place (see HistogramBins.index32)."""
    _threads()
    _histogram(x.numpy().view(np.int32), shift, offset, R, zero_bin, n_bins, counts.reshape(-1))


def count_candidates(x: torch.Tensor, kth: torch.Tensor, largest: bool) -> int:
    """How many entries of x (M, N) are >= kth[col] (largest) or <= kth[col]."""
    _threads()
    per_block = np.zeros((x.shape[1] + BLOCK - 1) // BLOCK, np.int64)
    _count_candidates(x.numpy(), kth.float().contiguous().numpy(), largest, per_block)
    return int(per_block.sum())


def context_peaks(x: torch.Tensor, mined: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, T, N), mined (B, T) bool -> each context's peak over its mined positions (B, N) and the first
    position holding it; -inf and position 0 where nothing is mined; NaN where a NaN is mined."""
    _threads()
    B, T, N = x.shape
    peak, where = np.empty((B, N), np.float32), np.empty((B, N), np.int64)
    _context_peaks(x.numpy(), mined.contiguous().numpy(), peak, where)
    return torch.from_numpy(peak), torch.from_numpy(where)
