"""Exact per-neuron top-k (and bottom-k) with deterministic tie-breaking.

Each (value, token) pair is packed into one int64 key whose order is the rank order:
high bits = an order-preserving integer image of the float32 value (negated for bottom-k),
low 31 bits = 2**31 - 1 - tok, so equal values rank the lower global token index first.
Top-k of keys is then one `torch.topk`, with no sort and no tie ambiguity: keys are unique
as long as token indices are, which makes update and merge independent of sharding and
merge order, bit for bit.

Limits: token indices must lie in [0, 2**31) (ValueError otherwise). NaN values are ignored:
they map to the empty-slot key, so they never displace a real value and are never emitted.
-0.0 and +0.0 count as equal (ties go to the lower token) and come back as +0.0.
"""

from __future__ import annotations

import torch

EMPTY = torch.iinfo(torch.int64).min  # key of a free slot; below every real key
MAX_TOK = 2**31 - 1
_SHIFT = 2**31
_ABS = 0x7FFFFFFF  # float32 bits without the sign
_INF_BITS = 0x7F800000  # |bits| above this is NaN


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

    def update(self, x: torch.Tensor, tok: torch.Tensor) -> None:
        """x (M, N) activations (cast to float32), tok (M,) global token index of each row."""
        if x.ndim != 2 or tok.shape != (x.shape[0],):
            raise ValueError(f"expected x (M, N) and tok (M,), got {tuple(x.shape)} and {tuple(tok.shape)}")
        check_toks(tok)
        x, tok = x.float(), tok.to(x.device, torch.int64)[:, None]
        if self._start(x.shape[1], x.device) or x.shape[0] == 0:
            self.keys = _add_batch(self.keys, encode(x, tok, self.largest), self.k)
            return
        # Early exit, on the floats before any key is built: only columns with a value at least
        # as extreme as their current k-th (ties may still win on a lower tok) can change.
        kth, _ = decode(self.keys[-1], self.largest)
        cols = ((x >= kth) if self.largest else (x <= kth)).any(0).nonzero()[:, 0]
        if len(cols) == 0:
            return
        if 2 * len(cols) > x.shape[1]:
            self.keys = _add_batch(self.keys, encode(x, tok, self.largest), self.k)
        else:  # steady state: few columns move, so only they are encoded and ranked
            self.keys[:, cols] = _add_batch(self.keys[:, cols], encode(x[:, cols], tok, self.largest), self.k)

    def _start(self, n: int, device: torch.device) -> bool:
        """Allocate an all-free state on first use; True if it was empty until now."""
        if self.keys is not None:
            return False
        self.keys = torch.full((self.k, n), EMPTY, dtype=torch.int64, device=device)
        return True

    def _update_keys(self, keys: torch.Tensor) -> None:
        """Add already-encoded keys (M, N), e.g. per-context peaks."""
        if self._start(keys.shape[1], keys.device) or keys.shape[0] == 0:
            self.keys = _add_batch(self.keys, keys, self.k)
            return
        cols = (keys > self.keys[-1]).any(0).nonzero()[:, 0]
        if len(cols):
            self.keys[:, cols] = _add_batch(self.keys[:, cols], keys[:, cols], self.k)

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


class ContextTopK:
    """Top-k contexts per neuron, ranked by the context's peak activation (one entry per context)."""

    MAX_CHUNK = 2**25  # elements of (rows, T, N) keys built at once; bounds temporary memory

    def __init__(self, k: int):
        self.top = TopK(k, largest=True)

    @property
    def k(self) -> int:
        return self.top.k

    def update(self, x: torch.Tensor, tok: torch.Tensor) -> None:
        """x (B, T, N); tok (B, T) global token index, -1 where the position is not mined."""
        if x.ndim != 3 or tok.shape != x.shape[:2]:
            raise ValueError(f"expected x (B, T, N) and tok (B, T), got {tuple(x.shape)} and {tuple(tok.shape)}")
        tok = tok.to(x.device, torch.int64)
        mined = tok >= 0
        check_toks(tok[mined])
        B, T, N = x.shape
        rows = max(1, self.MAX_CHUNK // max(1, T * N))
        peaks = []
        for lo in range(0, B, rows):
            sl = slice(lo, lo + rows)
            keys = encode(x[sl].float(), tok[sl, :, None].clamp(min=0), largest=True)
            keys.masked_fill_(~mined[sl, :, None], EMPTY)
            peaks.append(keys.amax(dim=1))  # the key max is the peak value, lower tok on ties
        # contexts without a mined position peak at EMPTY and never enter
        self.top._update_keys(torch.cat(peaks) if peaks else torch.empty(0, N, dtype=torch.int64, device=x.device))

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
