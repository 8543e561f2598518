"""Exact per-neuron top-k (and bottom-k) with deterministic tie-breaking.

Each (value, token) pair is packed into one int64 key whose order is the rank order:
high bits = an order-preserving integer image of the float32 value (negated for bottom-k),
low 31 bits = 2**31 - 1 - tok, so equal values rank the lower global token index first.
Top-k of keys is then one `torch.topk`, with no sort and no tie ambiguity: keys are unique
as long as token indices are, which makes update and merge independent of sharding and
merge order, bit for bit.

A floor (the k-th key of another, completed shard of the same job) lets a shard skip every value that
can never reach the merged top-k: at least k keys of that other shard rank above it. A floored state
holds only its shard's keys at or above the floor, so it is no longer that shard's own top-k, but the
merge over all shards is unchanged, bit for bit. Floors only ever come from shards in the final merge.

Limits: token indices must lie in [0, 2**31) (ValueError otherwise). NaN values are ignored:
they map to the empty-slot key, so they never displace a real value and are never emitted.
-0.0 and +0.0 count as equal (ties go to the lower token) and come back as +0.0.
"""

from __future__ import annotations

import torch

from . import device, kernels

EMPTY = torch.iinfo(torch.int64).min  # key of a free slot; below every real key
MAX_TOK = 2**31 - 1
_SHIFT = 2**31
_ABS = 0x7FFFFFFF  # float32 bits without the sign
_INF_BITS = 0x7F800000  # |bits| above this is NaN
SPARSE = 8  # candidates above 1/SPARSE of a batch: rank it densely instead


def check_toks(tok: torch.Tensor) -> None:
    """Keys have 31 bits for the token index; one host sync per batch."""
    if tok.numel() == 0:
        return
    lo, hi = torch.stack(torch.aminmax(tok)).tolist()
    if lo < 0 or hi > MAX_TOK:
        raise ValueError(f"token indices must be in [0, 2**31 - 1] for top-k keys, got range [{lo}, {hi}]")


def encode(x: torch.Tensor, tok: torch.Tensor, largest: bool) -> torch.Tensor:
    """x (..., N) float32, tok int64 in [0, 2**31) broadcastable to x -> int64 keys, larger = better."""
    b = x.view(torch.int32)
    sign = b >> 31  # 0 or -1
    o = b & _ABS
    nan = o > _INF_BITS
    # sign-magnitude -> two's complement: monotone in the float, and -0.0 == +0.0
    o ^= sign
    o -= sign
    if not largest:
        o.neg_()
    # in place from here: fewer large temporaries is most of the speed on the CPU
    key = o.long().mul_(_SHIFT).add_(MAX_TOK - tok)
    return key.masked_fill_(nan, EMPTY)


def decode(keys: torch.Tensor, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `encode`; free slots give tok -1 and value -inf (largest) / +inf (smallest)."""
    empty = keys == EMPTY
    o = torch.div(keys, _SHIFT, rounding_mode="floor")
    tok = (MAX_TOK - (keys - o * _SHIFT)).masked_fill_(empty, -1)
    if not largest:
        o = -o
    mag = o.abs().masked_fill_(empty, 0).to(torch.int32).view(torch.float32)
    values = torch.where(o < 0, -mag, mag)
    return values.masked_fill_(empty, float("-inf") if largest else float("inf")), tok


def _best(a: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(torch.cat([a, b]), k, dim=0, sorted=True).values


def _add_batch(state: torch.Tensor, keys: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k of state (k, N) and keys (M, N). The batch is cut to its own top-k first so the
    large array is ranked once, unsorted, and never copied by a cat."""
    if keys.shape[0] > k:
        keys = torch.topk(keys, k, dim=0, sorted=False).values
    return _best(state, keys, k)


class TopK:
    """Per-column top-k (largest=True) or bottom-k of float32 activations with their tokens."""

    def __init__(self, k: int, largest: bool = True):
        if int(k) < 1:
            raise ValueError(f"k must be positive, got {k}")
        self.k = int(k)
        self.largest = bool(largest)
        self.keys: torch.Tensor | None = None  # (k, N) int64, best first; None until N is known
        self.floor: torch.Tensor | None = None  # (N,) int64 keys that can never make the merged top-k
        self._settled_keys: torch.Tensor | None = None  # the keys settled() last found settled
        # the device path's host-side bookkeeping (reducers/device.py): no device value is read per batch
        self.seen = 0  # rows given to update
        self.floor_rows = 0  # rows behind the floor (the stored shards' tokens it was taken from)
        self.sparse = True  # False: always rank densely (the miner's retry after an overflow)
        self._overflow: torch.Tensor | None = None  # device int32: a sparse batch filled its capacity

    def set_floor(self, floor: torch.Tensor | None, rows: int = 0) -> None:
        """Keys below `floor` (N,) are dropped: valid only if it comes from a shard in the final merge.
        rows: how many rows the floor was taken from (sizes the device path's candidate buffers)."""
        self.floor = floor
        self.floor_rows = rows if floor is not None else 0
        self._settled_keys = None

    def sparse_capacity(self, M: int, N: int, margin: int = 4) -> int | None:
        """Candidates buffer for a batch of M x N on the device path, or None to rank it densely. A new
        value beats the k-th of `basis` earlier ones with chance about k / basis, so a batch has about
        k N M / basis candidates: the buffer holds `margin` times that (a power of two, so shapes repeat).
        Real batches are lumpy (a repeated passage can hold many columns' best values at once), so a
        caller whose cost does not grow with the buffer (cuda_layer) asks for a wider margin."""
        basis = self.seen + self.floor_rows
        if not self.sparse or basis < self.k:
            return None
        want = int(margin * self.k * N * M / basis) + 2 * N
        cap = 1 << (want - 1).bit_length()
        return cap if cap * 4 <= M * N else None

    def overflow_buffer(self, device: torch.device) -> torch.Tensor:
        """int32 device scalar, non-zero once a sparse batch filled its candidate buffer."""
        if self._overflow is None:
            self._overflow = torch.zeros((), dtype=torch.int32, device=device)
        return self._overflow

    def flag_overflow(self, full: torch.Tensor) -> None:
        self.overflow_buffer(full.device).logical_or_(full)

    def overflowed(self) -> bool:
        """A sparse batch may have dropped candidates (one host sync: call once per shard)."""
        return self._overflow is not None and bool(self._overflow)

    def settled(self) -> bool:
        """Few values can still enter: every column holds k keys, or has a floor. Until then one batch may
        hold M x N candidates, which are ranked densely. Stays true for the same keys tensor (inserts only
        raise it), so the check costs one pass per state, not one per batch."""
        if self._settled_keys is not self.keys:
            if self.keys is None or not (bool((self.keys[-1] != EMPTY).all())
                                         or (self.floor is not None and bool((self.floor != EMPTY).all()))):
                return False
            self._settled_keys = self.keys
        return True

    def threshold(self) -> torch.Tensor:
        """(N,) the key a new entry must beat: the k-th kept key, or the floor if higher."""
        return self.keys[-1] if self.floor is None else torch.maximum(self.keys[-1], self.floor.to(self.keys.device))

    def update(self, x: torch.Tensor, tok: torch.Tensor, check: bool = True) -> None:
        """x (M, N) activations (cast to float32), tok (M,) global token index of each row.
        check=False skips the token-range check (one host sync) when the caller has done it."""
        if x.ndim != 2 or tok.shape != (x.shape[0],):
            raise ValueError(f"expected x (M, N) and tok (M,), got {tuple(x.shape)} and {tuple(tok.shape)}")
        if check:
            check_toks(tok)
        if device.applies(x):
            device.topk_update(self, x, tok.to(x.device, torch.int64))
            return
        x, tok = x.float(), tok.to(x.device, torch.int64)[:, None]
        self._start(x.shape[1], x.device)
        if x.shape[0] == 0:
            return
        # Early exit on the floats, before any key is built: only values at least as extreme as
        # their column's threshold can enter (ties may still win on a lower tok). Once thresholds
        # settle that is a small fraction of the batch, ranked sparsely.
        kth, _ = decode(self.threshold(), self.largest)
        if kernels.usable(x) and self.keys.is_contiguous():
            # once settled, inserting is cheap; until then only if few values can enter
            if self.settled() or kernels.count_candidates(x, kth, self.largest) * SPARSE <= x.numel():
                kernels.topk_insert(self.keys, self.floor, x, kth, tok[:, 0], self.largest)
                return
            found = None
        else:
            cand = (x >= kth) if self.largest else (x <= kth)
            n = int(cand.sum())
            found = None if n * SPARSE > cand.numel() else cand.nonzero(as_tuple=True)
        if found is None:  # many candidates (early batches): rank the batch densely
            self.keys = _add_batch(self.keys, self._floored(encode(x, tok, self.largest), None), self.k)
            return
        rows, cols = found
        if len(rows):
            self._add_sparse(encode(x[rows, cols], tok[rows, 0], self.largest), cols)

    def _add_sparse(self, keys: torch.Tensor, cols: torch.Tensor) -> None:
        """Add keys (C,) of columns cols (C,): the best k of each column, then one merge with the state."""
        keys = self._floored(keys, cols)
        keep = keys > self.keys[-1, cols]  # cannot enter otherwise (keys are unique)
        keys, cols = keys[keep], cols[keep]
        if len(keys) == 0:
            return
        order = torch.sort(keys, descending=True).indices
        order = order[torch.sort(cols[order], stable=True).indices]  # by column, best first within
        keys, cols = keys[order], cols[order]
        first = torch.searchsorted(cols, cols, right=False)  # start of each column's run
        rank = torch.arange(len(cols), device=cols.device) - first
        top = rank < self.k
        buf = torch.full_like(self.keys, EMPTY)
        buf[rank[top], cols[top]] = keys[top]
        touched = torch.unique(cols)
        self.keys[:, touched] = _best(self.keys[:, touched], buf[:, touched], self.k)

    def _floored(self, keys: torch.Tensor, cols: torch.Tensor | None) -> torch.Tensor:
        """keys (M, N), or (C,) entries of columns `cols`, with those below the floor freed."""
        if self.floor is None:
            return keys
        floor = self.floor.to(keys.device)
        return keys.masked_fill_(keys < (floor if cols is None else floor[cols]), EMPTY)

    def _start(self, n: int, device: torch.device) -> bool:
        """Allocate an all-free state on first use; True if it was empty until now."""
        if self.keys is not None:
            return False
        self.keys = torch.full((self.k, n), EMPTY, dtype=torch.int64, device=device)
        return True

    def _compatible(self, other: "TopK") -> None:
        if type(other) is not type(self) or (other.k, other.largest) != (self.k, self.largest):
            raise ValueError("cannot merge top-k states with different k or direction")
        if self.keys is not None and other.keys is not None and self.keys.shape != other.keys.shape:
            raise ValueError(f"cannot merge top-k states of shapes {tuple(self.keys.shape)} and {tuple(other.keys.shape)}")

    def merge(self, other: "TopK") -> "TopK":
        """Top-k of the union; a new object, inputs untouched."""
        self._compatible(other)
        out = TopK(self.k, self.largest)
        if self.keys is None or other.keys is None:
            src = self.keys if other.keys is None else other.keys
            out.keys = None if src is None else src.clone()
        else:
            out.keys = _best(self.keys, other.keys.to(self.keys.device), self.k)
        out.seen = self.seen + other.seen
        return out

    def finalize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """values (k, N) float32 and toks (k, N) int64, rank 0 first; free slots have tok -1."""
        if self.keys is None:
            return torch.empty(self.k, 0), torch.empty(self.k, 0, dtype=torch.int64)
        return decode(self.keys, self.largest)

    def state_dict(self) -> dict[str, torch.Tensor]:
        values, toks = self.finalize()
        return {
            "k": torch.tensor(self.k, dtype=torch.int64),
            "largest": torch.tensor(int(self.largest), dtype=torch.int64),
            "values": values.cpu().contiguous(),
            "toks": toks.cpu().contiguous(),
        }

    @classmethod
    def from_state_dict(cls, d: dict[str, torch.Tensor]) -> "TopK":
        out = cls(int(d["k"]), bool(int(d["largest"])))
        values, toks = d["values"], d["toks"]
        if values.shape[1] > 0:
            out.keys = encode(values.float().contiguous(), toks.clamp(min=0), out.largest).masked_fill_(toks < 0, EMPTY)
        return out


def _rising(tok: torch.Tensor, mined: torch.Tensor) -> bool:
    """Each row's mined toks strictly increase with position (as the miner's contexts do)."""
    before = tok.masked_fill(~mined, -1).cummax(dim=1).values[:, :-1]
    return bool(((tok[:, 1:] > before) | ~mined[:, 1:]).all())


class ContextTopK:
    """Top-k contexts per neuron, ranked by the context's peak activation (one entry per context)."""

    MAX_CHUNK = 2**25  # elements of (rows, T, N) keys built at once; bounds temporary memory

    def __init__(self, k: int):
        self.top = TopK(k, largest=True)

    @property
    def k(self) -> int:
        return self.top.k

    def set_floor(self, floor: torch.Tensor | None, rows: int = 0) -> None:
        self.top.set_floor(floor, rows)

    def update(self, x: torch.Tensor, tok: torch.Tensor, check: bool = True, rising: bool | None = None) -> None:
        """x (B, T, N); tok (B, T) global token index, -1 where the position is not mined. `rising`: the
        caller knows whether each row's toks rise with position (the miner's contexts do); None: check."""
        if x.ndim != 3 or tok.shape != x.shape[:2]:
            raise ValueError(f"expected x (B, T, N) and tok (B, T), got {tuple(x.shape)} and {tuple(tok.shape)}")
        tok = tok.to(x.device, torch.int64)
        mined = tok >= 0
        if check:
            check_toks(tok[mined])
        if device.applies(x) and (rising if rising is not None else _rising(tok, mined)):
            device.context_update(self, x, tok, mined)
            return
        B, T, N = x.shape
        self.top._start(N, x.device)
        if B == 0:
            return
        # Each context's peak and its first position (torch.max keeps the first of equal values:
        # the lowest tok, the keys' tie rule; -0.0 equals +0.0 in both). Only the (context, neuron)
        # pairs whose peak can enter get a key.
        kth, _ = decode(self.top.threshold(), largest=True)
        if kernels.usable(x):
            peak, where = kernels.context_peaks(x, mined)
        else:
            peak, where = x.float().masked_fill(~mined[..., None], float("-inf")).max(dim=1)  # (B, N)
        has_mined = mined.any(dim=1)[:, None]
        if rising is None:
            rising = _rising(tok, mined)
        if rising and not bool((~torch.isfinite(peak) & has_mined).any()):
            if kernels.usable(x) and self.top.keys.is_contiguous():
                kernels.context_insert(self.top.keys, self.top.floor, peak, where, tok, has_mined[:, 0], kth)
                return
            ctx, cols = ((peak >= kth) & has_mined).nonzero(as_tuple=True)
            keys = encode(peak[ctx, cols].contiguous(), tok[ctx, where[ctx, cols]], largest=True)
            self.top._add_sparse(keys, cols)
            return
        # A NaN or infinite peak (NaN never enters; an all -inf context must still pick its lowest
        # mined tok), or toks that do not rise along a context (the first equal peak would not be the
        # lowest tok): the exact path, keys over every position of the candidate pairs.
        peak = peak.nan_to_num(nan=float("inf"))  # a NaN hides the context's real peak: keep it a candidate
        ctx, cols = (peak >= kth).nonzero(as_tuple=True)
        for lo in range(0, len(ctx), max(1, self.MAX_CHUNK // T)):  # (pairs, T) keys at a time
            c, n = ctx[lo:lo + self.MAX_CHUNK // T], cols[lo:lo + self.MAX_CHUNK // T]
            keys = encode(x[c, :, n].float(), tok[c].clamp(min=0), largest=True)  # (pairs, T)
            keys.masked_fill_(~mined[c], EMPTY)
            self.top._add_sparse(keys.amax(dim=1), n)  # the key max is the peak, lower tok on ties

    def merge(self, other: "ContextTopK") -> "ContextTopK":
        if not isinstance(other, ContextTopK):
            raise ValueError("cannot merge ContextTopK with another reducer type")
        out = ContextTopK(self.k)
        out.top = self.top.merge(other.top)
        return out

    def finalize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """values (k, N) peak activations, toks (k, N) the peak token of each context; -1 = free."""
        return self.top.finalize()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.top.state_dict()

    @classmethod
    def from_state_dict(cls, d: dict[str, torch.Tensor]) -> "ContextTopK":
        out = cls(int(d["k"]))
        out.top = TopK.from_state_dict(d)
        return out
