"""The driver's per-shard cost of a store's reducer states (mining/store.py: byte shuffle + zstd), old
against new, interleaved, best of `--repeats`, in one process, on a real store's merged states:

  * encode and decode: numcodecs' C shuffle next to the strided torch copy it replaced (session 12);
  * encode: each tensor shuffled into its place in one buffer laid out as safetensors does (in use, session
    14) next to shuffled planes given to safetensors' `save`, which copies them twice (sessions 12-13);
  * decode: planes unshuffled straight out of the decompressed buffer (in use, session 14) next to
    safetensors' loader, which copies the buffer and every tensor first (sessions 12-13);
  * encode and decode in one buffer: numcodecs' shuffle, one tensor at a time (sessions 14-25), next to
    mining/byteshuffle.py's loops, the large tensors on torch's thread count (in use, session 26);
  * the driver's fold of a store's shards (merge.merge_shards: read, checksum, decode, restore the reducers,
    merge), as sessions 12-13 did it (safetensors' loader, histogram counts widened to int64, a new merged
    state a shard), as sessions 14-25 did (the checksum, then the in-buffer decode with numcodecs' shuffle,
    int32 counts added in place by `HookStats.merge_`) and as now (the checksum beside the decode), on a
    store of `--shards` copies of the states (checked for the same bits); and the actor's write of one
    (Store.write_shard), sessions 14-25 and now.

    python3 scripts/bench_states.py runs/demo      # after `mine demo`

The old codec here is also the reference of tests/test_states_format.py (same bytes, both ways).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import numpy as np
import safetensors.torch
import torch
from numcodecs import Shuffle

from mining.engine import HookStats
from mining.merge import merge_shards
from mining import byteshuffle
from mining.store import LAYOUT, MERGED_STATES, Store, _by_hook, _compress, _decompress, decode_states, encode_states


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


def loader_encode(tensors: dict[str, torch.Tensor]) -> bytes:
    """encode_states of sessions 12-13: numcodecs' shuffle into planes, then safetensors' `save`."""
    planes, layout = {}, {}
    for name, t in tensors.items():
        t = t.contiguous()
        size, raw = t.element_size(), t.reshape(-1).view(torch.uint8)
        if t.dim() == 0:
            planes[name] = t
        elif raw.numel() == 0 or size == 1:
            planes[name] = raw.reshape(-1, size).T.contiguous()
        else:
            planes[name] = torch.from_numpy(np.asarray(Shuffle(size).encode(raw.numpy()), np.uint8)).reshape(size, -1)
        layout[name] = [str(t.dtype).removeprefix("torch."), list(t.shape)]
    planes[LAYOUT] = torch.frombuffer(bytearray(json.dumps(layout, sort_keys=True).encode()), dtype=torch.uint8)
    return _compress(safetensors.torch.save(planes))


def loader_decode(blob: bytes) -> dict[str, torch.Tensor]:
    """decode_states of sessions 12-13: safetensors' loader, then numcodecs' unshuffle."""
    tensors = safetensors.torch.load(_decompress(blob))
    layout = json.loads(bytes(tensors.pop(LAYOUT).tolist()))
    out = {}
    for name, t in tensors.items():
        dtype, shape = layout[name]
        flat = t if t.dim() == 0 else numcodecs_unshuffle(t.numpy().reshape(-1), t.shape[0])
        out[name] = flat if t.dim() == 0 else flat.view(getattr(torch, dtype)).reshape(shape)
    return out


def numcodecs_unshuffle(planes: np.ndarray, size: int) -> torch.Tensor:
    if planes.size == 0 or size == 1:
        return torch.from_numpy(planes.reshape(size, -1).T.copy()).reshape(-1)
    return torch.from_numpy(np.asarray(Shuffle(size).decode(planes), np.uint8))


@contextmanager
def numcodecs_shuffle() -> Iterator[None]:
    """The store's codec as in sessions 14-25: numcodecs' byte shuffle (byteshuffle's fallback, one tensor at a time:
    it holds the GIL) instead of byteshuffle's loops on threads."""
    loops = byteshuffle._LOOPS
    byteshuffle._LOOPS = {}
    try:
        yield
    finally:
        byteshuffle._LOOPS = loops


def with_numcodecs(run: Callable[[], Any]) -> Callable[[], Any]:
    def wrapped() -> Any:
        with numcodecs_shuffle():
            return run()
    return wrapped


def fold_sessions_14_25(store: Store, shards: list[int]) -> dict[str, HookStats]:
    """merge.merge_shards of sessions 14-25: the checksum first, then the in-buffer decode with numcodecs' shuffle."""
    merged: dict[str, HookStats] = {}
    with numcodecs_shuffle():
        for index in shards:
            blob = store.files.read_bytes(store.states_name(index))
            assert hashlib.sha256(blob).hexdigest() == store.read_marker(index)["files"][store.states_name(index)]
            for hook, tensors in _by_hook(decode_states(blob)).items():
                state = HookStats.from_state_dict(tensors)
                merged[hook] = state if hook not in merged else merged[hook].merge_(state)
    return merged


def fold_before(store: Store, shards: list[int]) -> dict[str, HookStats]:
    """merge.merge_shards of sessions 12-13: the same reads and checksums, safetensors' loader, counts
    widened to int64 on restore, and a new merged state a shard."""
    merged: dict[str, HookStats] = {}
    for index in shards:
        blob = store.files.read_bytes(store.states_name(index))
        assert hashlib.sha256(blob).hexdigest() == store.read_marker(index)["files"][store.states_name(index)]
        for hook, tensors in _by_hook(loader_decode(blob)).items():
            state = HookStats.from_state_dict(tensors)
            if state.histogram is not None:
                state.histogram.counts  # noqa: B018 - the property widens to int64
            merged[hook] = state if hook not in merged else merged[hook].merge(state)
    return merged


def shard_store(root: Path, tensors: dict[str, torch.Tensor], n: int) -> tuple[Store, float]:
    """A store holding `n` shards whose states are `tensors`, and the best time of one shard's write."""
    store = Store(root)
    store.begin({"name": "bench-states"}, {}, resume=False)
    stats = {hook: HookStats.from_state_dict(t) for hook, t in _by_hook(tensors).items()}
    best = float("inf")
    for i in range(n):
        start = time.perf_counter()
        store.write_shard(SimpleNamespace(index=i, stats=stats, tokens=None, dense={}, n_tokens=0, seconds=0.0), {})
        best = min(best, time.perf_counter() - start)
    return store, best


def same_bits(a: dict[str, HookStats], b: dict[str, HookStats]) -> bool:
    flat = [{f"{h}/{k}": t for h, st in m.items() for k, t in st.state_dict().items()} for m in (a, b)]
    return same_tensors(*flat)


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store", help="a complete store (its _shards/merged.states.zst)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shards", type=int, default=8, help="copies of the states folded in each fold round")
    args = ap.parse_args()
    blob = Store(args.store).files.read_bytes(MERGED_STATES)
    tensors = decode_states(blob)
    tmp = tempfile.TemporaryDirectory()
    store, _ = shard_store(Path(tmp.name) / "store", tensors, args.shards)
    shards = list(range(args.shards))
    one = SimpleNamespace(index=0, stats={hook: HookStats.from_state_dict(t) for hook, t in _by_hook(tensors).items()},
                          tokens=None, dense={}, n_tokens=0, seconds=0.0)
    runs = {"encode torch": lambda: torch_encode(tensors), "encode numcodecs": lambda: loader_encode(tensors),
            "encode in-buffer": with_numcodecs(lambda: encode_states(tensors)),
            "encode loops": lambda: encode_states(tensors),
            "decode torch": lambda: torch_decode(blob), "decode numcodecs": lambda: loader_decode(blob),
            "decode in-buffer": with_numcodecs(lambda: decode_states(blob)),
            "decode loops": lambda: decode_states(blob),
            "fold before": lambda: fold_before(store, shards),
            "fold in-buffer": lambda: fold_sessions_14_25(store, shards),
            "fold now": lambda: merge_shards(store, None, shards),
            "write in-buffer": with_numcodecs(lambda: store.write_shard(one, {})),
            "write now": lambda: store.write_shard(one, {})}
    best: dict[str, float] = {}
    results = {}
    for _ in range(args.repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            results[name] = run()
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
    raw = sum(t.numel() * t.element_size() for t in tensors.values())
    print(f"{raw / 1e6:,.0f} MB of states ({len(blob) / 1e6:,.1f} MB stored), torch {torch.get_num_threads()} "
          f"threads, best of {args.repeats}:")
    for op in ("encode", "decode"):
        slow, fast = best[f"{op} torch"], best[f"{op} numcodecs"]
        print(f"  {op}: torch copy {slow:.3f} s, numcodecs {fast:.3f} s: {slow / fast:.2f}x")
    slow, fast = best["encode numcodecs"], best["encode in-buffer"]
    print(f"  encode: numcodecs + safetensors' save {slow:.3f} s, in-buffer {fast:.3f} s: {slow / fast:.2f}x")
    slow, fast = best["decode numcodecs"], best["decode in-buffer"]
    print(f"  decode: safetensors' loader + numcodecs {slow:.3f} s, in-buffer {fast:.3f} s: {slow / fast:.2f}x")
    threads = torch.get_num_threads()
    for op in ("encode", "decode"):
        slow, fast = best[f"{op} in-buffer"], best[f"{op} loops"]
        print(f"  {op} in-buffer: numcodecs' shuffle (sessions 14-25) {slow:.3f} s, byteshuffle's loops on {threads} "
              f"threads {fast:.3f} s: {slow / fast:.2f}x")
    before, middle, now = (best[f"fold {name}"] / args.shards for name in ("before", "in-buffer", "now"))
    print(f"  the driver's fold of {args.shards} shards (merge.merge_shards), a shard: sessions 12-13 {before:.3f} s, "
          f"sessions 14-25 {middle:.3f} s, now {now:.3f} s: {middle / now:.2f}x")
    slow, fast = best["write in-buffer"], best["write now"]
    print(f"  the actor's write of a shard's states (Store.write_shard: state_dict, encode, checksum, write), "
          f"sessions 14-25 {slow:.3f} s, now {fast:.3f} s: {slow / fast:.2f}x")
    with numcodecs_shuffle():
        old_bytes, old_decoded = encode_states(tensors), decode_states(blob)
    same_bytes = encode_states(tensors) == old_bytes == loader_encode(tensors) == torch_encode(tensors) == blob
    print("same bytes as stored:", same_bytes, "; same tensors decoded:", same_tensors(loader_decode(blob), tensors)
          and same_tensors(old_decoded, tensors) and same_tensors(decode_states(blob), tensors),
          "; same fold:", same_bits(results["fold before"], results["fold now"])
          and same_bits(results["fold in-buffer"], results["fold now"]))


if __name__ == "__main__":
    main()
