"""Where a store's bytes live: a local directory, or an object-storage URL (s3://, gs://, ...) via fsspec.

`Store` names its files relative to the store root and hands bytes to one of two backends:

- `LocalFiles`: every file is written under a temporary name, fsynced and renamed with
  `os.replace`, so a crash never leaves a file that reads as complete.
- `RemoteFiles`: an object appears only once its PUT completes, so every file is one put of its
  full bytes and there is no rename; a dense group (a directory of objects) is uploaded before
  the shard's marker, and the marker (written last) is what says the shard is complete.

Credentials and endpoints come from the usual environment of each filesystem (for S3:
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, ...), so Ray workers that inherit or
are given that environment reach the same bucket as the driver.
"""

from __future__ import annotations

import functools
import hashlib
import os
import signal
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import UserError

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


def is_url(location: str | Path | Any) -> bool:
    """An fsspec URL other than file:// (a file:// URL is a local directory and keeps local semantics)."""
    return isinstance(location, str) and bool(_URL.match(location)) and not location.startswith("file://")


def local_path(location: str | Path) -> Path:
    return Path(str(location).removeprefix("file://"))


def parquet_bytes(table: pa.Table, row_group_size: int | None = None) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", row_group_size=row_group_size)
    return sink.getvalue().to_pybytes()


def _sort_key(rel: str) -> list[str]:
    return rel.split("/")  # the order pathlib gives relative paths, so local and remote digests agree


def _digest(entries: Iterable[tuple[str, Iterable[bytes]]]) -> str:
    """sha256 over (relative name, content) pairs; a lone file ("" as its name) hashes its content only."""
    h = hashlib.sha256()
    for rel, blocks in entries:
        if rel:
            h.update(rel.encode())
        for block in blocks:
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- local directory


class LocalFiles:
    remote = False

    def __init__(self, root: Path):
        self.root = root

    @property
    def location(self) -> str:
        return str(self.root.resolve())

    def path(self, rel: str) -> Path:
        return self.root / rel if rel else self.root

    def exists(self, rel: str = "") -> bool:
        return self.path(rel).exists()

    def isdir(self, rel: str = "") -> bool:
        return self.path(rel).is_dir()

    def listdir(self, rel: str = "") -> list[tuple[str, bool]]:
        """(name, is_dir) of the entries directly under rel; empty if there is none."""
        folder = self.path(rel)
        return sorted((p.name, p.is_dir()) for p in folder.iterdir()) if folder.is_dir() else []

    def read_bytes(self, rel: str) -> bytes:
        return self.path(rel).read_bytes()

    def write_bytes(self, rel: str, data: bytes) -> str:
        atomic_write_bytes(self.path(rel), data)
        return hashlib.sha256(data).hexdigest()

    def write_parquet(self, rel: str, table: pa.Table, row_group_size: int | None = None) -> str:
        path = self.path(rel)
        atomic_write(path, lambda p: pq.write_table(table, p, compression="zstd", row_group_size=row_group_size))
        return checksum(path)

    def checksum(self, rel: str) -> str:
        return checksum(self.path(rel))

    def remove(self, rel: str) -> None:
        self.path(rel).unlink(missing_ok=True)

    def remove_all(self) -> None:
        shutil.rmtree(self.root)

    def makedirs(self, rel: str = "") -> None:
        self.path(rel).mkdir(parents=True, exist_ok=True)


# ---------------------------------------------------------------- object storage (fsspec)


def _one_line(method: Callable[..., Any]) -> Callable[..., Any]:
    """Backend errors (credentials, endpoint, permissions) become one UserError line naming the store;
    FileNotFoundError passes through, as callers handle a missing file themselves."""

    @functools.wraps(method)
    def wrapper(self: RemoteFiles, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except (UserError, FileNotFoundError):
            raise
        except Exception as e:  # noqa: BLE001 - any backend's own exception types
            raise UserError(f"{self.location}: {type(e).__name__}: {_first_line(e)}") from None

    return wrapper


class RemoteFiles:
    remote = True

    def __init__(self, url: str):
        import fsspec

        try:
            self.fs, base = fsspec.core.url_to_fs(url)
        except (ImportError, ValueError) as e:  # e.g. gs:// without gcsfs installed
            raise UserError(f"{url}: cannot open this storage: {_first_line(e)}") from None
        self.base = base.rstrip("/")
        self.location = url.rstrip("/")

    def full(self, rel: str) -> str:
        return f"{self.base}/{rel}" if rel else self.base

    def url(self, rel: str) -> str:
        return f"{self.location}/{rel}" if rel else self.location

    def _fresh(self, rel: str) -> str:
        # other processes (the actors) write here too: never answer from a cached listing
        full = self.full(rel)
        self.fs.invalidate_cache(full)
        return full

    def check(self) -> None:
        """Fail early, in one line, when the storage cannot be reached or its bucket is missing."""
        try:
            split = getattr(self.fs, "split_path", None)
            bucket = split(self.base)[0] if split else None
            if bucket and not self.fs.exists(bucket):
                raise UserError(f"{self.location}: bucket {bucket!r} does not exist (create it first)")
            self.exists("")
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - credentials, endpoint, permissions: say which, in one line
            raise UserError(f"{self.location}: cannot reach the store: {type(e).__name__}: {_first_line(e)}") from None

    @_one_line
    def exists(self, rel: str = "") -> bool:
        return self.fs.exists(self._fresh(rel))

    @_one_line
    def isdir(self, rel: str = "") -> bool:
        return self.fs.isdir(self._fresh(rel))

    @_one_line
    def listdir(self, rel: str = "") -> list[tuple[str, bool]]:
        full = self._fresh(rel)
        try:
            entries = self.fs.ls(full, detail=True)
        except FileNotFoundError:
            return []
        out = [(e["name"].rstrip("/").rsplit("/", 1)[-1], e["type"] == "directory") for e in entries
               if e["name"].rstrip("/") != full]
        return sorted(out)

    @_one_line
    def find(self, rel: str = "") -> dict[str, dict[str, Any]]:
        """Every object under rel (recursively): relative name -> info (size, ETag where the store has one)."""
        full = self._fresh(rel)
        found = self.fs.find(full, detail=True)
        prefix = self.base + "/"
        return {name[len(prefix):]: info for name, info in found.items() if name.startswith(prefix)}

    @_one_line
    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.full(rel))

    @_one_line
    def write_bytes(self, rel: str, data: bytes) -> str:
        self.fs.pipe_file(self.full(rel), data)  # one PUT: the object appears complete or not at all
        return hashlib.sha256(data).hexdigest()

    def write_parquet(self, rel: str, table: pa.Table, row_group_size: int | None = None) -> str:
        return self.write_bytes(rel, parquet_bytes(table, row_group_size))

    @_one_line
    def put_dir(self, rel: str, local: Path) -> str:
        """Upload a local directory's files under rel, replacing whatever a crashed attempt left there."""
        files = sorted((p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()), key=_sort_key)
        if self.exists(rel):
            self.fs.rm(self.full(rel), recursive=True)
        self.fs.pipe({self.full(f"{rel}/{name}"): (local / name).read_bytes() for name in files})
        return checksum(local)

    @_one_line
    def checksum(self, rel: str) -> str:
        full = self._fresh(rel)
        names = sorted(self.fs.find(full), key=lambda n: _sort_key(n[len(full):].lstrip("/")))
        if not names:
            raise FileNotFoundError(self.url(rel))
        if names == [full]:
            return _digest([("", [self.fs.cat_file(full)])])
        contents = self.fs.cat(names)
        return _digest((name[len(full) + 1:], [contents[name]]) for name in names)

    @_one_line
    def remove(self, rel: str) -> None:
        if self.exists(rel):
            self.fs.rm_file(self.full(rel))

    @_one_line
    def remove_all(self) -> None:
        self.fs.rm(self.base, recursive=True)
        self.fs.invalidate_cache(self.base)

    def makedirs(self, rel: str = "") -> None:
        pass  # object storage has no directories; a prefix exists once an object is under it


class RemotePath:
    """A location inside a remote store, with the few pathlib methods callers use on `Store.root`
    (`/`, exists, is_dir, resolve, read_text), so code written for local stores keeps working."""

    def __init__(self, files: RemoteFiles, rel: str = ""):
        self._files, self._rel = files, rel

    def __truediv__(self, name: str | Path) -> RemotePath:
        name = str(name).strip("/")
        return RemotePath(self._files, f"{self._rel}/{name}" if self._rel else name)

    @property
    def name(self) -> str:
        return (self._rel or self._files.base).rsplit("/", 1)[-1]

    def exists(self) -> bool:
        return self._files.exists(self._rel)

    def is_dir(self) -> bool:
        return self._files.isdir(self._rel)

    def is_file(self) -> bool:
        return self.exists() and not self.is_dir()

    def resolve(self) -> RemotePath:
        return self  # a URL is already absolute

    def read_bytes(self) -> bytes:
        return self._files.read_bytes(self._rel)

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def __str__(self) -> str:
        return self._files.url(self._rel)

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:300]


# ---------------------------------------------------------------- local atomic files


def injected_faults(kind: str) -> list[str]:
    """Test hook: the arguments of `kind` in MINING_INJECT_FAULT="kind:arg,kind:arg,..."."""
    items = (item.partition(":") for item in os.environ.get("MINING_INJECT_FAULT", "").split(",") if item)
    return [arg for k, _, arg in items if k == kind]


def _injected_kill(path: Path, tmp: str) -> None:
    """Test hook: "kill-writing:NAME" kills this process (SIGKILL) half way through writing the file
    NAME: the temporary holds half the bytes and NAME is never replaced."""
    if path.name in injected_faults("kill-writing"):
        os.truncate(tmp, os.path.getsize(tmp) // 2)
        os.kill(os.getpid(), signal.SIGKILL)


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        _injected_kill(path, tmp)
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
    if not path.exists():
        raise FileNotFoundError(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())

    def blocks(f: Path) -> Iterable[bytes]:
        with open(f, "rb") as fh:
            yield from iter(lambda: fh.read(1 << 22), b"")

    return _digest(("" if f == path else str(f.relative_to(path)), blocks(f)) for f in files)
