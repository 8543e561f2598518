"""Sign cases of a gated (SwiGLU / GeGLU) neuron: activation = act(gate) · up, so its value comes
about four ways — (gate > 0, up > 0) and (gate ≤ 0, up ≤ 0) give positive values, the mixed cases
negative ones (act(g) < 0 for g < 0 with SiLU/GELU). Per neuron and case: count, sum (for the
mean) and the top examples by magnitude — the most positive for the positive cases, the most
negative for the negative ones. Mergeable exactly like TopK and counts; sums in float64.
"""

from __future__ import annotations

import torch

from .topk import TopK

# case index = 2 * (gate > 0) + (up > 0); the sign a product of that case has
CASES = ((0, "-", "-"), (1, "-", "+"), (2, "+", "-"), (3, "+", "+"))
POSITIVE_CASE = {0: True, 1: False, 2: False, 3: True}


class GateCases:
    def __init__(self, k: int):
        self.k = k
        self.count: torch.Tensor | None = None  # (4, N) int64
        self.sum: torch.Tensor | None = None  # (4, N) float64
        self.top = [TopK(k, largest=POSITIVE_CASE[c]) for c, _, _ in CASES]
        for t in self.top:  # a rare case leaves columns unfilled for long: every value would be a candidate
            t.sparse = False

    def update(self, x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, tok: torch.Tensor) -> None:
        """x (M, N) activations, gate/up (M, N) pre-activations (only their signs matter), tok (M,)."""
        case = (gate > 0).to(torch.int8) * 2 + (up > 0).to(torch.int8)
        if self.count is None:
            n = x.shape[1]
            self.count = torch.zeros(4, n, dtype=torch.int64, device=x.device)
            self.sum = torch.zeros(4, n, dtype=torch.float64, device=x.device)
        nan = torch.tensor(float("nan"), device=x.device, dtype=x.dtype)
        for c, _, _ in CASES:
            hit = case == c
            self.count[c] += hit.sum(0)
            self.sum[c] += torch.where(hit, x, 0).double().sum(0)
            self.top[c].update(torch.where(hit, x, nan), tok, check=False)  # NaN rows never enter a TopK

    def merge(self, other: "GateCases") -> "GateCases":
        if other.k != self.k:
            raise ValueError(f"cannot merge GateCases with k={self.k} and k={other.k}")
        out = GateCases(self.k)
        if self.count is None or other.count is None:
            src = self if other.count is None else other
            out.count = None if src.count is None else src.count.clone()
            out.sum = None if src.sum is None else src.sum.clone()
        else:
            out.count = self.count + other.count.to(self.count.device)
            out.sum = self.sum + other.sum.to(self.sum.device)
        out.top = [a.merge(b) for a, b in zip(self.top, other.top)]
        return out

    def finalize(self) -> dict:
        """count, mean (4, N) and per case the (values, toks) of its top examples (K, N)."""
        count = self.count.cpu().numpy() if self.count is not None else None
        mean = (self.sum / self.count.clamp(min=1)).cpu().numpy() if self.count is not None else None
        return {"count": count, "mean": mean, "top": [t.finalize() for t in self.top]}

    def state_dict(self) -> dict[str, torch.Tensor]:
        d = {"k": torch.tensor(self.k)}
        if self.count is not None:
            d["count"], d["sum"] = self.count.cpu(), self.sum.cpu()
        for c, t in enumerate(self.top):
            d.update({f"top{c}.{key}": v for key, v in t.state_dict().items()})
        return d

    @classmethod
    def from_state_dict(cls, d: dict[str, torch.Tensor]) -> "GateCases":
        out = cls(int(d["k"]))
        out.count, out.sum = d.get("count"), d.get("sum")
        for c in range(4):
            part = {key.split(".", 1)[1]: v for key, v in d.items() if key.startswith(f"top{c}.")}
            out.top[c] = TopK.from_state_dict(part)
        return out
