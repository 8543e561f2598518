"""Dense activations in Zarr v3: one group per (hook, shard), written by the one actor that mined it.

Concurrent Zarr writers must own whole chunks; a group per shard makes that trivially true and
lets a group be built under a temporary name and then renamed (local) or uploaded before the
shard's marker (object storage). DuckDB has no Zarr reader, so `read_dense` hands activations
over as Arrow (long format: tok, neuron, value) for SQL.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import zarr
from zarr.codecs import BloscCodec

if TYPE_CHECKING:
    from .store import Store

ROWS_PER_CHUNK = 1024


def build_dense_group(path: Path, toks: np.ndarray, values: np.ndarray) -> None:
    """Write a group at a fresh local path. toks (n,) int64 ascending; values (n, N) float16."""
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    group.create_array("tok", data=toks.astype(np.int64), chunks=(max(1, len(toks)),))
    group.create_array(
        "values", data=values.astype(np.float16),
        chunks=(min(ROWS_PER_CHUNK, max(1, len(values))), values.shape[1]),
        compressors=[BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")],
    )
    group.attrs["rows"] = int(len(toks))


def write_dense_shard(path: Path, toks: np.ndarray, values: np.ndarray) -> None:
    """Build the group next to its final place, then rename it there (a local store)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        build_dense_group(tmp, toks, values)
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _store(store: str | Path | Store) -> Store:
    from .store import Store

    return store if isinstance(store, Store) else Store(store)


def dense_hooks(store: str | Path | Store) -> list[str]:
    from .store import DENSE

    return [name for name, is_dir in _store(store).files.listdir(DENSE) if is_dir]


def _open_group(s: Store, rel: str) -> Any:
    if s.remote:
        from zarr.storage import FsspecStore

        return zarr.open_group(FsspecStore.from_url(s.files.url(rel), read_only=True), mode="r")
    return zarr.open_group(str(s.files.path(rel)), mode="r")


def read_dense(store: str | Path | Store, hook: str, toks: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All stored rows of a hook (optionally only the given toks): (tok (n,), values (n, N) float16)."""
    from .store import DENSE

    s = _store(store)
    rel = f"{DENSE}/{hook}"
    if not s.files.isdir(rel):
        raise FileNotFoundError(f"no dense activations for {hook} in {s.root}")
    all_t, all_v = [], []
    for name in sorted(n for n, is_dir in s.files.listdir(rel) if is_dir and not n.startswith(".")):
        group = _open_group(s, f"{rel}/{name}")
        t = group["tok"][:]
        keep = np.ones(len(t), bool) if toks is None else np.isin(t, toks)
        if keep.any():
            all_t.append(t[keep])
            all_v.append(group["values"][:][keep])
    if not all_t:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.float16)
    return np.concatenate(all_t), np.concatenate(all_v)


def dense_arrow(store: str | Path | Store, hook: str) -> pa.Table:
    """Long format for DuckDB: one row per (tok, neuron)."""
    t, v = read_dense(store, hook)
    n = v.shape[1] if v.ndim == 2 else 0
    return pa.table({
        "tok": np.repeat(t, n),
        "neuron": np.tile(np.arange(n, dtype=np.int32), len(t)),
        "value": v.astype(np.float32).reshape(-1),
    })
