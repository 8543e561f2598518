"""`compute.batch_size: auto`: the batch that fills the device, chosen once per job.

The batch size changes the last bits of the moments (the order of the float sums), so it must not
depend on which actor or GPU mined a shard. One actor finds it on the job's first shard before any
shard is mined; the driver writes it into job.yaml, every actor uses it, and `--resume` takes the
recorded number instead of measuring again.

- On a GPU: mine two small probe batches of the shard's longest contexts, measure each one's peak
  device memory, and extrapolate the linear fit to `GPU_MEMORY_FRACTION` of the smallest free memory
  of the job's GPUs. Then confirm the chosen batch with one real batch, and halve it while that runs
  out of memory.
- On CPUs: `CPU_BATCH_TOKENS` tokens a batch. On 2 cores the forward's speed did not change with the
  batch beyond the noise, from 2 to 64 contexts of 128 (BENCHMARKS.md), and larger batches cost memory.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .shards import Shard

CPU_BATCH_TOKENS = 2048
"""16 contexts of 128 tokens: compute.batch_size's old default."""
GPU_MEMORY_FRACTION = 0.85
"""Of the free device memory: the rest absorbs fragmentation and the next shard's copies."""
MAX_BATCH_TOKENS = 1 << 20
"""No batch beyond this many tokens: throughput has long stopped growing there."""


def free_device_memory(device: torch.device) -> int | None:
    """Free bytes on a GPU, counting what torch holds cached as free (the mining reuses it); None on CPUs."""
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    return int(torch.cuda.mem_get_info(device)[0])


def fit_batch_size(miner: Any, shard: Shard, free_bytes: int | None = None) -> tuple[int, dict[str, Any]]:
    """(contexts per batch, how it was chosen) for `miner` (a ShardMiner or DiffMiner) on `shard`; on a GPU,
    within `free_bytes` (the job's smallest free device memory) if given, else this device's free memory.

    The probes are the shard's longest contexts: a batch is cut to its longest context, and attention's
    memory grows with the square of that length."""
    device = miner.loaded.device
    contexts, T = shard.ids.shape
    limit = max(1, min(contexts, MAX_BATCH_TOKENS // T))
    if device.type != "cuda":
        b = max(1, min(limit, CPU_BATCH_TOKENS // T))
        return b, {"device": "cpu", "rule": f"{CPU_BATCH_TOKENS} tokens a batch", "shard_contexts": contexts}
    free = min(free_device_memory(device), free_bytes or 1 << 62)
    budget = int(free * GPU_MEMORY_FRACTION)
    b, info = fit_to_memory(lambda n: cuda_peak_bytes(miner, shard.longest(n)), budget, limit)
    info.update(device=torch.cuda.get_device_name(device), free_bytes=free, shard_contexts=contexts)
    return b, info


def fit_to_memory(peak: Callable[[int], int], budget: int, limit: int, probe: int = 2) -> tuple[int, dict[str, Any]]:
    """The largest batch in [1, limit] whose `peak(batch)` (bytes, or MemoryError) fits `budget`.

    Measures `peak` at `probe` and 2 * `probe` contexts and extrapolates linearly (attention's memory is
    quadratic in the context length, but linear in the batch), then runs the extrapolated batch for
    real and halves it until it runs within the budget, or at least runs at one context."""
    if limit <= 2 * probe:
        b = limit
        info: dict[str, Any] = {"rule": "the whole shard in one batch"}
    else:
        info = {"rule": f"{GPU_MEMORY_FRACTION:.0%} of free memory", "budget_bytes": int(budget)}
        try:
            small, large = peak(probe), peak(2 * probe)
        except MemoryError:  # not even the probes fit: halve from the smaller one
            b = probe
        else:
            per_context = max(1, (large - small) // probe)
            fixed = small - probe * per_context
            b = max(1, min(limit, _round_down((budget - fixed) // per_context)))  # a whole shard is not rounded
            info.update(bytes_per_context=int(per_context), fixed_bytes=int(fixed))
    tried = []
    while True:
        try:
            used = peak(b)
        except MemoryError:
            used = None
        tried.append([b, used])
        if used is not None and (used <= budget or b == 1):
            break
        if b == 1:
            raise MemoryError("compute.batch_size auto: even one context does not fit the device")
        b = max(1, b // 2)
    info.update(tried=tried, peak_bytes=used)
    return b, info


def _round_down(b: int) -> int:
    """Multiples of 8 from 16 up (tensor-core friendly shapes)."""
    return b - b % 8 if b >= 16 else b


def cuda_peak_bytes(miner: Any, shard: Shard) -> int:
    """Peak device memory above the resident model while `miner` mines `shard` in one batch."""
    device = miner.loaded.device
    old = miner.batch_size
    miner.batch_size = len(shard.ids)
    try:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        miner.mine(shard)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    except torch.cuda.OutOfMemoryError:
        raise MemoryError from None
    finally:
        miner.batch_size = old
        torch.cuda.empty_cache()
