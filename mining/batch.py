"""One forward pass's batch: built on the host, copied to the device, and what comes back from it.

The host knows which positions of a shard are mined, so it builds every index the reducers need (mined
rows, context layout, next-token targets) from its own arrays: nothing on the device is read back to find
them, which on a GPU would stall the queue once per read. Inputs go over from pinned memory
asynchronously; per-token scores come back the same way and are read once the shard is done.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .reducers import cuda_layer
from .reducers.device import applies as device_path, download, upload
from .reducers.topk import check_toks
from .shards import Shard


@dataclass
class Batch:
    """One forward pass's inputs, built on the host (the host knows which positions are mined, so no
    device value is ever read back to find them) and copied to the device asynchronously."""

    sl: slice
    T: int
    ids: torch.Tensor  # (B, T)
    attention: torch.Tensor | None  # (B, T); None where no context is padded (see model_mask)
    toks_np: np.ndarray  # (B, T) global token index, -1 where not mined
    toks: torch.Tensor
    mask: torch.Tensor  # toks >= 0
    rows: torch.Tensor  # (M,) flat index into B*T of the mined positions
    flat_toks: torch.Tensor  # (M,) their toks
    targets_np: np.ndarray  # (B, T) next token id, -1 where none
    layout: cuda_layer.Layout | None = None  # the contexts, for the GPU kernel


def make_batch(shard: Shard, sl: slice, tok_grid: np.ndarray, dev: torch.device) -> Batch:
    T = int(shard.length[sl].max())
    toks_np = tok_grid[sl, :T]
    mined = toks_np >= 0
    check_toks(torch.from_numpy(toks_np[mined]))  # on the host copy: no device sync
    rows_np = np.flatnonzero(mined)
    attention = model_mask(shard.length[sl], T)
    toks, rows = upload(toks_np, dev), upload(rows_np, dev)
    layout = cuda_layer.Layout.of_grid(toks_np, toks, rows) if device_path(toks) else None
    return Batch(sl=sl, T=T, ids=upload(shard.ids[sl, :T], dev), toks_np=toks_np,
                 attention=None if attention is None else upload(attention, dev),
                 toks=toks, mask=toks >= 0, rows=rows, flat_toks=upload(toks_np.reshape(-1)[rows_np], dev),
                 targets_np=next_token_targets(shard, sl, T, toks_np), layout=layout)


def model_mask(lengths: np.ndarray, T: int) -> np.ndarray | None:
    """The attention mask (B, T) int64 for contexts of these lengths, or None where none is padded. A mask of all
    ones means the same to the model, but transformers then checks that it is all ones (`masking_utils`' fast_all),
    which on a GPU reads a device value back: a host sync every forward pass. Without a mask it goes straight to
    SDPA's causal path, as it would after the check."""
    if (lengths >= T).all():
        return None
    return (np.arange(T)[None, :] < lengths[:, None]).astype(np.int64)


def mined_rows(x: torch.Tensor, rows: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """x (B, T, N) -> (M, N) at the flat positions `rows`. float32 on the CPU (its kernels and torch code
    take float32); the hook's own dtype on an accelerator, where the reducers read bfloat16 directly."""
    flat = x.reshape(-1, x.shape[-1]).index_select(0, rows)
    if dtype is not None:
        return flat.to(dtype)
    return flat.float() if not device_path(x) else flat


@dataclass
class OnHost:
    """A (C, T) tensor of per-position scores on its way to the host; `array()` keeps the valid positions."""

    values: torch.Tensor
    valid: np.ndarray

    def array(self) -> np.ndarray:
        return self.values.numpy()[self.valid]


def token_scores(logits: torch.Tensor, target: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, T) float32 log-prob of each target (NaN where none) and entropy of the next-token distribution,
    as host tensors (pinned, filled asynchronously on a GPU). A GPU takes a few contexts at a time, so the
    float32 log-softmax stays near 1 GiB; a CPU a few rows, so that each pass's temporaries stay in its
    caches (2.6x faster on SmolLM2 than a context at a time). Rows are independent: the same bits either way."""
    C, T = target.shape
    V = logits.shape[-1]
    tgt_all = upload(target, logits.device)
    if logits.is_cuda:
        per = max(1, 2**28 // max(1, T * V))
        chunks = [(slice(lo, lo + per), slice(0, T)) for lo in range(0, C, per)]
    else:
        rows = max(1, 2**20 // V)
        chunks = [(slice(c, c + 1), slice(t, min(t + rows, T))) for c in range(C) for t in range(0, T, rows)]
    logprob = torch.empty(C, T, dtype=torch.float32, device=logits.device)
    entropy = torch.empty_like(logprob)
    for cs, ts in chunks:
        lsm = torch.log_softmax(logits[cs, ts].float(), dim=-1)  # (c, t, V)
        entropy[cs, ts] = -(lsm.exp() * lsm).sum(-1)
        tgt = tgt_all[cs, ts]
        lp = lsm.gather(-1, tgt.clamp(min=0)[..., None])[..., 0]
        logprob[cs, ts] = torch.where(tgt >= 0, lp, torch.nan)
        del lsm
    return download(logprob), download(entropy)


def next_token_targets(shard: Shard, sl: slice, T: int, toks_np: np.ndarray) -> np.ndarray:
    """(C, T) id of the document's next token at every mined position, -1 where there is none.

    The target of position p is the context's own next position or, at the last mined position,
    the token the next context of the document starts with (so no token goes unscored)."""
    ids = shard.ids[sl, :T]
    C = len(ids)
    valid = toks_np >= 0
    target = np.full((C, T), -1, dtype=np.int64)
    target[:, :-1] = np.where(valid[:, 1:], ids[:, 1:], -1)
    last = shard.first[sl] + shard.mined[sl] - 1
    target[np.arange(C), last] = shard.next_id[sl]
    return np.where(valid, target, -1)
