"""A local copy of a remote store's queryable files, so DuckDB reads local Parquet only.

Queries keep their sandbox (no httpfs, no external access): `mirror(url)` downloads the top-level
tables, the table directories (tokens/, ...) and job.yaml/provenance.json — never _shards/ or
activations.zarr — into ~/.cache/activation-mining/stores/<sha of url>/<version>/, where the
version is a hash of the remote manifest's bytes and of the mirrored objects' names, sizes and
ETags: an unchanged store is reused, a re-mined one is downloaded again. Each version is
downloaded under a temporary name and renamed, so a crash never leaves a mirror that reads as
complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .errors import UserError
from .storage import RemoteFiles

META = ("job.yaml", "provenance.json")
PRIVATE = ("activations.zarr",)


def cache_root() -> Path:
    env = os.environ.get("MINING_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "activation-mining" / "stores"


def queryable(rel: str) -> bool:
    """Top-level tables and metadata, and Parquet inside public table directories."""
    parts = rel.split("/")
    if len(parts) == 1:
        return rel.endswith(".parquet") or rel in META
    return not parts[0].startswith(("_", ".")) and parts[0] not in PRIVATE and rel.endswith(".parquet")


def mirror(url: str) -> Path:
    """The local mirror directory of a complete remote store (downloaded or refreshed as needed)."""
    files = RemoteFiles(url)
    try:
        if not files.exists("manifest.parquet"):
            raise UserError(f"{url}: not a complete store (no manifest.parquet); "
                            "finish it with `mine run --resume` or point at a store")
        manifest = files.read_bytes("manifest.parquet")
        wanted = {rel: info for rel, info in files.find().items() if queryable(rel)}
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - credentials, endpoint, permissions: one line
        raise UserError(f"{url}: cannot read the store: {type(e).__name__}: {_first_line(e)}") from None
    home = cache_root() / hashlib.sha256(files.location.encode()).hexdigest()[:24]
    target = home / _version(manifest, wanted)
    if target.is_dir():
        return target
    home.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=home))
    try:
        for rel in wanted:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        rels = sorted(wanted)
        files.fs.get([files.full(rel) for rel in rels], [str(tmp / rel) for rel in rels])
        (tmp / "manifest.parquet").write_bytes(manifest)  # the very bytes the version was computed from
        (tmp / ".source").write_text(files.location + "\n")
        try:
            tmp.rename(target)
        except OSError:
            if not target.is_dir():
                raise
            shutil.rmtree(tmp)  # another process mirrored the same version first: use theirs
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and not isinstance(e, UserError):
            raise UserError(f"{url}: cannot download the store's tables: {type(e).__name__}: {_first_line(e)}") from None
        raise
    for old in home.iterdir():  # older versions of this store: superseded
        if old != target and not old.name.startswith("."):
            shutil.rmtree(old, ignore_errors=True)
    return target


def _version(manifest: bytes, objects: dict[str, dict[str, Any]]) -> str:
    h = hashlib.sha256(manifest)
    listing = sorted((rel, info.get("size"), str(info.get("ETag") or info.get("etag") or info.get("md5Hash") or ""))
                     for rel, info in objects.items())
    h.update(json.dumps(listing).encode())
    return h.hexdigest()[:16]


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:300]
