"""Per-neuron histograms on fixed log-spaced bins, and quantiles read off them.

Bins depend only on (mantissa_bits, min_exp, max_exp), never on data, so shard histograms add
exactly. A regular bin is one value of the float32's exponent and top `mantissa_bits` mantissa
bits: |x| in [2**e * (1 + j/P), 2**e * (1 + (j+1)/P)) with P = 2**mantissa_bits, for
min_exp <= e < max_exp. Bin index increases with value:

    0                      negative overflow   x <= -2**max_exp (incl. -inf)
    1 .. R                 negative regular bins, most negative first; (lo, hi] since |x| is binned
    R + 1                  negative underflow  -2**min_exp < x < 0
    R + 2  (zero_bin)      exact zero (either sign), lo = hi = 0
    R + 3                  positive underflow  0 < x < 2**min_exp
    R + 4 .. 2R + 3        positive regular bins, [lo, hi)
    2R + 4                 positive overflow   x >= 2**max_exp (incl. +inf), and NaN (of either sign)

with R = (max_exp - min_exp) * P, so n_bins = 2R + 5. Denormals are underflow (min_exp >= -126).

Quantiles (`quantile_from_counts`, mirrored exactly by the SQL side): the r-th smallest value,
r = max(1, ceil(q * n)), lies in the bin b where the cumulative count first reaches r, and also in
[vmin, vmax] (the neuron's exact min and max), so the estimate is the midpoint of
[max(lo_b, vmin), min(hi_b, vmax)]. Guarantee:

    |estimate - true r-th order statistic| <= (min(hi_b, vmax) - max(lo_b, vmin)) / 2

which for a regular bin is at most 2**-(mantissa_bits + 1) * |x| (relative), for an underflow bin
at most 2**(min_exp - 1) (absolute), 0 for the zero bin, and for overflow bins bounded by the
clamp to vmin/vmax. q <= 0 gives vmin and q >= 1 gives vmax, both exact.

Three meanings of "quantile" of a neuron:
  * unconditional percentile over all tokens:  quantile_from_counts(..., firing_only=False)
  * percentile among firing tokens (x > 0):    quantile_from_counts(..., firing_only=True);
    here q <= 0 uses the midpoint rule with r = 1 (the smallest positive value is not stored)
  * fraction of the neuron's max:              fraction_of_max(vmax, q) = q * vmax
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from . import device, kernels

_ABS = 0x7FFFFFFF
_INF_BITS = 0x7F800000


@dataclass(frozen=True)
class HistogramBins:
    mantissa_bits: int = 4
    min_exp: int = -12
    max_exp: int = 8

    def __post_init__(self) -> None:
        if not 0 <= self.mantissa_bits <= 23:
            raise ValueError(f"mantissa_bits must be in [0, 23], got {self.mantissa_bits}")
        if not -126 <= self.min_exp < self.max_exp <= 127:
            raise ValueError(f"need -126 <= min_exp < max_exp <= 127, got {self.min_exp}, {self.max_exp}")

    @property
    def n_regular(self) -> int:
        """Regular bins per sign."""
        return (self.max_exp - self.min_exp) << self.mantissa_bits

    @property
    def n_bins(self) -> int:
        return 2 * self.n_regular + 5

    @property
    def zero_bin(self) -> int:
        return self.n_regular + 2

    @property
    def negative_bins(self) -> range:
        """Bins of x < 0."""
        return range(0, self.zero_bin)

    @property
    def positive_bins(self) -> range:
        """Bins of x > 0 (firing tokens), underflow and overflow included."""
        return range(self.zero_bin + 1, self.n_bins)

    def index32(self, x: torch.Tensor) -> torch.Tensor:
        """Bin of each element as int32 (x is cast to float32)."""
        R = self.n_regular
        b = x.float().view(torch.int32)
        sign = b >> 31  # 0 or -1
        a = b & _ABS
        # exponent and top mantissa bits of |x|, relative to the first regular bin; the shifts
        # keep order, so clamping sends everything below to underflow (-1) and above to overflow (R)
        t = (a >> (23 - self.mantissa_bits)).sub_((self.min_exp + 127) << self.mantissa_bits).clamp_(-1, R)
        # positive: R + 4 + t; negative, mirrored: R - t = R + 1 + ~t (in place, no where)
        t ^= sign
        t.add_(sign, alpha=3).add_(R + 4)
        t.masked_fill_(a == 0, self.zero_bin)
        return t.masked_fill_(a > _INF_BITS, self.n_bins - 1)

    def kernel_params(self) -> tuple[int, int, int, int, int]:
        """(shift, base, R, zero_bin, n_bins): index32's constants, as the CPU and GPU kernels take them."""
        return 23 - self.mantissa_bits, (self.min_exp + 127) << self.mantissa_bits, self.n_regular, self.zero_bin, self.n_bins

    def index(self, x: torch.Tensor) -> torch.Tensor:
        """Bin of each element, int64, same shape as x."""
        return self.index32(x).long()

    def edges(self) -> tuple[np.ndarray, np.ndarray]:
        """(lo, hi) float64 arrays of length n_bins; overflow bins are open to -inf / +inf."""
        P = 1 << self.mantissa_bits
        j = np.arange(self.n_regular)
        e = self.min_exp + j // P
        lo_pos = np.ldexp(1.0 + (j % P) / P, e)
        hi_pos = np.ldexp(1.0 + (j % P + 1) / P, e)
        under, over = 2.0**self.min_exp, 2.0**self.max_exp
        lo = np.concatenate([[-np.inf], -hi_pos[::-1], [-under, 0.0, 0.0], lo_pos, [over]])
        hi = np.concatenate([[-over], -lo_pos[::-1], [0.0, 0.0, under], hi_pos, [np.inf]])
        return lo, hi

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: torch.tensor(getattr(self, k), dtype=torch.int64) for k in ("mantissa_bits", "min_exp", "max_exp")}

    @classmethod
    def from_state_dict(cls, d: dict[str, torch.Tensor]) -> "HistogramBins":
        return cls(int(d["mantissa_bits"]), int(d["min_exp"]), int(d["max_exp"]))


class Histogram:
    """Counts (N, n_bins) int64 per neuron on fixed bins; merges by addition, exactly."""

    def __init__(self, bins: HistogramBins):
        self.bins = bins
        self._counts: torch.Tensor | None = None  # (N, n_bins) int64 on the data's device
        self._pending: np.ndarray | None = None  # (n_sub, n_bins, HIST_SB) uint16 the CPU kernels add to, see pending
        self._pending_rows = 0
        self._n = 0  # columns of the pending counts

    @property
    def counts(self) -> torch.Tensor | None:
        self._flush()
        if self._counts is not None and self._counts.dtype != torch.int64:
            self._counts = self._counts.to(torch.int64)  # restored from a shard file's int32
        return self._counts

    @counts.setter
    def counts(self, value: torch.Tensor | None) -> None:
        self._counts, self._pending, self._pending_rows = value, None, 0

    def _flush(self) -> None:
        """Fold the kernels' uint16 sub-block counts into the int64 state."""
        if self._pending is not None and self._pending_rows:
            flat = torch.from_numpy(self._pending.transpose(0, 2, 1).reshape(-1, self.bins.n_bins)[:self._n].astype(np.int64))
            # not in place: may be an inference tensor; and no zeros before the first fold (8 MB a hook a shard)
            self._counts = flat if self._counts is None else self._counts + flat
            self._pending.fill(0)
            self._pending_rows = 0

    def accumulator(self, N: int, device: torch.device) -> torch.Tensor:
        """The int64 counts the update paths add to: zeros at first, a restored state's int32 widened."""
        if self._counts is None:
            self._counts = torch.zeros(N, self.bins.n_bins, dtype=torch.int64, device=device)
        elif self._counts.dtype != torch.int64:
            self._counts = self._counts.to(torch.int64)
        return self._counts

    def pending(self, N: int, rows: int) -> np.ndarray:
        """The counts a CPU kernel is about to add `rows` (at most kernels.HIST_ROWS) rows of N columns to:
        (ceil(N / HIST_SB), n_bins, HIST_SB) uint16, column c's bin b at [c // HIST_SB, b, c % HIST_SB].
        Small blocks, so that the kernels' scattered adds stay in L1; folded into the counts before a
        uint16 could overflow."""
        if rows > kernels.HIST_ROWS:
            raise ValueError(f"at most {kernels.HIST_ROWS} rows a call, got {rows}")
        if self._pending is None:
            self._n = N
            self._pending = np.zeros((-(-N // kernels.HIST_SB), self.bins.n_bins, kernels.HIST_SB), np.uint16)
        if self._pending_rows + rows > kernels.HIST_ROWS:
            self._flush()
        self._pending_rows += rows
        return self._pending

    def update(self, x: torch.Tensor) -> None:
        """x (M, N)."""
        if x.ndim != 2:
            raise ValueError(f"expected x (M, N), got {tuple(x.shape)}")
        M, N = x.shape
        nb = self.bins.n_bins
        self.accumulator(N, x.device)
        if M == 0:
            return
        if device.applies(x):
            device.histogram_add(self._counts, x, self.bins)
            return
        if kernels.usable(x) and nb <= kernels.HIST_MAX_BINS:
            for lo in range(0, M, kernels.HIST_ROWS):
                part = x[lo:lo + kernels.HIST_ROWS]
                kernels.histogram_add(part, *self.bins.kernel_params(), self.pending(N, len(part)))
            return
        # one bincount over neuron * n_bins + bin; int32 while the flat index fits
        idx = self.bins.index32(x)
        if N * nb >= 2**31:
            idx = idx.long()
        idx += torch.arange(N, device=x.device, dtype=idx.dtype) * nb
        self._counts += torch.bincount(idx.reshape(-1), minlength=N * nb).view(N, nb)

    def merge(self, other: "Histogram") -> "Histogram":
        if not isinstance(other, Histogram) or other.bins != self.bins:
            raise ValueError("cannot merge histograms with different bins")
        out = Histogram(self.bins)
        if self.counts is None or other.counts is None:
            src = self.counts if other.counts is None else other.counts
            out.counts = None if src is None else src.clone()
        elif self.counts.shape != other.counts.shape:
            raise ValueError(f"cannot merge histograms of shapes {tuple(self.counts.shape)} and {tuple(other.counts.shape)}")
        else:
            out.counts = self.counts + other.counts.to(self.counts.device)
        return out

    def merge_(self, other: "Histogram") -> "Histogram":
        """In place, self = self.merge(other), for a fold that owns its accumulator: other's counts are
        added as stored (int32 from a shard file), with no int64 copy and no new accumulator a shard."""
        if not isinstance(other, Histogram) or other.bins != self.bins:
            raise ValueError("cannot merge histograms with different bins")
        other._flush()
        theirs = other._counts
        if theirs is None:
            return self
        if self.counts is None:
            self.counts = theirs.to(torch.int64, copy=True)
        elif self.counts.shape != theirs.shape:
            raise ValueError(f"cannot merge histograms of shapes {tuple(self.counts.shape)} and {tuple(theirs.shape)}")
        elif self.counts.device.type == "cpu" and theirs.device.type == "cpu" and not self.counts.is_inference():
            mine = self.counts.numpy()
            np.add(mine, theirs.numpy(), out=mine)  # widens on the fly: twice torch's mixed-dtype add_
        else:
            self.counts = self.counts + theirs.to(self.counts.device)
        return self

    def finalize(self) -> torch.Tensor:
        """counts (N, n_bins) int64."""
        if self.counts is None:
            return torch.zeros(0, self.bins.n_bins, dtype=torch.int64)
        return self.counts

    def state_dict(self) -> dict[str, torch.Tensor]:
        counts = self.finalize().cpu()
        if counts.numel() == 0 or int(counts.max()) < 2**31:
            counts = counts.to(torch.int32)  # halves the shard files; widened back on load
        return {**self.bins.state_dict(), "counts": counts.contiguous()}

    @classmethod
    def from_state_dict(cls, d: dict[str, torch.Tensor]) -> "Histogram":
        out = cls(HistogramBins.from_state_dict(d))
        if d["counts"].shape[0] > 0:
            out.counts = d["counts"]  # widened to int64 when first read, or added as is by merge_
        return out


def quantile_from_counts(counts, bins: HistogramBins, q: float, vmin, vmax, firing_only: bool = False):
    """Estimate of the q-quantile (r-th smallest, r = max(1, ceil(q n))) from bin counts.

    counts (n_bins,) or (N, n_bins); vmin, vmax the exact min and max (scalars or (N,)).
    Returns a float or an (N,) float64 array; NaN where there is nothing to rank (n == 0).
    """
    c = np.asarray(counts, dtype=np.int64)
    single = c.ndim == 1
    c = np.atleast_2d(c)
    if firing_only:
        c = c.copy()
        c[:, : bins.zero_bin + 1] = 0  # only x > 0 counts
    vmin = np.broadcast_to(np.asarray(vmin, dtype=np.float64), c.shape[:1])
    vmax = np.broadcast_to(np.asarray(vmax, dtype=np.float64), c.shape[:1])
    n = c.sum(axis=1)
    if q >= 1:
        est = vmax.copy()
    elif q <= 0 and not firing_only:
        est = vmin.copy()
    else:
        r = np.maximum(1, np.ceil(q * n))  # firing-only q <= 0 lands here with r = 1
        b = np.argmax(np.cumsum(c, axis=1) >= r[:, None], axis=1)
        lo, hi = bins.edges()
        # the zero bin gives (max(0, vmin) + min(0, vmax)) / 2 = 0 since vmin <= 0 <= vmax
        est = (np.maximum(lo[b], vmin) + np.minimum(hi[b], vmax)) / 2
    est = np.where(n == 0, np.nan, est)
    return float(est[0]) if single else est


def quantile_error_bound(lo, hi, vmin, vmax):
    """Half the width of the bin [lo, hi] clamped to [vmin, vmax]: the most the estimate is off."""
    return (np.minimum(hi, vmax) - np.maximum(lo, vmin)) / 2


def fraction_of_max(vmax, q: float):
    """The third meaning of a quantile: q times the neuron's max; exact, no histogram needed."""
    return np.asarray(vmax, dtype=np.float64) * q if np.ndim(vmax) else float(vmax) * q


def bin_relative_error(bins: HistogramBins) -> float:
    """Bound on |estimate - x| / |x| for values in regular bins."""
    return math.ldexp(1.0, -(bins.mantissa_bits + 1))
