"""Examples across the activation range in one pass: per-neuron hash-priority samples per value cell.

State. Every (token, neuron) gets a fixed pseudo-random priority p in [0, 2**31), a hash of the
global token index and the neuron index only (`priority`), so it does not depend on how the corpus
was cut. Values are grouped into *cells*: groups of 2**coarse adjacent histogram bins, which are
themselves exactly the bins of `HistogramBins(mantissa_bits - coarse, min_exp, max_exp)` (same
sign / underflow / zero / overflow layout, coarser mantissa). For every (neuron, cell) the state
keeps the m entries of smallest key = p * 2**31 + tok (ties in p go to the lower token) with their
exact float32 value. Bottom-m of a union is bottom-m of the bottom-m's, so update and merge are
exact and order free, bit for bit; the entries of a cell are a uniform random sample of its
tokens (without replacement), independent of the value.

Memory: keys int64 + values float32 per slot, (N, n_cells, m); the state_dict keeps int32 tokens
(priorities are recomputed on load), i.e. 8 * m * n_cells bytes per neuron. Default bins
(4 mantissa bits, exponents [-12, 8)) with coarse=3 (half-octave cells) give 85 cells: with
m = 8 that is 5.4 KB per neuron on disk (8.4 MB for 1536 neurons), 8.7 KB in memory.

Bands (`finalize`), three meanings named apart:
  * 'all':      ranks among all tokens, band [lo%, hi%) = ranks r with lo% n < r <= hi% n
  * 'firing':   the same among tokens with x > 0
  * 'frac_max': values lo% vmax < x <= hi% vmax (x > 0; needs vmax > 0)

A rank band is known at the histogram's resolution: from the counts it covers the bins
b_lo..b_hi (those holding its first and last rank; the bins quantile_from_counts reads its edge
quantiles from) and takes w_b of bin b's c_b tokens (w_b = c_b inside, a part at the two edge
bins). A token of bin b gets the effective priority e = p * c_b / w_b (float64), i.e. the band is
sampled as if each edge bin were thinned to its share: the expected number of samples from a bin is
proportional to the band's rank mass there, and uniform within the bin. A frac_max band is exact
in value (each stored value is tested against lo * vmax, hi * vmax) with e = p.

Per (neuron, band) the result lists up to m samples ordered by (e, tok). The first `n_exact` are
exact: they equal the brute-force "m smallest (e, tok) among all tokens of the band" on the
concatenated data. Proof sketch: a token missing from cell c has key above the cell's m-th key K_c,
hence (e, tok) above (E_c, tok(K_c)) with E_c = p(K_c) * min_b s_b over the cell's band bins;
a cell is harmless if it is not full or already holds m band entries at or below that bound, and
an entry is exact when it lies at or below the bound of every other cell. After the exact ones come
(if fewer than m) the remaining stored band entries by (e, tok): still inside the band's value
range, just not a uniform draw. Guarantee on every returned sample: its value lies in
[lo, hi] reported for the band: for rank bands [max(lo(b_lo), vmin), min(hi(b_hi), vmax)], the
band's exact value range widened by at most one histogram bin at each edge (the same uncertainty
as quantile_from_counts); for frac_max bands (lo% vmax, hi% vmax], exactly.

How many are exact depends on the cells at the band's edges: a cell mostly outside the band
limits the band to about m * (band mass in it) / (its mass) exact draws, so smaller `coarse` (finer
cells) means more exact samples in narrow bands for more memory. Bands with fewer than m tokens
give all of them. NaN values count in the positive overflow bin, as in the histogram, and never
enter frac_max bands. Token indices must lie in [0, 2**31).
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import torch

from .histogram import HistogramBins
from .topk import check_toks


RANK_BANDS = ((0, 25), (25, 50), (50, 75), (75, 90), (90, 95), (95, 99), (99, 100))
FRAC_BANDS = ((0, 10), (10, 25), (25, 50), (50, 75), (75, 100))
KINDS = ("all", "firing", "frac_max")

# ---------------------------------------------------------------- the priority hash

_M31 = (1 << 31) - 1
_P_EMPTY = _M31  # priority stored in a free slot (a real priority may equal it: tok decides)
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_NEURON_SALT = 0x5DEECE66D1234567
_C1, _C2 = 0x7FEB352D, 0x846CA68B  # odd: multiplication is a bijection mod 2**31


def _s64(c: int) -> int:
    """Unsigned 64-bit constant as the int64 with the same bits."""
    return c - (1 << 64) if c >= 1 << 63 else c


def _s32(c: int) -> int:
    return c - (1 << 32) if c >= 1 << 31 else c


def _splitmix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64 of int64 z (wrapping arithmetic, logical shifts)."""
    z = z + _s64(_GOLDEN)
    z = (z ^ ((z >> 30) & ((1 << 34) - 1))) * _s64(_MIX1)
    z = (z ^ ((z >> 27) & ((1 << 37) - 1))) * _s64(_MIX2)
    return z ^ ((z >> 31) & ((1 << 33) - 1))


def _round31(z: torch.Tensor) -> torch.Tensor:
    """A bijection of [0, 2**31) (in place on int32 or int64 holding 31-bit values):
    multiply by an odd constant mod 2**31, xor-shift, twice."""
    z.mul_(_s32(_C1)).bitwise_and_(_M31)
    z ^= z >> 15
    z.mul_(_s32(_C2)).bitwise_and_(_M31)
    z ^= z >> 16
    return z


def row_hash(tok: torch.Tensor) -> torch.Tensor:
    """(M,) tokens in [0, 2**31) -> (M,) int32, a bijection of [0, 2**31)."""
    z = tok.to(torch.int64) ^ (tok.to(torch.int64) >> 16)
    return _round31(_round31(z)).to(torch.int32)


def col_hash(n: int, device) -> torch.Tensor:
    """(n,) int32 per-neuron salt in [0, 2**31)."""
    return (_splitmix64(torch.arange(n, dtype=torch.int64, device=device) ^ _NEURON_SALT) >> 33).to(torch.int32)


def _mix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a, b int32 in [0, 2**31), broadcastable -> priorities int32 in [0, 2**31).

    For a fixed neuron (b) this is a bijection of the token, so the priorities of one neuron's
    tokens are distinct: the key (priority) alone orders them, no tie-break needed."""
    return _round31(a ^ b)


def priority(tok: torch.Tensor, n: int) -> torch.Tensor:
    """Priorities (M, n) int32 of tokens tok (M,) for neurons 0..n-1."""
    return _mix(row_hash(tok)[:, None], col_hash(n, tok.device)[None, :])


def _order_key(p: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
    """int64 sort key of stored slots: the priority, free slots (tok < 0) after every real one."""
    return p.long() | ((tok < 0).long() << 31)


# ---------------------------------------------------------------- the reducer


class QuantileSamples:
    """Per (neuron, value cell) bottom-m hash-priority samples; bands chosen at `finalize`."""

    def __init__(self, bins: HistogramBins, m: int, coarse: int | None = None):
        if int(m) < 1:
            raise ValueError(f"m must be positive, got {m}")
        if coarse is None:
            coarse = max(bins.mantissa_bits - 1, 0)  # half-octave cells
        if not 0 <= int(coarse) <= bins.mantissa_bits:
            raise ValueError(f"coarse must be in [0, mantissa_bits={bins.mantissa_bits}], got {coarse}")
        self.bins = bins
        self.m = int(m)
        self.coarse = int(coarse)
        self.cells = HistogramBins(bins.mantissa_bits - self.coarse, bins.min_exp, bins.max_exp)
        # (N, C, m) per (neuron, cell), ascending priority; free slots: p = 2**31 - 1, tok -1, NaN
        self.prio: torch.Tensor | None = None  # int32
        self.toks: torch.Tensor | None = None  # int32
        self.values: torch.Tensor | None = None  # float32
        self._limit: torch.Tensor | None = None  # (N, C) int32: m-th priority if full, else 2**31 - 1
        self._salt: torch.Tensor | None = None  # (1, N) int32 column hashes, cached

    @property
    def n_cells(self) -> int:
        return self.cells.n_bins

    def cell_of_bin(self) -> np.ndarray:
        """(n_bins,) cell of every histogram bin; non-decreasing, so cells are runs of bins."""
        R, G, k = self.bins.n_regular, self.cells.n_regular, self.coarse
        t = np.arange(R)  # regular index of |x|; negative bin b = R - t, positive R + 4 + t
        neg = G - ((R - np.arange(1, R + 1)) >> k)
        return np.concatenate([[0], neg, [G + 1, G + 2, G + 3], G + 4 + (t >> k), [2 * G + 4]]).astype(np.int64)

    # -------------------------------------------------------------- update

    def _start(self, n: int, device) -> None:
        if self.prio is None:
            C, m = self.n_cells, self.m
            self.prio = torch.full((n, C, m), _P_EMPTY, dtype=torch.int32, device=device)
            self.toks = torch.full((n, C, m), -1, dtype=torch.int32, device=device)
            self.values = torch.full((n, C, m), float("nan"), dtype=torch.float32, device=device)
            self._limit = torch.full((n, C), _P_EMPTY, dtype=torch.int32, device=device)

    def _flat_cell(self, x: torch.Tensor) -> torch.Tensor:
        """neuron * C + cell of every element of x (M, N) float32, int32; the same cells as
        self.cells.index32 (NaN of either sign in the last one) with fewer passes, no masked_fill."""
        G, C, N = self.cells.n_regular, self.n_cells, x.shape[1]
        b = x.view(torch.int32)
        a = b & 0x7FFFFFFF
        s = (b >> 31).bitwise_and_((a - 0x7F800001) >> 31)  # -1 for x < 0 (not NaN), else 0
        t = (a >> (23 - self.cells.mantissa_bits)).sub_((self.cells.min_exp + 127) << self.cells.mantissa_bits)
        t.clamp_(-1, G)  # -1 underflow, G overflow (inf, NaN)
        t += (a - 1) >> 31  # exact zero: one below underflow
        t += 2
        t ^= s  # negatives mirror: (t ^ s) - s = -t
        t -= s
        return t.add_(torch.arange(G + 2, N * C, C, dtype=torch.int32, device=x.device))

    def _salt_for(self, n: int, device) -> torch.Tensor:
        if self._salt is None or self._salt.shape[1] != n or self._salt.device != self.prio.device:
            self._salt = col_hash(n, device)[None, :]
        return self._salt

    def update(self, x: torch.Tensor, tok: torch.Tensor) -> None:
        """x (M, N) activations (cast to float32), tok (M,) global token index of each row."""
        if x.ndim != 2 or tok.shape != (x.shape[0],):
            raise ValueError(f"expected x (M, N) and tok (M,), got {tuple(x.shape)} and {tuple(tok.shape)}")
        check_toks(tok)
        x, tok = x.float(), tok.to(x.device, torch.int64)
        M, N = x.shape
        self._start(N, x.device)
        if self.prio.shape[0] != N:
            raise ValueError(f"state has {self.prio.shape[0]} neurons, batch has {N}")
        if M == 0:
            return
        C = self.n_cells
        if N * C >= 2**31:
            raise ValueError("too many neurons x cells for int32 cell ids")
        # flat (neuron, cell) id and priority per element; admit only what can enter its cell
        g = self._flat_cell(x)
        p = _mix(row_hash(tok)[:, None], self._salt_for(N, x.device))
        r, c = (p <= self._limit.view(-1)[g]).nonzero(as_tuple=True)
        if len(r):
            self._insert(g[r, c], p[r, c], tok[r].to(torch.int32), x[r, c])

    def _insert(self, g: torch.Tensor, p: torch.Tensor, tok: torch.Tensor, val: torch.Tensor) -> None:
        """Merge candidates (flat cell id, priority, tok, value) into the state, m per cell.
        Priorities are distinct within a neuron, so (cell, priority) is one unique int64."""
        m = self.m
        key, o = torch.sort((g.long() << 31) | p.long())
        ug, inv, cnt = torch.unique_consecutive(key >> 31, return_inverse=True, return_counts=True)
        rank = torch.arange(len(key), device=key.device) - (torch.cumsum(cnt, 0) - cnt).index_select(0, inv)
        keep = (rank < m).nonzero()[:, 0]
        at = (inv * m + rank).index_select(0, keep)  # slot in the (U, m) block of new entries
        o = o.index_select(0, keep)
        U, dev = len(ug), key.device
        new = [
            torch.full((U * m,), _P_EMPTY, dtype=torch.int32, device=dev).index_copy_(0, at, p.index_select(0, o)),
            torch.full((U * m,), -1, dtype=torch.int32, device=dev).index_copy_(0, at, tok.index_select(0, o)),
            torch.full((U * m,), float("nan"), dtype=torch.float32, device=dev).index_copy_(0, at, val.index_select(0, o)),
        ]
        P, T, V = (a.view(-1, m) for a in (self.prio, self.toks, self.values))
        self._merge_rows(P, T, V, ug, *(a.view(U, m) for a in new))
        self._limit.view(-1).index_copy_(0, ug, self._row_limit(P.index_select(0, ug), T.index_select(0, ug)))

    def _merge_rows(self, P, T, V, rows, newp, newt, newv) -> None:
        """Rows `rows` of (P, T, V) (R, m) := the m smallest of themselves and (newp, newt, newv);
        rows=None: all rows."""
        old = (P, T, V) if rows is None else (P.index_select(0, rows), T.index_select(0, rows), V.index_select(0, rows))
        allp, allt, allv = (torch.cat([a, b], 1) for a, b in zip(old, (newp, newt, newv)))
        o = torch.sort(_order_key(allp, allt), dim=1).indices[:, : self.m]
        for dst, src in zip((P, T, V), (allp, allt, allv)):
            res = torch.gather(src, 1, o)
            if rows is None:
                dst.copy_(res)
            else:
                dst.index_copy_(0, rows, res)

    @staticmethod
    def _row_limit(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Admission threshold per cell: its m-th priority when full, else everything passes."""
        return torch.where(t[..., -1] >= 0, p[..., -1], torch.full_like(p[..., -1], _P_EMPTY))

    # -------------------------------------------------------------- merge / state

    def _compatible(self, other: "QuantileSamples") -> None:
        if not isinstance(other, QuantileSamples) or (other.bins, other.m, other.coarse) != (self.bins, self.m, self.coarse):
            raise ValueError("cannot merge QuantileSamples with different bins, m or coarse")
        if self.prio is not None and other.prio is not None and self.prio.shape != other.prio.shape:
            raise ValueError(f"cannot merge sample states of shapes {tuple(self.prio.shape)} and {tuple(other.prio.shape)}")

    def merge(self, other: "QuantileSamples") -> "QuantileSamples":
        """Bottom-m of the union per cell; a new object, inputs untouched."""
        self._compatible(other)
        out = QuantileSamples(self.bins, self.m, self.coarse)
        if self.prio is None or other.prio is None:
            src = self if other.prio is None else other
            if src.prio is not None:
                out._set(src.prio.clone(), src.toks.clone(), src.values.clone())
            return out
        dev = self.prio.device
        N, C, m = self.prio.shape
        P, T, V = self.prio.clone(), self.toks.clone(), self.values.clone()
        self._merge_rows(P.view(-1, m), T.view(-1, m), V.view(-1, m), None,
                         *(a.to(dev).reshape(-1, m) for a in (other.prio, other.toks, other.values)))
        out._set(P, T, V)
        return out

    def _set(self, P, T, V) -> None:
        self.prio, self.toks, self.values = P, T, V
        self._limit = self._row_limit(P, T).contiguous()

    def state_dict(self) -> dict[str, torch.Tensor]:
        C, m = self.n_cells, self.m
        if self.prio is None:
            toks = torch.empty(0, C, m, dtype=torch.int32)
            values = torch.empty(0, C, m, dtype=torch.float32)
        else:
            toks, values = self.toks.cpu(), self.values.cpu()
        return {
            **self.bins.state_dict(),
            "m": torch.tensor(m, dtype=torch.int64),
            "coarse": torch.tensor(self.coarse, dtype=torch.int64),
            "toks": toks.contiguous(),
            "values": values.contiguous(),
        }

    @classmethod
    def from_state_dict(cls, d: dict[str, torch.Tensor]) -> "QuantileSamples":
        """Priorities are recomputed from (tok, neuron); the slots are already in their order."""
        out = cls(HistogramBins.from_state_dict(d), int(d["m"]), int(d["coarse"]))
        toks = d["toks"].to(torch.int32)
        if toks.shape[0] > 0:
            N, C, m = toks.shape
            if (C, m) != (out.n_cells, out.m):
                raise ValueError(f"state of shape {tuple(toks.shape)} does not match {out.n_cells} cells x m={out.m}")
            p = _mix(row_hash(toks.clamp(min=0).reshape(-1)).view(N, C * m), col_hash(N, toks.device)[:, None])
            p = p.view(N, C, m).masked_fill_(toks < 0, _P_EMPTY)
            out._set(p, toks.clone(), d["values"].float().clone())
        return out

    def entries(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(priority int64, tok int64, value float32), each (N, C, m), ascending priority per cell;
        free slots have tok -1, priority 2**31 and value NaN."""
        tok = self.toks.cpu().numpy().astype(np.int64)
        prio = np.where(tok < 0, 1 << 31, self.prio.cpu().numpy())
        return prio, tok, self.values.cpu().numpy()

    # -------------------------------------------------------------- finalize

    def finalize(self, counts, vmin, vmax, rank_bands=RANK_BANDS, frac_bands=FRAC_BANDS) -> dict:
        """Samples per neuron and band, for each kind in ('all', 'firing', 'frac_max').

        counts (N, n_bins) the histogram of the same data on the same bins; vmin, vmax (N,) the
        exact per-neuron min and max (NaN or any value where a neuron saw nothing). Bands are
        (lo, hi) in percent. Returns {kind: {"labels": ["90-95", ...], "values": (N, B, m) float32,
        "toks": (N, B, m) int64, "n_exact": (N, B) int64, "lo": (N, B), "hi": (N, B) float64,
        "n": (N, B) int64}}, samples ordered by effective priority (NaN / -1 where fewer than m),
        the first n_exact of them exact (see the module doc); every value lies in [lo, hi] (for
        frac_max, lo excluded); n = tokens in the band (-1 for frac_max, not known from counts).
        """
        bins, m = self.bins, self.m
        counts = np.asarray(counts, dtype=np.int64)
        N = 0 if self.prio is None else self.prio.shape[0]
        if counts.ndim != 2 or counts.shape[1] != bins.n_bins or (N and counts.shape[0] != N):
            raise ValueError(f"counts must be (N, {bins.n_bins}) for N = {N}, got {counts.shape}")
        N = counts.shape[0]
        vmin = np.broadcast_to(np.asarray(vmin, np.float64), (N,))
        vmax = np.broadcast_to(np.asarray(vmax, np.float64), (N,))
        C = self.n_cells
        if self.prio is None:
            prio = np.full((N, C, m), 1 << 31, np.int64)
            tok = np.full((N, C, m), -1, np.int64)
            val = np.full((N, C, m), np.nan, np.float32)
        else:
            prio, tok, val = self.entries()
        cob = self.cell_of_bin()
        starts = np.searchsorted(cob, np.arange(C))  # first bin of each cell
        ctx = _Context(
            m=m, prio=prio.reshape(N, -1), tok=tok.reshape(N, -1), val=val.reshape(N, -1),
            ebin=bins.index(torch.from_numpy(val)).numpy().reshape(N, -1) if N else np.zeros((0, C * m), np.int64),
            cell=np.broadcast_to(np.repeat(np.arange(C), m), (N, C * m)),
            starts=starts, full=np.add.reduceat(counts, starts, axis=1) > m if N else np.zeros((0, C), bool),
            last_prio=prio[:, :, -1],
        )
        lo_e, hi_e = bins.edges()
        out = {}
        for kind in KINDS:
            bands = frac_bands if kind == "frac_max" else rank_bands
            B = len(bands)
            res = {
                "labels": [f"{_fmt(a)}-{_fmt(b)}" for a, b in bands],
                "values": np.full((N, B, m), np.nan, np.float32),
                "toks": np.full((N, B, m), -1, np.int64),
                "n_exact": np.zeros((N, B), np.int64),
                "lo": np.full((N, B), np.nan), "hi": np.full((N, B), np.nan),
                "n": np.full((N, B), -1, np.int64),
            }
            for j, (a, b) in enumerate(bands):
                if kind == "frac_max":
                    t_lo, t_hi = float(Fraction(str(a)) / 100) * vmax, float(Fraction(str(b)) / 100) * vmax
                    ok = vmax > 0
                    t_lo, t_hi = np.where(ok, t_lo, np.inf), np.where(ok, t_hi, -np.inf)
                    pos = np.arange(bins.n_bins) > bins.zero_bin
                    hit = pos & (lo_e <= t_hi[:, None]) & (hi_e > t_lo[:, None]) & (counts > 0)
                    w = np.where(hit, counts, 0)
                    vfilt = (t_lo, t_hi)
                    res["lo"][:, j], res["hi"][:, j] = np.where(ok, t_lo, np.nan), np.where(ok, t_hi, np.nan)
                else:
                    c = counts.copy()
                    if kind == "firing":
                        c[:, : bins.zero_bin + 1] = 0
                    n = c.sum(axis=1)
                    r_lo = _floor_frac(a, n) + 1
                    r_hi = _floor_frac(b, n)
                    cum = np.cumsum(c, axis=1)
                    w = np.clip(np.minimum(cum, r_hi[:, None]) - np.maximum(cum - c, r_lo[:, None] - 1), 0, None)
                    w = np.where(c > 0, w, 0)
                    vfilt = None
                    has = r_hi >= r_lo
                    res["n"][:, j] = np.maximum(r_hi - r_lo + 1, 0)
                    b_lo = np.argmax(w > 0, axis=1)
                    b_hi = bins.n_bins - 1 - np.argmax(w[:, ::-1] > 0, axis=1)
                    res["lo"][:, j] = np.where(has, np.maximum(lo_e[b_lo], vmin), np.nan)
                    res["hi"][:, j] = np.where(has, np.minimum(hi_e[b_hi], vmax), np.nan)
                v, t, ne = ctx.band(counts, w, vfilt)
                res["values"][:, j], res["toks"][:, j], res["n_exact"][:, j] = v, t, ne
            out[kind] = res
        return out


def _fmt(p) -> str:
    return str(int(p)) if float(p) == int(p) else str(p)


def _floor_frac(pct, n: np.ndarray) -> np.ndarray:
    """floor(pct / 100 * n) exactly, for pct given as a number."""
    f = Fraction(str(pct)) / 100
    return (n * f.numerator) // f.denominator


class _Context:
    """Stored entries flattened per neuron (N, C*m) and per-cell facts, for band selection."""

    def __init__(self, **kw):
        self.__dict__.update(kw)

    def band(self, counts: np.ndarray, w: np.ndarray, vfilt):
        """Select up to m entries of the band with bin weights w (N, n_bins); see the module doc."""
        m, N = self.m, counts.shape[0]
        with np.errstate(divide="ignore", invalid="ignore"):
            s = np.where(w > 0, counts / np.where(w > 0, w, 1), np.inf)  # (N, n_bins) priority scale
        rows = np.arange(N)[:, None]
        se = s[rows, self.ebin]
        inb = (self.tok >= 0) & np.isfinite(se)
        if vfilt is not None:
            v = self.val.astype(np.float64)
            inb &= (v > vfilt[0][:, None]) & (v <= vfilt[1][:, None])
        e = np.where(inb, self.prio * np.where(inb, se, 1.0), np.inf)
        # per cell: the bound below which it holds every band token, and whether it is harmless
        smin = np.minimum.reduceat(s, self.starts, axis=1)  # (N, C)
        E = self.last_prio * smin  # a missing token of the cell has e > E (priorities are distinct)
        below = inb & (e <= E[rows, self.cell])
        C = E.shape[1]
        k = np.bincount((rows * C + self.cell)[below], minlength=N * C).reshape(N, C)
        limiting = self.full & np.isfinite(smin) & (k < m)
        exact = inb & (e <= np.where(limiting, E, np.inf).min(axis=1)[:, None])
        o = np.lexsort((self.tok, e, ~exact, ~inb), axis=-1)[:, :m]
        take = np.take_along_axis(inb, o, 1)
        vals = np.where(take, np.take_along_axis(self.val, o, 1), np.nan).astype(np.float32)
        toks = np.where(take, np.take_along_axis(self.tok, o, 1), -1)
        return vals, toks, np.minimum(exact.sum(axis=1), m)
