"""Where one layer's GPU mining time goes (run under ncu for per-kernel durations; see BENCHMARKS.md).

    ncu --clock-control none --section SpeedOfLight -k regex:"layer_kernel|hist_reduce|moments_combine|cand_count|cand_scan|cand_scatter|keys_insert" \
        --launch-skip 40 --launch-count 10 python3 scripts/gpu_profile.py

Steady state: the thresholds come from 16 batches of the bench's shape (64 x 512 x 1536 bfloat16), then a
fresh batch is mined; also prints the wall time of layer_pass with and without the host's share.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mining.reducers import ContextTopK, Histogram, HistogramBins, Moments, TopK, cuda_layer  # noqa: E402


def main() -> None:
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    B, T, N, k = (64, 512, 1536, 32) if dev.type == "cuda" else (4, 32, 40, 4)  # CPU: MINING_CUDA_EMULATE=1
    scale = torch.rand(N, device=dev)
    toks_np = np.arange(B * T).reshape(B, T).astype(np.int64)
    parts = TopK(k), TopK(k, largest=False), ContextTopK(k), Histogram(HistogramBins()), Moments()
    for i in range(17 if dev.type == "cuda" else 3):
        x = (torch.randn(B, T, N, device=dev) * scale).bfloat16()
        tok = torch.from_numpy(toks_np + i * B * T).to(dev)
        layout = cuda_layer.Layout.of_grid(toks_np, tok)
        cuda_layer.layer_pass(x.view(-1, N), layout, *parts)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    print("capacity", parts[0].sparse_capacity(B * T, N), "overflow", parts[0].overflowed(), flush=True)
    for label, args in (("full", parts), ("no ranking", (None, None, parts[2], parts[3], parts[4])),
                        ("moments only", (None, None, None, None, parts[4]))):
        sync()
        t0 = time.perf_counter()
        for _ in range(20 if dev.type == "cuda" else 1):
            cuda_layer.layer_pass(x.view(-1, N), layout, *args)
        host = (time.perf_counter() - t0) / (20 if dev.type == "cuda" else 1)
        sync()
        wall = (time.perf_counter() - t0) / (20 if dev.type == "cuda" else 1)
        print(f"{label}: {wall * 1e3:.3f} ms a layer (host returns after {host * 1e3:.3f} ms)", flush=True)


if __name__ == "__main__":
    main()
