"""Per-neuron running moments, mergeable with Pébay's parallel formulas (Chan et al. for M2).

Each batch's centered sums M_p = sum (x - mean)^p are computed two-pass in float64 and then
combined with the running state, which stays accurate where a single sum of powers would cancel.
NaN activations propagate into mean/moments/min/max (they are not filtered).
"""

from __future__ import annotations

import numpy as np
import torch

from . import kernels

_STATS = ("mean", "m2", "m3", "m4")


class Moments:
    """count, mean, M2..M4 (float64), n_active (x > 0), min, max per neuron."""

    def __init__(self):
        self.count = 0  # rows seen; the same for every neuron
        self.mean = self.m2 = self.m3 = self.m4 = None  # (N,) float64
        self.n_active: torch.Tensor | None = None  # (N,) int64
        self.min = self.max = None  # (N,) float64

    def update(self, x: torch.Tensor) -> None:
        """x (M, N)."""
        if x.ndim != 2:
            raise ValueError(f"expected x (M, N), got {tuple(x.shape)}")
        if x.shape[0] == 0:
            if self.mean is None:  # learn N and the device, still an empty state
                self._set(_batch_moments(x))
                self.count = 0
            return
        self._set(_combine(self._get(), _batch_moments(x)))

    def add_batch(self, batch: dict) -> None:
        """A batch's count, mean, centred m2..m4, n_active, min and max (as _batch_moments gives them)."""
        self._set(_combine(self._get(), batch))

    def _get(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2, "m3": self.m3, "m4": self.m4,
                "n_active": self.n_active, "min": self.min, "max": self.max}

    def _set(self, s: dict) -> None:
        for k, v in s.items():
            setattr(self, k, v)

    def merge(self, other: "Moments") -> "Moments":
        if not isinstance(other, Moments):
            raise ValueError("cannot merge Moments with another reducer type")
        a, b = self._get(), other._get()
        if a["mean"] is not None and b["mean"] is not None:
            if a["mean"].shape != b["mean"].shape:
                raise ValueError(f"cannot merge moments of {a['mean'].shape[0]} and {b['mean'].shape[0]} neurons")
            b = {k: (v.to(a["mean"].device) if torch.is_tensor(v) else v) for k, v in b.items()}
        out = Moments()
        out._set(_combine(a, b))
        return out

    def finalize(self) -> dict[str, np.ndarray]:
        """Arrays of length N: count (int64), mean, std (population), skew, kurtosis (excess),
        frac_active, min, max (float64). skew/kurtosis are NaN where the variance is 0."""
        if self.mean is None:
            return {k: np.zeros(0, np.int64 if k == "count" else np.float64)
                    for k in ("count", "mean", "std", "skew", "kurtosis", "frac_active", "min", "max")}
        n = self.count
        mean, m2, m3, m4 = (t.cpu().numpy() for t in (self.mean, self.m2, self.m3, self.m4))
        N = len(mean)
        empty = np.full(N, np.nan)
        if n == 0:
            return {"count": np.zeros(N, np.int64), "mean": empty, "std": empty.copy(), "skew": empty.copy(),
                    "kurtosis": empty.copy(), "frac_active": empty.copy(), "min": empty.copy(), "max": empty.copy()}
        with np.errstate(divide="ignore", invalid="ignore"):
            flat = m2 == 0
            skew = np.where(flat, np.nan, np.sqrt(n) * m3 / m2**1.5)
            kurt = np.where(flat, np.nan, n * m4 / m2**2 - 3.0)
        return {
            "count": np.full(N, n, np.int64),
            "mean": mean,
            "std": np.sqrt(m2 / n),
            "skew": skew,
            "kurtosis": kurt,
            "frac_active": self.n_active.cpu().numpy() / n,
            "min": self.min.cpu().numpy(),
            "max": self.max.cpu().numpy(),
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        s = self._get()
        out = {"count": torch.tensor(self.count, dtype=torch.int64)}
        for k in (*_STATS, "min", "max"):
            out[k] = s[k].cpu().contiguous() if s[k] is not None else torch.zeros(0, dtype=torch.float64)
        out["n_active"] = self.n_active.cpu().contiguous() if self.n_active is not None else torch.zeros(0, dtype=torch.int64)
        return out

    @classmethod
    def from_state_dict(cls, d: dict[str, torch.Tensor]) -> "Moments":
        out = cls()
        out.count = int(d["count"])
        if d["mean"].shape[0] > 0:
            out._set({k: d[k].to(torch.float64) for k in (*_STATS, "min", "max")})
            out.n_active = d["n_active"].to(torch.int64)
        return out


CHUNK_ELEMENTS = 2**17
"""Rows are taken this many float64 elements at a time (1 MiB): the temporaries of the centered
powers stay in cache, which makes the two passes about twice as fast as whole-batch arrays."""
DEVICE_CHUNK_ELEMENTS = 2**25
"""On an accelerator: 256 MiB of float64 temporaries per chunk, so a (32768, 1536) batch is two chunks."""


def _batch_moments(x: torch.Tensor) -> dict:
    M, N = x.shape
    if M and kernels.usable(x):
        return {"count": M, **kernels.moments(x)}
    # a GPU wants whole-batch kernels, not cache-sized chunks (each chunk is ~10 launches)
    rows = max(1, (CHUNK_ELEMENTS if x.device.type == "cpu" else DEVICE_CHUNK_ELEMENTS) // max(N, 1))
    total = torch.zeros(N, dtype=torch.float64, device=x.device)
    for lo in range(0, M, rows):
        total += x[lo:lo + rows].sum(0, dtype=torch.float64)
    mean = total / M if M else total
    m2, m3, m4 = (torch.zeros_like(total) for _ in range(3))
    active = torch.zeros(N, dtype=torch.int64, device=x.device)
    for lo in range(0, M, rows):  # second pass: centered sums of this batch, in float64
        chunk = x[lo:lo + rows]
        d = chunk.double() - mean
        d2 = d * d
        m2 += d2.sum(0)
        m3 += d.mul_(d2).sum(0)  # d is not needed after this; reuse its memory
        m4 += d2.square_().sum(0)
        active += (chunk > 0).sum(0)
    if M:
        lo_, hi = x.amin(0).double(), x.amax(0).double()  # (aminmax along dim 0 is 10x slower on CPU)
    else:
        lo_, hi = torch.full_like(mean, np.inf), torch.full_like(mean, -np.inf)
    return {"count": M, "mean": mean, "m2": m2, "m3": m3, "m4": m4, "n_active": active, "min": lo_, "max": hi}


def _combine(a: dict, b: dict) -> dict:
    """Pébay (2008) pairwise update of centered moments; an empty side is the identity."""
    def copy(s: dict) -> dict:
        return {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()}

    if a["mean"] is None or (a["count"] == 0 and b["mean"] is not None):
        return copy(b)
    if b["mean"] is None or b["count"] == 0:
        return copy(a)
    na, nb = float(a["count"]), float(b["count"])  # floats: na * na would overflow int64 scalars
    fast = kernels.combined_moments(na, a, nb, b)  # the same arithmetic in one compiled loop, where it applies
    if fast is not None:
        mean, m2, m3, m4 = fast
    else:
        n = na + nb
        delta = b["mean"] - a["mean"]
        d_n = delta / n
        d_n2 = d_n * d_n
        term = delta * d_n * na * nb  # = delta^2 na nb / n
        mean = a["mean"] + d_n * nb
        m2 = a["m2"] + b["m2"] + term
        m3 = a["m3"] + b["m3"] + term * d_n * (na - nb) + 3 * d_n * (na * b["m2"] - nb * a["m2"])
        m4 = (a["m4"] + b["m4"] + term * d_n2 * (na * na - na * nb + nb * nb)
              + 6 * d_n2 * (na * na * b["m2"] + nb * nb * a["m2"]) + 4 * d_n * (na * b["m3"] - nb * a["m3"]))
    return {"count": a["count"] + b["count"], "mean": mean, "m2": m2, "m3": m3, "m4": m4, "n_active": a["n_active"] + b["n_active"],
            "min": torch.minimum(a["min"], b["min"]), "max": torch.maximum(a["max"], b["max"])}
