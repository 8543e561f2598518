"""Single-pass CPU kernels (numba) for the per-batch work of the reducers.

Each torch op is one pass over a (M, N) activation batch plus a temporary as large; a reducer
that chains ten of them costs more than the layer's forward pass on a CPU. These kernels walk a
batch in blocks of BLOCK columns (a block's rows stay in cache, each block is a thread's own work,
so no atomics) and compute exactly what the torch code beside them computes. They serve one reducer
each (moments, histogram, top-k, top contexts); layer_kernel.py does a hook's whole standard set in
one read, with the row helpers defined here. The reducers call them for contiguous float32 CPU tensors
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
CHUNK_ROWS = 64
"""Rows per chunk of the moments' two passes (see _moments and layer_kernel.py)."""
HIST_SB = 32
"""Columns per histogram sub-block. The kernels count into uint16 (n_sub, n_bins, HIST_SB) blocks (Histogram.pending):
645 default bins x 32 columns x 2 B = 41 KiB, an L1's worth, so the scattered adds stay in L1; an int32
(n_bins, N) array takes L2 misses instead, twice as slow."""
HIST_ROWS = 65535
"""Rows a uint16 count can take before Histogram folds its pending blocks into the int64 counts."""
HIST_MAX_BINS = 65536
"""The kernels keep bin indices as uint16; finer bins (mantissa_bits 8 over the widest range) take the torch path."""


def usable(x: torch.Tensor) -> bool:
    """The kernels take contiguous float32 CPU tensors; anything else stays on the torch path."""
    return (numba is not None and x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous()
            and not x.requires_grad
            and os.environ.get("MINING_KERNELS", "numba") != "torch"
            and os.environ.get("MINING_DEVICE_PATH") != "1")  # reducers/device.py's paths, forced on the CPU


def _threads() -> None:
    """Use as many threads as torch does (one per actor under Ray), never more than numba has. Set only on a
    change: numba.set_num_threads costs tens of microseconds, and the kernels run hundreds of times a shard."""
    n = int(os.environ.get("MINING_KERNEL_THREADS", 0)) or torch.get_num_threads()
    n = max(1, min(n, numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != n:
        numba.set_num_threads(n)


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

    i32 = np.int32

    @njit(**_inline)
    def _bin32(bits, shift, offset, R, zero_bin, n_bins):  # pragma: no cover - compiled
        """HistogramBins.index32 of one float32's bits, in int32 arithmetic (all arguments int32) so that a row of
        them vectorises 16 wide; numba would widen each step to int64."""
        a = i32(bits & i32(0x7FFFFFFF))
        u = i32(i32(a >> shift) - offset)
        u = u if u > i32(-1) else i32(-1)
        u = u if u < R else R
        u = i32(R - u) if bits < i32(0) else i32(R + i32(4) + u)
        u = zero_bin if a == i32(0) else u
        return i32(n_bins - i32(1)) if a > i32(0x7F800000) else u

    @njit(**_inline)
    def _bins_to(bits_row, shift, offset, R, zero_bin, n_bins, out):  # pragma: no cover - compiled
        for j in range(len(bits_row)):
            out[j] = np.uint16(_bin32(bits_row[j], shift, offset, R, zero_bin, n_bins))

    @njit(**_inline)
    def _count_bins(bins, counts):  # pragma: no cover - compiled
        """Add rows of bins (M, w <= HIST_SB) uint16 to one sub-block's counts (n_bins, HIST_SB) uint16: a
        flat, L1-sized block, so these scattered adds hit L1."""
        flat = counts.reshape(-1)
        w = bins.shape[1]
        for r in range(bins.shape[0]):
            for j in range(w):  # a pointer-sized index and a uint16 one: 20% faster than uint32 arithmetic here
                flat[np.intp(bins[r, j]) * HIST_SB + j] += np.uint16(1)

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
    def _merge_moments(na_, mean, m2, m3, m4, nb_, mb, b2, b3, b4):  # pragma: no cover - compiled
        """Pébay's pairwise update (moments._combine) of running moments (na_ rows) by a chunk's (nb_ rows), in place."""
        n = na_ + nb_
        for j in range(len(mean)):
            delta = mb[j] - mean[j]
            d_n = delta / n
            d_n2 = d_n * d_n
            term = delta * d_n * na_ * nb_
            a2, a3 = m2[j], m3[j]
            mean[j] = mean[j] + d_n * nb_
            m2[j] = a2 + b2[j] + term
            m3[j] = a3 + b3[j] + term * d_n * (na_ - nb_) + 3 * d_n * (na_ * b2[j] - nb_ * a2)
            m4[j] = (m4[j] + b4[j] + term * d_n2 * (na_ * na_ - na_ * nb_ + nb_ * nb_)
                     + 6 * d_n2 * (na_ * na_ * b2[j] + nb_ * nb_ * a2) + 4 * d_n * (na_ * b3[j] - nb_ * a3))

    @njit(cache=True, boundscheck=False, nogil=True)
    def _combined(na_, mean, m2, m3, m4, nb_, mb, b2, b3, b4):  # pragma: no cover - compiled
        """moments._combine's arithmetic into new arrays: the same operations in the same order, so the same bits."""
        mean, m2, m3, m4 = mean.copy(), m2.copy(), m3.copy(), m4.copy()
        _merge_moments(na_, mean, m2, m3, m4, nb_, mb, b2, b3, b4)
        return mean, m2, m3, m4

    @njit(**_inline)
    def _fold_chunk(done, n_chunk, mu, a2, a3, a4, cm, c2, c3, c4):  # pragma: no cover - compiled
        if done == 0.0:
            cm[:] = mu
            c2[:] = a2
            c3[:] = a3
            c4[:] = a4
        else:
            _merge_moments(done, cm, c2, c3, c4, n_chunk, mu, a2, a3, a4)

    @njit(**_jit)
    def _moments(x, mean, m2, m3, m4, active, lo, hi):  # pragma: no cover - compiled
        """Per column, chunks of CHUNK_ROWS rows: each chunk's sum, then its centred sums about its own mean
        (a second pass while it is in cache), merged with Pébay's formulas; the mean is the whole sum over M.
        The same chunks and order as layer_kernel's, so a batch's moments do not depend on which kernel ran it."""
        M, N = x.shape
        for bi in prange((N + BLOCK - 1) // BLOCK):
            c0 = bi * BLOCK
            w = min(BLOCK, N - c0)
            s, total, a2, a3, a4 = np.zeros(w), np.zeros(w), np.zeros(w), np.zeros(w), np.zeros(w)
            cm, c2, c3, c4 = np.zeros(w), np.zeros(w), np.zeros(w), np.zeros(w)
            mn, mx = np.full(w, np.inf, np.float32), np.full(w, -np.inf, np.float32)
            na, bad = np.zeros(w, np.int64), np.zeros(w, np.int64)
            done = 0.0
            for r0 in range(0, M, CHUNK_ROWS):
                r1 = min(M, r0 + CHUNK_ROWS)
                s[:] = 0.0
                for r in range(r0, r1):
                    _stats_row(x[r, c0:c0 + w], s, mn, mx, na, bad)
                n_chunk = float(r1 - r0)
                mu = s / n_chunk
                a2[:] = 0.0
                a3[:] = 0.0
                a4[:] = 0.0
                for r in range(r0, r1):
                    _centred_row(x[r, c0:c0 + w], mu, a2, a3, a4)
                _fold_chunk(done, n_chunk, mu, a2, a3, a4, cm, c2, c3, c4)
                done += n_chunk
                total += s
            for j in range(w):  # NaN sticks, as in torch.amin / amax (min and max above skip it)
                if bad[j] and np.isnan(x[:, c0 + j]).any():
                    mn[j] = mx[j] = np.nan
            mean[c0:c0 + w] = total / done
            m2[c0:c0 + w] = c2
            m3[c0:c0 + w] = c3
            m4[c0:c0 + w] = c4
            active[c0:c0 + w] = na
            lo[c0:c0 + w] = mn
            hi[c0:c0 + w] = mx

    @njit(**_jit)
    def _histogram(xi, shift, offset, R, zero_bin, n_bins, pending):  # pragma: no cover - compiled
        M, N = xi.shape
        shift, offset, R, zero_bin, n_bins = i32(shift), i32(offset), i32(R), i32(zero_bin), i32(n_bins)
        for sb in prange(pending.shape[0]):
            c0 = sb * HIST_SB
            w = min(HIST_SB, N - c0)
            bins = np.empty((1, w), np.uint16)
            for r in range(M):
                _bins_to(xi[r, c0:c0 + w], shift, offset, R, zero_bin, n_bins, bins[0])
                _count_bins(bins, pending[sb])

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
    def _group_sums(x, groups_a, groups_b, sum_a, sum_b, sumsq):  # pragma: no cover - compiled
        """Each row of x (M, N) added to its group's row of sum_a and of sum_b, its squares to sumsq: in row order,
        as index_add_ does, each block of columns on one thread."""
        M, N = x.shape
        for bi in prange((N + BLOCK - 1) // BLOCK):
            c0, c1 = bi * BLOCK, min(N, bi * BLOCK + BLOCK)
            for i in range(M):
                ra, rb = sum_a[groups_a[i]], sum_b[groups_b[i]]
                for c in range(c0, c1):
                    v = np.float64(x[i, c])
                    ra[c] += v
                    rb[c] += v
                    sumsq[c] += v * v


def group_sums(x: torch.Tensor, groups_a: torch.Tensor, groups_b: torch.Tensor, sum_a: torch.Tensor,
               sum_b: torch.Tensor) -> torch.Tensor:
    """Add x (M, N) float32 by row groups (M,) to sum_a and sum_b (G, N) float64 in place, reading x once; returns
    the rows' sums of squares (N,) float64."""
    _threads()
    sumsq = np.zeros(x.shape[1])
    _group_sums(x.numpy(), groups_a.contiguous().numpy(), groups_b.contiguous().numpy(), sum_a.numpy(), sum_b.numpy(),
                sumsq)
    return torch.from_numpy(sumsq)


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


def combined_moments(na_: float, a: dict, nb_: float, b: dict) -> tuple[torch.Tensor, ...] | None:
    """moments._combine's mean and m2..m4 of two non-empty CPU float64 states, in one compiled loop instead of
    twenty torch calls (a fifth of a millisecond on every hook of every batch); None where it does not apply."""
    if numba is None or os.environ.get("MINING_KERNELS", "numba") == "torch":
        return None
    parts = [s[k] for s in (a, b) for k in ("mean", "m2", "m3", "m4")]
    if not all(t.device.type == "cpu" and t.dtype == torch.float64 and t.is_contiguous() and not t.requires_grad
               for t in parts):
        return None
    arrays = [t.numpy() for t in parts]
    return tuple(torch.from_numpy(v) for v in _combined(na_, *arrays[:4], nb_, *arrays[4:]))


def histogram_add(x: torch.Tensor, shift: int, offset: int, R: int, zero_bin: int, n_bins: int,
                  pending: np.ndarray) -> None:
    """Add the bins of x (M <= HIST_ROWS, N) to pending (n_sub, n_bins, HIST_SB) uint16 in place (see Histogram.pending)."""
    _threads()
    _histogram(x.numpy().view(np.int32), shift, offset, R, zero_bin, n_bins, pending)


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
