"""One pass over a batch for a hook's standard reducers: top-k, bottom-k, top contexts, histogram, moments
(`update_hook`), or top-k, bottom-k and moments of flat values such as DLA (`update_ranked`).

Fed one by one, each reducer reads the (B, T, N) activations again (and `HookStats` first copies out
the mined rows); on a CPU those reads, not the arithmetic, are most of what mining costs. `update_hook`
hands the whole set to layer_kernel.layer_update, which reads the batch once. The states it
leaves are the ones the reducers' own updates would leave (tests/test_kernels.py checks this bit for
bit, moments to rounding); where it does not apply it returns False and the caller feeds each reducer.
"""

from __future__ import annotations

import numpy as np
import torch

from . import kernels
from .layer_kernel import Numerator, layer_update
from .histogram import Histogram
from .moments import Moments
from .topk import EMPTY, ContextTopK, TopK, encode

SEED_ROWS = 128
"""Rows of a batch whose k-th best value seeds an unsettled top-k's floor (seed_floor)."""


def _settled(t: TopK) -> bool:
    """The kernels insert into the keys in place: they must be settled (few candidates) and contiguous."""
    return t.settled() and t.keys.is_contiguous()


def seed_floor(t: TopK, x: torch.Tensor, tok: torch.Tensor) -> None:
    """Settle an empty top-k (the first batch of an actor's first shard) with a floor taken from x (m, N), a few of
    the batch's own rows as the kernel will read them, and tok (m,) their token indices. The k-th best of those rows
    is at most the k-th best of the shard, so the floor drops nothing the shard's top-k keeps, and the kernel takes
    the whole batch instead of the torch path ranking every value densely (3.2 s an actor on SmolLM2).
    The floor is never stored; a column whose rows hold fewer than k ranked values stays unsettled."""
    if t.keys is None or x.shape[0] < t.k or not t.keys.is_contiguous():
        return
    kth = torch.topk(encode(x.float(), tok.to(torch.int64)[:, None], t.largest), t.k, dim=0).values[-1]
    if t.floor is not None:
        kth = torch.maximum(kth, t.floor.to(kth.device))
    if bool((kth != EMPTY).all()):
        t.set_floor(kth, t.floor_rows)


def _seed_rows(x: torch.Tensor, tok: torch.Tensor, mined: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The first contexts' mined rows of x (B, T, N), at least SEED_ROWS of them where the batch has that many."""
    counts = mined.sum(1).cumsum(0)
    b = min(int(torch.searchsorted(counts, SEED_ROWS)) + 1, x.shape[0])
    keep = mined[:b].reshape(-1)
    return x[:b].reshape(-1, x.shape[2])[keep], tok[:b].reshape(-1)[keep]


def update_hook(top: TopK, bottom: TopK, contexts: ContextTopK, histogram: Histogram | None, moments: Moments | None,
                x: torch.Tensor, tok: torch.Tensor, mined: torch.Tensor, n_mined: int | None = None,
                product: Numerator | None = None) -> bool:
    """x (B, T, N); tok (B, T) global token index, rising along each context, -1 where not mined; mined = tok >= 0
    (n_mined: its count, if the caller has it). True if every given reducer took the batch; False if nothing
    was done. product: DLA's numerator to write on the way, where the kernel runs in one call (product.done)."""
    if x.ndim != 3 or not kernels.usable(x) or not top.largest or bottom.largest:
        return False
    N = x.shape[2]
    for t in (top, bottom, contexts.top):
        t._start(N, x.device)
    M = int(mined.sum()) if n_mined is None else n_mined
    if M and not (_settled(top) and _settled(bottom)):
        rows, toks = _seed_rows(x, tok, mined)
        for t in (top, bottom):
            if not _settled(t):
                seed_floor(t, rows, toks)
    if M == 0 or not (_settled(top) and _settled(bottom)) or not contexts.top.keys.is_contiguous():
        return False
    if histogram is not None and histogram.bins.n_bins > kernels.HIST_MAX_BINS:
        return False
    if histogram is not None and M > kernels.HIST_ROWS:  # its uint16 counts take that many rows a call: split
        per = mined.sum(1)
        if int(per.max()) > kernels.HIST_ROWS:
            return False
        cut, lo, rows = [], 0, 0
        for b, m in enumerate(per.tolist()):
            if rows + m > kernels.HIST_ROWS:
                cut.append((lo, b, rows))
                lo, rows = b, 0
            rows += m
        cut.append((lo, len(per), rows))
        for lo, hi, m in cut:
            if m:
                update_hook(top, bottom, contexts, histogram, moments, x[lo:hi], tok[lo:hi], mined[lo:hi], m)
        return True
    hist = None
    if histogram is not None:
        hist = (*histogram.bins.kernel_params(), histogram.pending(N, M))
    batch, bad = layer_update(x, mined, tok.to(torch.int64), (top.keys, top.floor), (bottom.keys, bottom.floor),
                              (contexts.top.keys, contexts.top.floor), hist, M, product=product)
    if len(bad):  # columns with a NaN or infinity: ContextTopK's exact path, on just those columns
        cols = torch.from_numpy(bad)
        sub = ContextTopK(contexts.k)
        sub.top.keys = contexts.top.keys[:, cols].contiguous()
        sub.top.floor = None if contexts.top.floor is None else contexts.top.floor[cols]
        sub.update(x[:, :, cols].contiguous(), tok, check=False, rising=True)
        contexts.top.keys[:, cols] = sub.top.keys
    if moments is not None:
        moments.add_batch({"count": M, **batch})
    return True


def update_ranked(top: TopK, bottom: TopK, moments: Moments, x: torch.Tensor, tok: torch.Tensor,
                  scale: np.ndarray | None = None) -> bool:
    """x (M, N) values (e.g. direct logit attribution), tok (M,) their token indices. scale: None, or (M,) float32
    to take x[i] / scale[i] as the values, divided a chunk at a time, never stored whole (DLA's division by the
    final norm's scale, see dla.GainProduct). True if all three took the batch; False if nothing was done."""
    if x.ndim != 2 or x.shape[0] == 0 or not kernels.usable(x) or not top.largest or bottom.largest:
        return False
    for t in (top, bottom):
        t._start(x.shape[1], x.device)
        if not _settled(t):  # the values as the kernel reads them: divided by their row's scale
            m = min(SEED_ROWS, x.shape[0])
            seed_floor(t, x[:m] if scale is None else torch.div(x[:m], torch.from_numpy(scale[:m])[:, None]), tok[:m])
    if not (_settled(top) and _settled(bottom)):
        return False
    M = x.shape[0]
    batch, _ = layer_update(x.view(1, M, -1), torch.ones(1, M, dtype=torch.bool), tok.to(torch.int64).view(1, M),
                            (top.keys, top.floor), (bottom.keys, bottom.floor), None, None, M, scale)
    moments.add_batch({"count": M, **batch})
    return True

