"""The GPU path's host work per batch, measured on the CPU: what the device would wait for if the host fell behind.

    python3 scripts/host_overhead.py [--layers 30] [--width 1536] [--tokens 8] [--repeats 3]

A random Llama with SmolLM2-135M's layer count, MLP width (the mined neurons), heads and vocabulary but a
64-wide residual stream, so that its arithmetic is negligible and what is left is the host's share: Python,
dispatch, allocation. The miner runs its device path (MINING_DEVICE_PATH=1) with the CUDA library replaced
by a no-op, one tiny batch at a time, through `mine bench`'s own variants, interleaved. The figures are
per batch (they do not depend on the batch's size on a GPU, where the host only queues work). Compare
them with the device's time per batch: on the H200 in session 6, 72 ms bare, 123 ms mining, 193 ms with DLA
for 32,768-token batches. Also prints the host's fixed work per shard, outside the forward passes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ["MINING_DEVICE_PATH"] = "1"
os.environ["MINING_CUDA_EMULATE"] = "1"

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mining.reducers import cuda_layer  # noqa: E402


class NoKernel:
    """cuda_layer's library, minus the work: layer_pass builds its arguments and returns at once."""

    def layer_update(self, params, dtype, stream) -> int:
        return 0

    def layer_row_blocks(self, n_ctx: int, per_block: int) -> int:
        return (n_ctx + per_block - 1) // per_block

    def layer_smem_bytes(self, n_bins: int) -> int:
        return 0

    def layer_smem_limit(self, device: int) -> int:
        return 1

    def layer_fp64_ratio(self, device: int) -> int:
        return 2


def as_gpu_batches(rows: int) -> None:
    """Candidate lists sized as for GPU batches of `rows` rows each (the rows seen and the floors' rows scaled
    alike): the sparse path a GPU's steady state takes. Tiny batches alone would rank densely, with torch ops a
    GPU batch does not run."""
    from mining.reducers.topk import TopK

    sized = TopK.sparse_capacity

    def capacity(self, M: int, N: int, margin: int = 4):
        scale = max(1, rows // max(M, 1))
        seen, floor_rows = self.seen, self.floor_rows
        self.seen, self.floor_rows = seen * scale, floor_rows * scale
        try:
            return sized(self, M * scale, N, margin)
        finally:
            self.seen, self.floor_rows = seen, floor_rows

    TopK.sparse_capacity = capacity


def tiny_smollm2(folder: Path, layers: int, width: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from mining.models import load_tokenizer
    from mining.spec import ModelSpec

    config = LlamaConfig(hidden_size=64, intermediate_size=width, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=49152, max_position_embeddings=2048,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    load_tokenizer(ModelSpec(id="smollm2-135m")).save_pretrained(folder)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--width", type=int, default=1536)
    ap.add_argument("--tokens", type=int, default=8, help="context length of the one-context batches")
    ap.add_argument("--batches", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gpu-rows", type=int, default=32768, help="the GPU batch the candidate lists are sized for")
    a = ap.parse_args()
    cuda_layer._lib["emulate"] = NoKernel()
    as_gpu_batches(a.gpu_rows)
    torch.set_num_threads(1)
    from mining.bench import BenchConfig, Workload, measure, runners

    with tempfile.TemporaryDirectory() as tmp:
        tiny_smollm2(Path(tmp), a.layers, a.width)
        cfg = BenchConfig(model=tmp, tokens=a.tokens * a.batches, batch_size=1, context_length=a.tokens, device="cpu",
                          dtype="float32", parts=("forward", "mining", "dla"), repeats=a.repeats)
        work = Workload(cfg)
        runs = runners(work, cfg.parts, tmp)
        rates, _ = measure(work, runs, a.repeats)
        batches = sum(-(-len(s.ids) // cfg.batch_size) for s in work.shards)
        per_batch = {name: work.n_tokens / max(r) / batches * 1e3 for name, r in rates.items()}
        print(f"host ms a batch ({a.layers} layers, {a.width} neurons each, best of {a.repeats}): "
              + ", ".join(f"{name} {ms:.2f}" for name, ms in per_batch.items()))
        print("  over the bare forward: " + ", ".join(f"{name} +{ms - per_batch['forward']:.2f}"
                                                       for name, ms in per_batch.items() if name != "forward"))
        miner = work.miners["mining"]
        shard = work.shards[0]
        model = work.loaded.model
        forward = model.forward
        inside = [0.0]

        def timed_forward(*args, **kwargs):
            t = time.perf_counter()
            out = forward(*args, **kwargs)
            inside[0] += time.perf_counter() - t
            return out

        model.forward = timed_forward
        outside = {}
        for n in (2, a.batches, 2, a.batches, 2, a.batches):
            inside[0] = 0.0
            t = time.perf_counter()
            miner.mine(shard.head(n))
            outside[n] = min(outside.get(n, 1e9), time.perf_counter() - t - inside[0])
        model.forward = forward
        per = (outside[a.batches] - outside[2]) / (a.batches - 2)
        fixed = outside[2] - 2 * per
        print(f"  mining, outside the forward passes: {per * 1e3:.2f} ms a batch, {fixed * 1e3:.2f} ms a shard")


if __name__ == "__main__":
    main()
