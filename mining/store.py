"""The store directory: layout, atomic writes, per-shard outputs and completion markers.

    job.yaml, provenance.json        what was mined, with what (written at start)
    docs.parquet                     documents (text included, so examples resolve offline)
    tokens/shard-NNNNN.parquet       token rows, written by the actor that mined the shard
    activations.zarr/<hook>/shard-NNNNN/   opt-in dense float16 sample, one group per shard
    _shards/shard-NNNNN.states.zst   reducer states of the shard (safetensors, zstd)
    _shards/shard-NNNNN.json         completion marker: files, row counts, sha256 — written last
    neurons.parquet, histograms.parquet, top_examples.parquet, ...   final tables (driver)
    manifest.parquet                 one row per shard; written after every final table

Every file is written under a temporary name and renamed when complete, so a crash never
leaves a file that reads as complete; a store without manifest.parquet is incomplete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq
import safetensors.torch
import torch
import yaml

from .errors import UserError

SHARDS = "_shards"
MANIFEST = "manifest.parquet"


class Store:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    # ------------------------------------------------------------ paths
    def marker(self, shard: int) -> Path:
        return self.root / SHARDS / f"shard-{shard:05d}.json"

    def states_path(self, shard: int) -> Path:
        return self.root / SHARDS / f"shard-{shard:05d}.states.zst"

    def tokens_path(self, shard: int) -> Path:
        return self.root / "tokens" / f"shard-{shard:05d}.parquet"

    def dense_path(self, hook: str, shard: int) -> Path:
        return self.root / "activations.zarr" / hook / f"shard-{shard:05d}"

    @property
    def complete(self) -> bool:
        return (self.root / MANIFEST).exists()

    # ------------------------------------------------------------ lifecycle
    def prepare(self, job: dict[str, Any], resume: bool, overwrite: bool) -> None:
        """Check an existing store against the flags; never deletes anything that is not a store."""
        if not self.root.exists():
            return
        looks_like_store = (self.root / "job.yaml").exists()
        if resume:
            if not looks_like_store:
                raise UserError(f"{self.root}: --resume given but this is not a store (no job.yaml)")
            old = yaml.safe_load((self.root / "job.yaml").read_text())
            diff = _incompatible(old, job)
            if diff:
                raise UserError(f"{self.root}: cannot resume: the store was mined with a different {diff}; "
                                "use --overwrite or another --store")
            return
        if overwrite:
            if not looks_like_store and any(self.root.iterdir()):
                raise UserError(f"{self.root}: --overwrite refused: the directory is not a store and not empty")
            shutil.rmtree(self.root)
            return
        raise UserError(f"{self.root}: store already exists; pass --resume to finish it or --overwrite to replace it")

    def begin(self, job: dict[str, Any], provenance: dict[str, Any], resume: bool) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / SHARDS).mkdir(exist_ok=True)
        if resume and (self.root / MANIFEST).exists():
            (self.root / MANIFEST).unlink()  # re-finalized below; until then the store reads as incomplete
        atomic_write_text(self.root / "job.yaml", yaml.safe_dump(job, sort_keys=False))
        atomic_write_text(self.root / "provenance.json", json.dumps(provenance, indent=2, default=str))

    # ------------------------------------------------------------ shards
    def shard_done(self, shard: int) -> bool:
        """A marker exists and every file it names still has its recorded checksum."""
        path = self.marker(shard)
        if not path.exists():
            return False
        try:
            info = json.loads(path.read_text())
            if info.get("status") != "complete":
                return False  # a failed shard is retried by --resume
            return all(checksum(self.root / rel) == digest for rel, digest in info["files"].items())
        except (OSError, ValueError, KeyError):
            return False

    def read_marker(self, shard: int) -> dict[str, Any]:
        return json.loads(self.marker(shard).read_text())

    def write_shard(self, result: Any, extra: dict[str, Any]) -> dict[str, Any]:
        """Write a ShardResult's files, then its marker. Returns the marker."""
        i = result.index
        files: dict[str, Path] = {}
        tensors = {f"{hook}/{key}": t.contiguous().cpu() for hook, st in result.stats.items()
                   for key, t in st.state_dict().items()}
        atomic_write_bytes(self.states_path(i), _compress(safetensors.torch.save(tensors)))
        files["states"] = self.states_path(i)
        if result.tokens is not None:
            atomic_write(self.tokens_path(i), lambda p: pq.write_table(result.tokens, p, compression="zstd"))
            files["tokens"] = self.tokens_path(i)
        for hook, (toks, values) in sorted(result.dense.items()):
            from .dense import write_dense_shard

            write_dense_shard(self.dense_path(hook, i), toks, values)
            files[f"dense:{hook}"] = self.dense_path(hook, i)
        marker = {
            "shard": i, "status": "complete", "tokens": result.n_tokens, **extra,
            "rows": {"tokens": 0 if result.tokens is None else result.tokens.num_rows},
            "seconds": round(result.seconds, 3),
            "files": {str(p.relative_to(self.root)): checksum(p) for p in files.values()},
        }
        atomic_write_text(self.marker(i), json.dumps(marker, indent=1))
        return marker

    def write_failed(self, shard: Any, error: str, attempts: int) -> dict[str, Any]:
        """Record a shard that failed every attempt, so the manifest can say which and why."""
        marker = {"shard": shard.index, "status": "failed", "tokens": shard.n_tokens, "first_tok": shard.first_tok,
                  "contexts": len(shard.ids), "attempts": attempts, "error": error, "rows": {"tokens": 0}, "files": {}}
        atomic_write_text(self.marker(shard.index), json.dumps(marker, indent=1))
        return marker

    def load_states(self, shard: int) -> dict[str, dict[str, torch.Tensor]]:
        tensors = safetensors.torch.load(_decompress(self.states_path(shard).read_bytes()))
        by_hook: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            hook, _, name = key.partition("/")
            by_hook.setdefault(hook, {})[name] = t
        return by_hook

    def verify(self) -> list[str]:
        """Problems found checking every shard file against the manifest's checksums (empty: intact)."""
        if not self.complete:
            return [f"{self.root}: no manifest.parquet: the store is incomplete (finish it with `mine run --resume`)"]
        problems = []
        for row in pq.read_table(self.root / MANIFEST).to_pylist():
            if row["status"] != "complete":
                problems.append(f"shard {row['shard']}: status {row['status']}")
                continue
            for rel, digest in json.loads(row["files"]).items():
                path = self.root / rel
                if not path.exists():
                    problems.append(f"shard {row['shard']}: {rel} is missing")
                elif checksum(path) != digest:
                    problems.append(f"shard {row['shard']}: {rel} does not match its checksum")
        return problems

    def write_table(self, name: str, table: pa.Table) -> Path:
        path = self.root / f"{name}.parquet"
        atomic_write(path, lambda p: pq.write_table(table, p, compression="zstd"))
        return path


def _compress(data: bytes) -> bytes:
    # 8-byte size header: pyarrow's zstd decompress needs the decompressed size up front
    return len(data).to_bytes(8, "little") + pa.compress(data, codec="zstd", asbytes=True)


def _decompress(blob: bytes) -> bytes:
    size = int.from_bytes(blob[:8], "little")
    return pa.decompress(blob[8:], decompressed_size=size, codec="zstd", asbytes=True)


def _incompatible(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """The first key that differs in a way that changes results (actor count and store path do not)."""
    ignore = {"store", "compute.actors", "compute.cpus_per_actor", "compute.max_retries"}

    def walk(a: Any, b: Any, prefix: str) -> str | None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                path = f"{prefix}{key}"
                if path in ignore:
                    continue
                found = walk(a.get(key), b.get(key), path + ".")
                if found:
                    return found
            return None
        return None if a == b else prefix.rstrip(".")

    return walk(old, new, "")


# ---------------------------------------------------------------- atomic files


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def checksum(path: Path) -> str:
    """sha256 of a file, or of a directory's files (relative names and contents, sorted)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    if not path.exists():
        raise FileNotFoundError(path)
    for f in files:
        if f != path:
            h.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()
