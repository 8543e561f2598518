"""Encode and decode of a store's reducer states (mining/store.py: byte shuffle + zstd), numcodecs' C
shuffle (the code in use) next to the strided torch copy it replaced (session 12), interleaved, best of
`--repeats`, in one process, on a real store's merged states.

    python3 scripts/bench_states.py runs/demo      # after `mine demo`

The old codec here is also the reference of tests/test_states_format.py (same bytes, both ways).
"""

from __future__ import annotations

import argparse
import json
import time

import safetensors.torch
import torch

from mining.store import LAYOUT, MERGED_STATES, Store, _compress, _decompress, decode_states, encode_states


def torch_encode(tensors: dict[str, torch.Tensor]) -> bytes:
    planes, layout = {}, {}
    for name, t in tensors.items():
        t = t.contiguous()
        planes[name] = t.view(torch.uint8).reshape(-1, t.element_size()).T.contiguous() if t.dim() else t
        layout[name] = [str(t.dtype).removeprefix("torch."), list(t.shape)]
    planes[LAYOUT] = torch.frombuffer(bytearray(json.dumps(layout, sort_keys=True).encode()), dtype=torch.uint8)
    return _compress(safetensors.torch.save(planes))


def torch_decode(blob: bytes) -> dict[str, torch.Tensor]:
    tensors = safetensors.torch.load(_decompress(blob))
    layout = json.loads(bytes(tensors.pop(LAYOUT).tolist()))
    return {name: t if t.dim() == 0 else
            t.T.reshape(-1).contiguous().view(getattr(torch, layout[name][0])).reshape(layout[name][1])
            for name, t in tensors.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store", help="a complete store (its _shards/merged.states.zst)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    blob = Store(args.store).files.read_bytes(MERGED_STATES)
    tensors = decode_states(blob)
    runs = {"encode torch": lambda: torch_encode(tensors), "encode numcodecs": lambda: encode_states(tensors),
            "decode torch": lambda: torch_decode(blob), "decode numcodecs": lambda: decode_states(blob)}
    best: dict[str, float] = {}
    for _ in range(args.repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
    raw = sum(t.numel() * t.element_size() for t in tensors.values())
    print(f"{raw / 1e6:,.0f} MB of states ({len(blob) / 1e6:,.1f} MB stored), torch {torch.get_num_threads()} "
          f"threads, best of {args.repeats}:")
    for op in ("encode", "decode"):
        slow, fast = best[f"{op} torch"], best[f"{op} numcodecs"]
        print(f"  {op}: torch copy {slow:.3f} s, numcodecs {fast:.3f} s: {slow / fast:.2f}x")
    print("same bytes as stored:", encode_states(tensors) == torch_encode(tensors) == blob)


if __name__ == "__main__":
    main()
