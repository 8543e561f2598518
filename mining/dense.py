"""Dense activations in Zarr v3: one group per (hook, shard), written by the one actor that mined it.

Concurrent Zarr writers must own whole chunks; a group per shard makes that trivially true and
lets a group be written under a temporary name and renamed. DuckDB has no Zarr reader, so
`read_dense` hands activations over as Arrow (long format: tok, neuron, value) for SQL.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import zarr
from zarr.codecs import BloscCodec

ROWS_PER_CHUNK = 1024


def write_dense_shard(path: Path, toks: np.ndarray, values: np.ndarray) -> None:
    """toks (n,) int64 ascending; values (n, N) float16."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        group.create_array("tok", data=toks.astype(np.int64), chunks=(max(1, len(toks)),))
        group.create_array(
            "values", data=values.astype(np.float16),
            chunks=(min(ROWS_PER_CHUNK, max(1, len(values))), values.shape[1]),
            compressors=[BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")],
        )
        group.attrs["rows"] = int(len(toks))
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def dense_hooks(store: Path) -> list[str]:
    root = Path(store) / "activations.zarr"
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.exists() else []


def read_dense(store: Path, hook: str, toks: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All stored rows of a hook (optionally only the given toks): (tok (n,), values (n, N) float16)."""
    root = Path(store) / "activations.zarr" / hook
    if not root.exists():
        raise FileNotFoundError(f"no dense activations for {hook} in {store}")
    all_t, all_v = [], []
    for group_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        group = zarr.open_group(str(group_dir), mode="r")
        t = group["tok"][:]
        keep = np.ones(len(t), bool) if toks is None else np.isin(t, toks)
        if keep.any():
            all_t.append(t[keep])
            all_v.append(group["values"][:][keep])
    if not all_t:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.float16)
    return np.concatenate(all_t), np.concatenate(all_v)


def dense_arrow(store: Path, hook: str) -> pa.Table:
    """Long format for DuckDB: one row per (tok, neuron)."""
    t, v = read_dense(store, hook)
    n = v.shape[1] if v.ndim == 2 else 0
    return pa.table({
        "tok": np.repeat(t, n),
        "neuron": np.tile(np.arange(n, dtype=np.int32), len(t)),
        "value": v.astype(np.float32).reshape(-1),
    })
