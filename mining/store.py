"""The store: layout, per-shard outputs and completion markers, at a local directory or a URL.

    job.yaml, provenance.json        what was mined, with what (written at start)
    docs.parquet                     documents (text included, so examples resolve offline)
    tokens/shard-NNNNN.parquet       token rows, written by the actor that mined the shard
    activations.zarr/<hook>/shard-NNNNN/   opt-in dense float16 sample, one group per shard
    _shards/shard-NNNNN.states.zst   reducer states of the shard (safetensors, zstd), until the merge
    _shards/shard-NNNNN.json         completion marker: files, row counts, sha256 — written last
    _shards/merged.states.zst        once every shard is complete: their states folded into one file,
    _shards/merged.json              which shards it holds and its sha256; the per-shard files go
    neurons.parquet, histograms.parquet, top_examples.parquet, ...   final tables (driver)
    manifest.parquet                 one row per shard; written after every final table

A local file is written under a temporary name and renamed when complete; an object in object
storage appears only when its upload completes (see storage.py). Either way a crash never leaves
a file that reads as complete, and a store without manifest.parquet is incomplete.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from .errors import UserError
from .storage import (  # noqa: F401 - atomic_* and checksum are re-exported for callers
    LocalFiles,
    RemoteFiles,
    RemotePath,
    atomic_write,
    atomic_write_bytes,
    atomic_write_text,
    checksum,
    is_url,
    local_path,
)

if TYPE_CHECKING:  # torch is imported where states are encoded: `mine verify` and queries never need it
    import torch

SHARDS = "_shards"
DENSE = "activations.zarr"
MANIFEST = "manifest.parquet"
MERGED_STATES = f"{SHARDS}/merged.states.zst"
MERGED_MARKER = f"{SHARDS}/merged.json"
DOC_GROUP_BYTES = 1 << 20
"""Text per row group of docs.parquet (a 10M-token store's text is about 40-70 MB)."""
FILES_KEY = b"mining.files"  # manifest metadata: checksums of every file the shard rows do not cover


def is_temporary(rel: str) -> bool:
    """atomic_write's `.NAME.*.tmp`, which a killed writer leaves behind."""
    name = rel.rsplit("/", 1)[-1]
    return name.startswith(".") and name.endswith(".tmp")


class Store:
    """A store at a local directory or an fsspec URL.

    `root` is a Path for a local store and a `RemotePath` (the same few path operations) for a
    remote one; `location` is the string to hand to another process (absolute path or URL)."""

    def __init__(self, root: str | Path):
        self.files: LocalFiles | RemoteFiles
        if is_url(root):
            self.files = RemoteFiles(str(root))
            self.root: Path | RemotePath = RemotePath(self.files)
        else:
            self.root = local_path(root)
            self.files = LocalFiles(self.root)

    @property
    def remote(self) -> bool:
        return self.files.remote

    @property
    def location(self) -> str:
        """Absolute path or URL: what actors in other processes (or on other nodes) open."""
        return self.files.location

    def exists(self, rel: str = "") -> bool:
        return self.files.exists(rel)

    # ------------------------------------------------------------ paths (relative to the root)
    @staticmethod
    def marker_name(shard: int) -> str:
        return f"{SHARDS}/shard-{shard:05d}.json"

    @staticmethod
    def states_name(shard: int) -> str:
        return f"{SHARDS}/shard-{shard:05d}.states.zst"

    @staticmethod
    def tokens_name(shard: int) -> str:
        return f"tokens/shard-{shard:05d}.parquet"

    @staticmethod
    def dense_name(hook: str, shard: int) -> str:
        return f"{DENSE}/{hook}/shard-{shard:05d}"

    def marker(self, shard: int) -> Path | RemotePath:
        return self.root / self.marker_name(shard)

    def states_path(self, shard: int) -> Path | RemotePath:
        return self.root / self.states_name(shard)

    def tokens_path(self, shard: int) -> Path | RemotePath:
        return self.root / self.tokens_name(shard)

    def dense_path(self, hook: str, shard: int) -> Path | RemotePath:
        return self.root / self.dense_name(hook, shard)

    @property
    def complete(self) -> bool:
        return self.files.exists(MANIFEST)

    # ------------------------------------------------------------ lifecycle
    def prepare(self, job: dict[str, Any], resume: bool, overwrite: bool) -> None:
        """Check an existing store against the flags; never deletes anything that is not a store."""
        if isinstance(self.files, RemoteFiles):
            self.files.check()
        if not self.files.exists():
            return
        looks_like_store = self.files.exists("job.yaml")
        if resume:
            if not looks_like_store:
                raise UserError(f"{self.root}: --resume given but this is not a store (no job.yaml)")
            old = yaml.safe_load(self.files.read_bytes("job.yaml").decode())
            diff = spec_difference(old, job)
            if diff:
                raise UserError(f"{self.root}: cannot resume: the store was mined with a different {diff}; "
                                "use --overwrite or another --store")
            return
        if overwrite:
            if not looks_like_store and self.files.listdir():
                raise UserError(f"{self.root}: --overwrite refused: the directory is not a store and not empty")
            self.files.remove_all()
            return
        raise UserError(f"{self.root}: store already exists; pass --resume to finish it or --overwrite to replace it")

    def begin(self, job: dict[str, Any], provenance: dict[str, Any], resume: bool) -> None:
        self.files.makedirs()
        self.files.makedirs(SHARDS)
        if resume and self.files.exists(MANIFEST):
            self.files.remove(MANIFEST)  # re-finalized below; until then the store reads as incomplete
        if resume:  # temporaries of writes a killed run left half done
            for rel in self.walk():
                if is_temporary(rel):
                    self.files.remove(rel)
        if resume and self.files.exists("provenance.json"):  # how an `auto` batch size was chosen stays on record
            chosen = json.loads(self.files.read_bytes("provenance.json")).get("batch_size")
            if chosen and job["compute"]["batch_size"] == chosen.get("chosen"):
                provenance = {**provenance, "batch_size": chosen}
        self.files.write_bytes("job.yaml", yaml.safe_dump(job, sort_keys=False).encode())
        self.files.write_bytes("provenance.json", json.dumps(provenance, indent=2, default=str).encode())

    def recorded_job(self) -> dict[str, Any] | None:
        """The job.yaml of the store, if there is one."""
        if not self.files.exists("job.yaml"):
            return None
        return yaml.safe_load(self.files.read_bytes("job.yaml").decode())

    def record_batch_size(self, batch_size: int, how: dict[str, Any]) -> None:
        """A `compute.batch_size: auto` once chosen, before any shard is mined with it: into job.yaml, which
        `--resume` and a rerun of job.yaml then reproduce, and how it was chosen into provenance.json."""
        job = self.recorded_job()
        job["compute"]["batch_size"] = batch_size
        self.files.write_bytes("job.yaml", yaml.safe_dump(job, sort_keys=False).encode())
        provenance = json.loads(self.files.read_bytes("provenance.json"))
        provenance["batch_size"] = {"requested": "auto", "chosen": batch_size, **how}
        self.files.write_bytes("provenance.json", json.dumps(provenance, indent=2, default=str).encode())

    # ------------------------------------------------------------ shards
    def shard_done(self, shard: int) -> bool:
        """A marker exists and every file it names still has its recorded checksum."""
        try:
            if not self.files.exists(self.marker_name(shard)):
                return False
            info = self.read_marker(shard)
            if info.get("status") != "complete":
                return False  # a failed shard is retried by --resume
            return all(self.files.checksum(rel) == digest for rel, digest in info["files"].items())
        except (OSError, ValueError, KeyError):
            return False

    def read_marker(self, shard: int) -> dict[str, Any]:
        return json.loads(self.files.read_bytes(self.marker_name(shard)))

    def write_shard(self, result: Any, extra: dict[str, Any]) -> dict[str, Any]:
        """Write a ShardResult's files, then its marker. Returns the marker."""
        i = result.index
        files: dict[str, str] = {}  # relative name -> sha256 of what was written
        tensors = {f"{hook}/{key}": t.contiguous().cpu() for hook, st in result.stats.items()
                   for key, t in st.state_dict().items()}
        files[self.states_name(i)] = self.files.write_bytes(self.states_name(i), encode_states(tensors))
        if result.tokens is not None:
            files[self.tokens_name(i)] = self.files.write_parquet(self.tokens_name(i), result.tokens)
        for hook, (toks, values) in sorted(result.dense.items()):
            files[self.dense_name(hook, i)] = self._write_dense(self.dense_name(hook, i), toks, values)
        marker = {
            "shard": i, "status": "complete", "tokens": result.n_tokens, **extra,
            "rows": {"tokens": 0 if result.tokens is None else result.tokens.num_rows},
            "seconds": round(result.seconds, 3),
            "files": files,
        }
        self.files.write_bytes(self.marker_name(i), json.dumps(marker, indent=1).encode())
        return marker

    def _write_dense(self, rel: str, toks: Any, values: Any) -> str:
        from .dense import build_dense_group, write_dense_shard

        if isinstance(self.files, LocalFiles):
            path = self.files.path(rel)
            write_dense_shard(path, toks, values)
            return checksum(path)
        with tempfile.TemporaryDirectory(prefix="mining-dense-") as tmp:  # built locally, then uploaded
            build_dense_group(Path(tmp) / "group", toks, values)
            return self.files.put_dir(rel, Path(tmp) / "group")

    def write_failed(self, shard: Any, error: str, attempts: int) -> dict[str, Any]:
        """Record a shard that failed every attempt, so the manifest can say which and why."""
        marker = {"shard": shard.index, "status": "failed", "tokens": shard.n_tokens, "first_tok": shard.first_tok,
                  "contexts": len(shard.ids), "attempts": attempts, "error": error, "rows": {"tokens": 0}, "files": {}}
        self.files.write_bytes(self.marker_name(shard.index), json.dumps(marker, indent=1).encode())
        return marker

    def load_states(self, shard: int, digest: str | None = None) -> dict[str, dict[str, torch.Tensor]]:
        """A shard's reducer states; with `digest` (its marker's checksum) a changed file is refused, and
        its marker removed so that `mine run --resume` mines the shard again."""
        blob = self.files.read_bytes(self.states_name(shard))
        tensors = decode_states(blob) if digest is None else decode_checked(blob, digest)
        if tensors is None:
            self.files.remove(self.marker_name(shard))
            raise UserError(f"{self.root}: shard {shard}'s states file does not match its checksum (changed after "
                            "it was written); its marker is removed: `mine run --resume` mines it again")
        return _by_hook(tensors)

    # ------------------------------------------------------------ merged states
    def merged_shards(self) -> set[int]:
        """The shards whose states are folded into MERGED_STATES (none before the first complete merge)."""
        if not self.files.exists(MERGED_MARKER):
            return set()
        return set(json.loads(self.files.read_bytes(MERGED_MARKER))["shards"])

    def load_merged_states(self) -> dict[str, dict[str, torch.Tensor]]:
        """The merged states, checked against merged.json. A changed file is refused, and the markers of the
        shards it held are removed (their own states are gone), so that `mine run --resume` mines them again."""
        info = json.loads(self.files.read_bytes(MERGED_MARKER))
        tensors = decode_checked(self.files.read_bytes(MERGED_STATES), info["sha256"])
        if tensors is None:
            for shard in info["shards"]:
                self.files.remove(self.marker_name(shard))
            self.files.remove(MERGED_MARKER)
            raise UserError(f"{self.root}: {MERGED_STATES} does not match its checksum (changed after it was "
                            "written); the markers of its shards are removed: `mine run --resume` mines them again")
        return _by_hook(tensors)

    def compact_states(self, merged: dict[str, dict[str, torch.Tensor]], shards: list[int]) -> None:
        """Replace the per-shard states by their merge, once every shard is complete: a store's states then
        stay one shard's size however many shards it has (each shard's file is about the size of the
        merge). Every step leaves a store that merges to the same result if the process dies after it:
        the merged file and merged.json first, then each marker without its states, then the files."""
        if self.merged_shards() != set(shards):
            flat = {f"{hook}/{key}": t.contiguous().cpu() for hook, st in merged.items() for key, t in st.items()}
            digest = self.files.write_bytes(MERGED_STATES, encode_states(flat))
            self.files.write_bytes(MERGED_MARKER, json.dumps({"shards": sorted(shards), "sha256": digest}).encode())
        for shard in shards:
            marker = self.read_marker(shard)
            if marker["files"].pop(self.states_name(shard), None) is not None:
                self.files.write_bytes(self.marker_name(shard), json.dumps(marker, indent=1).encode())
            if self.files.exists(self.states_name(shard)):
                self.files.remove(self.states_name(shard))

    def read_table(self, name: str) -> pa.Table:
        """A top-level table (`name`.parquet), read through the store's filesystem."""
        return pq.read_table(pa.BufferReader(self.files.read_bytes(f"{name}.parquet")))

    def verify(self) -> list[str]:
        """Problems found checking every store file against the manifest's checksums (empty: intact):
        shard files by their shard rows, every other file by the manifest's `mining.files` metadata,
        and any file the manifest does not list."""
        if not self.complete:
            return [f"{self.root}: no manifest.parquet: the store is incomplete (finish it with `mine run --resume`)"]
        problems = []
        manifest = self.read_table("manifest")
        covered: dict[str, str] = {}
        for row in manifest.to_pylist():
            if row["status"] != "complete":
                problems.append(f"shard {row['shard']}: status {row['status']}")
                continue
            for rel, digest in json.loads(row["files"]).items():
                covered[rel] = digest
        sealed = (manifest.schema.metadata or {}).get(FILES_KEY)
        if sealed is None:
            problems.append("manifest.parquet lists no checksums for the store's other files (a store from an "
                            "older version); `mine run --resume` re-seals it")
        else:
            covered.update(json.loads(sealed))
        for rel, digest in sorted(covered.items()):
            try:
                found = self.files.checksum(rel)
            except FileNotFoundError:
                problems.append(f"{rel} is missing")
                continue
            if found != digest:
                problems.append(f"{rel} does not match its checksum (altered or truncated)")
        if sealed is not None:
            problems += [f"{rel} is not in the manifest" for rel in self.unlisted(covered)]
        return problems

    def walk(self, rel: str = "") -> list[str]:
        """Every file under rel (relative names), directories expanded."""
        out = []
        for name, is_dir in self.files.listdir(rel):
            child = f"{rel}/{name}" if rel else name
            out += self.walk(child) if is_dir else [child]
        return out

    def unlisted(self, covered: dict[str, str]) -> list[str]:
        """Files present but covered neither by name nor by a covered directory (a dense Zarr group)."""
        dirs = tuple(rel + "/" for rel in covered)
        return [rel for rel in self.walk() if rel != MANIFEST and rel not in covered and not rel.startswith(dirs)]

    def seal(self, manifest: pa.Table) -> None:
        """Write the manifest with the checksum of every file its shard rows do not cover. Written last:
        its presence marks the store complete."""
        listed = manifest.column("files").to_pylist() if "files" in manifest.column_names else []
        covered = {rel: digest for files in listed if files for rel, digest in json.loads(files).items()}
        # a temporary is never listed: `mine verify` names any that is left
        others = {rel: self.files.checksum(rel) for rel in self.unlisted(covered) if not is_temporary(rel)}
        meta = dict(manifest.schema.metadata or {})
        meta[FILES_KEY] = json.dumps(others, sort_keys=True)
        self.write_table("manifest", manifest.replace_schema_metadata(meta))

    def reseal(self) -> None:
        """After writing tables into a complete store (`mine analyze`): the manifest lists them too."""
        self.seal(self.read_table("manifest"))

    def write_table(self, name: str, table: pa.Table, row_group_size: int | None = None) -> Path | RemotePath:
        self.files.write_parquet(f"{name}.parquet", table, row_group_size)
        return self.root / f"{name}.parquet"

    def write_docs(self, docs: pa.Table) -> Path | RemotePath:
        """The docs table in row groups of about DOC_GROUP_BYTES of text: a context's text between tokens (see
        tok_contexts in queries/_macros.sql) then reads the row groups of its own documents, not every text."""
        size = pc.sum(pc.binary_length(docs.column("text"))).as_py() or 0
        return self.write_table("docs", docs, max(1, DOC_GROUP_BYTES * docs.num_rows // max(1, size)))


LAYOUT = "__byte_planes__"
"""The tensor holding each shuffled tensor's dtype and shape (JSON). Not safetensors metadata: that map
is written in a random order, and a shard's bytes must not vary (the manifest checksums them)."""


# safetensors' dtype names, in the order its serializer lays tensors out (this order, then by name)
_SAFETENSORS_DTYPES = ("uint64:U64", "int64:I64", "float64:F64", "float32:F32", "uint32:U32", "int32:I32", "bfloat16:BF16",
                       "float16:F16", "uint16:U16", "int16:I16", "float8_e4m3fn:F8_E4M3", "float8_e5m2:F8_E5M2",
                       "int8:I8", "uint8:U8", "bool:BOOL")
_SAFETENSORS_NAME = dict(entry.split(":") for entry in _SAFETENSORS_DTYPES)
_SAFETENSORS_RANK = {name: rank for rank, name in enumerate(_SAFETENSORS_NAME.values())}


def encode_states(tensors: dict[str, torch.Tensor]) -> bytes:
    """safetensors + zstd, each tensor's bytes regrouped by position within the element first ("byte
    shuffle", as Blosc does): counts, token indices and floats then compress far better - the shard
    states of the demo 20% smaller - at no cost in exactness. The file is the bytes safetensors' `save`
    writes (tests/test_states_format.py), but built in one buffer with each tensor shuffled into its place:
    `save` copies every shuffled plane twice more, a third of an actor's write of a shard."""
    import torch

    from .byteshuffle import each_large, shuffle_into

    layout, parts = {}, []  # parts: (name, safetensors dtype, stored shape, flat bytes, element size to shuffle)
    for name, t in tensors.items():
        dtype = str(t.dtype).removeprefix("torch.")
        layout[name] = [dtype, list(t.shape)]
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy()
        if t.dim():  # a (element size, n) plane of bytes
            parts.append((name, "U8", [t.element_size(), t.numel()], raw, t.element_size()))
        else:  # a scalar, stored as itself
            parts.append((name, _SAFETENSORS_NAME[dtype], [], raw, 1))
    index = json.dumps(layout, sort_keys=True).encode()
    parts.append((LAYOUT, "U8", [len(index)], np.frombuffer(index, np.uint8), 1))
    parts.sort(key=lambda part: (_SAFETENSORS_RANK[part[1]], part[0]))
    header, offset = {}, 0
    for name, dtype, shape, raw, _ in parts:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + raw.size]}
        offset += raw.size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    out = _scratch(8 + len(head) + offset)
    out[:8] = np.frombuffer(len(head).to_bytes(8, "little"), np.uint8)
    out[8:8 + len(head)] = np.frombuffer(head, np.uint8)
    base = 8 + len(head)

    def place(i: int) -> None:
        name, _, _, raw, size = parts[i]
        start, end = header[name]["data_offsets"]
        if size > 1 and raw.size:
            shuffle_into(raw, size, out[base + start:base + end])
        else:
            out[base + start:base + end] = raw

    each_large(place, [part[3].size for part in parts], torch.get_num_threads())
    return _compress(out)


_SCRATCH = threading.local()


def _scratch(size: int) -> np.ndarray:
    """A uint8 buffer of `size` bytes kept by this thread between calls. A shard's states are hundreds of MB (SmolLM2
    with polysemanticity: 311 MB), each shard the same size: a fresh buffer's first touch of every page cost an actor
    half a second a shard. A thread's own, since a GPU actor writes two shards at once (ray_pool.write_slots)."""
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.size < size:
        buf = _SCRATCH.buf = None  # the old one freed first
        buf = _SCRATCH.buf = np.empty(size, np.uint8)
    return buf[:size]


def decode_states(blob: bytes) -> dict[str, torch.Tensor]:
    """encode_states' tensors. Each plane is unshuffled straight out of the decompressed buffer, read as
    the safetensors layout (8-byte header size, JSON header, data): safetensors' own loader copies the
    buffer and every tensor first, and those fresh pages cost the driver a fifth of its per-shard fold."""
    import safetensors.torch
    import torch

    from .byteshuffle import each_large, unshuffle

    data = _decompress_buffer(blob)
    view = memoryview(data)
    size = int.from_bytes(view[:8], "little")
    header = json.loads(bytes(view[8:8 + size]))
    header.pop("__metadata__", None)
    if LAYOUT not in header:
        return safetensors.torch.load(data.to_pybytes())  # a shard written before byte shuffling
    base = 8 + size

    def raw(entry: dict[str, Any]) -> np.ndarray:
        start, end = entry["data_offsets"]
        return np.frombuffer(view, np.uint8, end - start, base + start)

    layout = json.loads(raw(header.pop(LAYOUT)).tobytes())
    names = list(header)
    flat: list[np.ndarray | None] = [None] * len(names)

    def take(i: int) -> None:
        entry = header[names[i]]
        flat[i] = unshuffle(raw(entry), entry["shape"][0]) if entry["shape"] else raw(entry).copy()

    each_large(take, [header[name]["data_offsets"][1] - header[name]["data_offsets"][0] for name in names],
               torch.get_num_threads())
    out = {}
    for name, planes in zip(names, flat):
        dtype, shape = layout[name]
        flat_bytes = torch.from_numpy(planes) if planes.size else torch.empty(0, dtype=torch.uint8)  # numpy's stride 0
        out[name] = flat_bytes.view(getattr(torch, dtype)).reshape(shape)  # a scalar is stored as itself
    return out


def decode_checked(blob: bytes, digest: str) -> dict[str, torch.Tensor] | None:
    """decode_states(blob) where blob's sha256 is `digest`, else None. The checksum runs on a thread beside the
    decode (both release the GIL): it was a sixth of the driver's fold of a shard. What a changed file decodes to,
    or the error its decode raises, is never returned: only the checksum's verdict."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        sha = pool.submit(lambda: hashlib.sha256(blob).hexdigest())
        try:
            tensors = decode_states(blob)
        except Exception:
            if sha.result() != digest:
                return None
            raise
    return tensors if sha.result() == digest else None


def _by_hook(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """'blocks.0.mlp.hook_post/top.values' -> {'blocks.0.mlp.hook_post': {'top.values': ...}}."""
    by_hook: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        hook, _, name = key.partition("/")
        by_hook.setdefault(hook, {})[name] = t
    return by_hook


def _compress(data: bytes) -> bytes:
    # 8-byte size header: pyarrow's zstd decompress needs the decompressed size up front
    return len(data).to_bytes(8, "little") + pa.compress(data, codec="zstd", asbytes=True)


def _decompress(blob: bytes) -> bytes:
    return _decompress_buffer(blob).to_pybytes()


def _decompress_buffer(blob: bytes) -> pa.Buffer:
    size = int.from_bytes(blob[:8], "little")
    return pa.decompress(memoryview(blob)[8:], decompressed_size=size, codec="zstd")


def spec_difference(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """The first key that differs in a way that changes results (actor count and store path do not). An `auto`
    batch or shard size matches the number it chose (the runner's `recorded_compute` then uses that number);
    a recorded `auto` batch size means the job stopped before choosing it, so before mining any shard."""
    ignore = {"store", "compute.actors", "compute.cpus_per_actor", "compute.max_retries"}
    chosen = {"compute.batch_size", "compute.shard_tokens"}
    try:  # a store from an older version lacks keys added since: they read as their defaults
        from .spec import spec_from_dict

        old = spec_from_dict(old).to_dict()
    except UserError:
        pass

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
        path = prefix.rstrip(".")
        return None if a == b or (path in chosen and "auto" in (a, b)) else path

    return walk(old, new, "")


