"""Reducer updates for accelerators (CUDA) that never read a device value on the host, as torch ops.

On a GPU with nvcc, cuda_layer.py does a hook's standard set (and DLA's) in one kernel instead; these
ops remain for everything else: other dtypes (fp16), no nvcc, MINING_CUDA_LAYER=0, young thresholds
(the dense first batches), gate cases, and as the reference the kernel is tested against.

On a GPU every host read of a device value (`int(t.sum())`, boolean indexing, `.nonzero()`,
`.tolist()`) waits for all queued work, so the CPU stops queueing the next layers and the GPU idles.
The CPU paths (kernels.py, and the torch code of each reducer) count candidates and branch; here
every step is a fixed-shape kernel, and the only decisions are made on host-side counts:

- top/bottom-k of tokens: while the thresholds are young the batch is ranked densely (one topk over
  its int64 keys); once few values can enter (estimated on the host from rows seen and the floor's
  rows), the values whose keys beat their column's k-th key are compacted by `nonzero_static` into a
  fixed capacity and merged by two sorts. If a batch ever has more candidates than the capacity, a device
  flag is raised and the miner mines the shard again with the dense path (`TopK.overflowed`), so results
  stay exact.
- top contexts: each context's peak from a max over an integer image of the values (first of equal
  peaks = lowest tok, as toks rise along a context), then one dense merge of the (B, N) peak keys.
- histogram: bin index and one atomic index_add into the counts.
- moments: the same two-pass float64 sums as moments.py, over the whole batch at once.

The states are the reducers' own, bit for bit (tests/test_device.py runs these paths on the CPU with
MINING_DEVICE_PATH=1 against brute force and the CPU paths).
"""

from __future__ import annotations

import os

import numpy as np
import torch

INT16_MIN = -(2**15)
INT32_MIN = -(2**31)


def forced() -> bool:
    """MINING_DEVICE_PATH=1 runs these paths on CPU tensors too (tests, and a CPU reference for GPU runs)."""
    return os.environ.get("MINING_DEVICE_PATH") == "1"


def applies(x: torch.Tensor) -> bool:
    return x.device.type != "cpu" or forced()


def upload(a: np.ndarray, dev: torch.device) -> torch.Tensor:
    """A host array on the device; to a GPU from pinned memory, asynchronously."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    if dev.type == "cuda":
        return t.pin_memory().to(dev, non_blocking=True)
    return t.to(dev)


def download(t: torch.Tensor) -> torch.Tensor:
    """A device tensor copied to pinned host memory asynchronously: read it after a synchronize."""
    if t.device.type != "cuda":
        return t
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return out.copy_(t, non_blocking=True)


def ordered(x: torch.Tensor, invalid: torch.Tensor | None = None) -> torch.Tensor:
    """A monotone integer image of x's values (-0.0 == +0.0); NaN and `invalid` map to the type's minimum,
    below -inf's image. bfloat16 keeps a 16-bit image (`widen` turns it into the float32 one)."""
    if x.dtype == torch.bfloat16:
        b, bits, abs_mask, inf_bits, low = x.view(torch.int16), 15, 0x7FFF, 0x7F80, INT16_MIN
    else:
        b, bits, abs_mask, inf_bits, low = x.float().view(torch.int32), 31, 0x7FFFFFFF, 0x7F800000, INT32_MIN
    sign = b >> bits  # 0 or -1
    a = b & abs_mask
    o = (a ^ sign) - sign  # sign-magnitude -> two's complement
    o = o.masked_fill(a > inf_bits, low)
    return o if invalid is None else o.masked_fill(invalid, low)


def widen(o: torch.Tensor) -> torch.Tensor:
    """int64 float32 image of `ordered`'s output; the minimum (nothing there) becomes INT32_MIN."""
    if o.dtype == torch.int16:  # bfloat16 is float32's top half: the image scales by 2**16
        return torch.where(o == INT16_MIN, INT32_MIN, o.long() * 65536)
    return o.long()


def topk_update(t, x: torch.Tensor, tok: torch.Tensor) -> None:
    """t: TopK; x (M, N) any float dtype; tok (M,) int64 global token index, on x's device."""
    from .topk import EMPTY, MAX_TOK, _add_batch, decode, encode

    M, N = x.shape
    t._start(N, x.device)
    if M == 0:
        return
    cap = t.sparse_capacity(M, N)
    if cap is None:  # young thresholds: many candidates, rank the batch densely
        keys = encode(x.float(), tok[:, None], t.largest)
        t.keys = _add_batch(t.keys, t._floored(keys, None), t.k)
    else:
        thr = t.threshold()
        kth, kth_tok = decode(thr, t.largest)
        kth_tok = kth_tok.masked_fill_(thr == EMPTY, MAX_TOK + 1)  # a free slot takes any value, -inf too
        # strictly better keys only (an equal value needs a lower tok), or a dead column's ties would all
        # be candidates in every batch; NaN is never one
        beats = (x > kth) if t.largest else (x < kth)
        cand = beats.logical_or_((x == kth).logical_and_(tok[:, None] < kth_tok))
        idx = torch.nonzero_static(cand, size=cap, fill_value=-1)  # (cap, 2): row-major, padded with -1
        t.flag_overflow(idx[-1, 0] >= 0)  # the capacity filled up: some candidates may be missing
        rows, cols = idx[:, 0], idx[:, 1]
        pad = rows < 0
        r, c = rows.clamp(min=0), cols.clamp(min=0)
        keys = encode(x[r, c].float(), tok[r], t.largest).masked_fill_(pad, EMPTY)
        t.keys = merge_sparse(t.keys, t._floored(keys, c), cols.masked_fill(pad, N), t.k)
    t.seen += M


def merge_sparse(state: torch.Tensor, keys: torch.Tensor, cols: torch.Tensor, k: int) -> torch.Tensor:
    """state (k, N) keys best first; keys (C,) of columns cols (C,), col N = padding. The best k of
    each column's state and new keys, with no host sync: the new keys are ranked within their column by
    two sorts and scattered into a (k, N) buffer merged by one topk."""
    from .topk import EMPTY, _best

    N = state.shape[1]
    order = torch.argsort(keys, descending=True)
    order = order[torch.argsort(cols[order], stable=True)]  # by column, best first within
    keys, cols = keys[order], cols[order]
    rank = torch.arange(len(cols), device=cols.device) - torch.searchsorted(cols, cols)
    buf = torch.full((k + 1, N + 1), EMPTY, dtype=torch.int64, device=state.device)
    buf[rank.clamp(max=k), cols] = keys  # rank >= k and padding land in the spare row / column
    return _best(state, buf[:k, :N], k)


def context_update(ctx, x: torch.Tensor, tok: torch.Tensor, mined: torch.Tensor) -> None:
    """ctx: ContextTopK; x (B, T, N); tok (B, T) global index rising along each context, -1 = not mined."""
    from .topk import EMPTY, MAX_TOK, _add_batch

    B, T, N = x.shape
    t = ctx.top
    t._start(N, x.device)
    if B == 0:
        return
    # the peak's image and first position (torch.max returns the first of equal values: the lowest tok);
    # NaN and unmined positions are below -inf, so an all -inf context still peaks at its first mined tok
    peak, where = ordered(x, ~mined[..., None]).max(dim=1)  # (B, N)
    peak = widen(peak)
    keys = (peak * 2**31 + (MAX_TOK - tok.gather(1, where))).masked_fill_(peak == INT32_MIN, EMPTY)
    t.keys = _add_batch(t.keys, t._floored(keys, None), t.k)


def histogram_add(counts: torch.Tensor, x: torch.Tensor, bins) -> None:
    """counts (N, n_bins) int64 += the bins of x (M, N), by one atomic index_add."""
    M, N = x.shape
    nb = bins.n_bins
    idx = bins.index32(x).long()
    idx += torch.arange(N, device=x.device, dtype=torch.int64) * nb
    counts.view(-1).index_add_(0, idx.view(-1), torch.ones((), dtype=counts.dtype, device=x.device).expand(M * N))
