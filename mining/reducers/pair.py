"""Paired statistics of two models' activations at the same tokens (diff jobs), mergeable.

PairMoments: per neuron, A's and B's means and centered second moments, their co-moment and the
summed |B - A| -> correlation and mean absolute difference.
CrossMoments: the same co-moment for every (A neuron, B neuron) pair of a layer -> the cross-
correlation matrix, from which each A neuron's best-matching B neuron is read.
Both merge with Chan et al.'s pairwise formulas in float64 (C = C_1 + C_2 + d_a d_b n_1 n_2 / n).
"""

from __future__ import annotations

import numpy as np
import torch


def _centered(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = x.double().mean(0)
    return mean, x.double() - mean


class _Paired:
    """State shared by both reducers: a row count and float64 sums merged with `_combine`."""

    KEYS: tuple[str, ...] = ()
    OUTER = "c_ab"  # the co-moment the merge corrects with the means' outer product (or product)

    def __init__(self):
        self.count = 0
        self.s: dict[str, torch.Tensor] | None = None

    def merge(self, other: "_Paired") -> "_Paired":
        if type(other) is not type(self):
            raise ValueError(f"cannot merge {type(self).__name__} with {type(other).__name__}")
        out = type(self)()
        s = None if other.s is None else {k: v.to(self.s[k].device) if self.s else v for k, v in other.s.items()}
        out.count, out.s = _combine(self.count, self.s, other.count, s, outer=self.OUTER)
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {"count": torch.tensor(self.count, dtype=torch.int64)}
        if self.s is not None:
            out.update({k: v.cpu().contiguous() for k, v in self.s.items()})
        return out

    @classmethod
    def from_state_dict(cls, d: dict[str, torch.Tensor]):
        out = cls()
        out.count = int(d["count"])
        if "mean_a" in d:
            out.s = {k: d[k].clone() for k in cls.KEYS}
        return out


class PairMoments(_Paired):
    """count; mean_a, mean_b, m2_a, m2_b, c_ab, abs_diff (N,) float64."""

    KEYS = ("mean_a", "mean_b", "m2_a", "m2_b", "c_ab", "abs_diff")

    def update(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """a, b (M, N): the same tokens through model A and model B."""
        if a.shape != b.shape or a.ndim != 2:
            raise ValueError(f"expected a and b of the same shape (M, N), got {tuple(a.shape)} and {tuple(b.shape)}")
        if a.shape[0] == 0:
            return
        ma, da = _centered(a)
        mb, db = _centered(b)
        batch = {"mean_a": ma, "mean_b": mb, "m2_a": (da * da).sum(0), "m2_b": (db * db).sum(0),
                 "c_ab": (da * db).sum(0), "abs_diff": (b.double() - a.double()).abs().sum(0)}
        self.count, self.s = _combine(self.count, self.s, a.shape[0], batch)

    def finalize(self) -> dict[str, np.ndarray]:
        """corr (NaN where a side is constant), mean_abs_diff, mean_a, mean_b, std_a, std_b."""
        if self.s is None:
            return {k: np.zeros(0) for k in ("corr", "mean_abs_diff", "mean_a", "mean_b", "std_a", "std_b")}
        s = {k: v.cpu().numpy() for k, v in self.s.items()}
        n = self.count
        with np.errstate(divide="ignore", invalid="ignore"):
            corr = s["c_ab"] / np.sqrt(s["m2_a"] * s["m2_b"])
        corr = np.where((s["m2_a"] > 0) & (s["m2_b"] > 0), np.clip(corr, -1, 1), np.nan)
        return {"corr": corr, "mean_abs_diff": s["abs_diff"] / n, "mean_a": s["mean_a"], "mean_b": s["mean_b"],
                "std_a": np.sqrt(s["m2_a"] / n), "std_b": np.sqrt(s["m2_b"] / n)}


class CrossMoments(_Paired):
    """count; mean_a (Na,), mean_b (Nb,), m2_a, m2_b, and the co-moment matrix c (Na, Nb), float64."""

    KEYS = ("mean_a", "mean_b", "m2_a", "m2_b", "c")
    OUTER = "c"

    def update(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """a (M, Na), b (M, Nb). The batch co-moment is one float32 matmul of the centered batches."""
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0]:
            raise ValueError(f"expected a (M, Na) and b (M, Nb), got {tuple(a.shape)} and {tuple(b.shape)}")
        if a.shape[0] == 0:
            return
        ma, da = _centered(a)
        mb, db = _centered(b)
        batch = {"mean_a": ma, "mean_b": mb, "m2_a": (da * da).sum(0), "m2_b": (db * db).sum(0),
                 "c": (da.float().T @ db.float()).double()}
        self.count, self.s = _combine(self.count, self.s, a.shape[0], batch, outer="c")

    def correlation(self) -> np.ndarray:
        """(Na, Nb) Pearson correlations; NaN where either neuron is constant."""
        s = {k: v.cpu().numpy() for k, v in self.s.items()}
        scale = np.sqrt(np.outer(s["m2_a"], s["m2_b"]))
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(scale > 0, np.clip(s["c"] / scale, -1, 1), np.nan)

    def best_match(self) -> tuple[np.ndarray, np.ndarray]:
        """For each A neuron: the B neuron of highest correlation (lowest index on ties) and that correlation."""
        corr = self.correlation()
        filled = np.where(np.isnan(corr), -np.inf, corr)
        best = filled.argmax(1)
        return best, corr[np.arange(len(best)), best]


def _combine(n1: int, s1: dict | None, n2: int, s2: dict | None, outer: str = "c_ab") -> tuple[int, dict | None]:
    """Chan et al.: means and centered (co-)moments of the union of two disjoint samples."""
    if s2 is None or n2 == 0:
        return n1, s1
    if s1 is None or n1 == 0:
        return n2, {k: v.clone() for k, v in s2.items()}
    n = n1 + n2
    da, db = s2["mean_a"] - s1["mean_a"], s2["mean_b"] - s1["mean_b"]
    w = n1 * n2 / n
    out = {k: v + s2[k] for k, v in s1.items() if k not in ("mean_a", "mean_b")}
    out["mean_a"] = s1["mean_a"] + da * (n2 / n)
    out["mean_b"] = s1["mean_b"] + db * (n2 / n)
    out["m2_a"] += da * da * w
    out["m2_b"] += db * db * w
    out[outer] += (torch.outer(da, db) if outer == "c" else da * db) * w
    return n, out
