"""Corpus sources -> documents, in a deterministic order.

Sources: `files:GLOB` (.txt/.md/.py and other text, .jsonl, .parquet), `dataset:NAME_OR_PATH`
(a `datasets` dataset: a local `save_to_disk` folder, a local data folder, or a hub name
streamed for users with internet), and offline built-ins made from text every Python install
has: `builtin:python-stdlib` (the standard library's source, a code corpus) and
`builtin:python-docs` (the Python reference manual's prose shipped in `pydoc_data`).
"""

from __future__ import annotations

import glob
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .errors import UserError
from .spec import CorpusSpec

BUILTINS = ("python-stdlib", "python-docs")
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".c", ".h", ".js", ".ts", ".html", ".css", ".tex", ".csv", ".json", ".yaml", ".yml", ".toml"}


@dataclass(frozen=True)
class Document:
    doc_id: int
    source: str
    """The corpus source string the document came from."""
    path: str
    """File (and record) or dataset row that holds the text."""
    text: str


def iter_documents(spec: CorpusSpec) -> Iterator[Document]:
    kind, _, arg = spec.source.partition(":")
    records = {"files": _files, "dataset": _dataset, "builtin": _builtin}[kind](arg, spec)
    doc_id = 0
    for path, text in records:
        if not text:
            continue
        yield Document(doc_id, spec.source, path, text)
        doc_id += 1
        if spec.max_docs is not None and doc_id >= spec.max_docs:
            return


def check_source(spec: CorpusSpec) -> None:
    """Fail fast (before any store exists) on a source that cannot yield documents."""
    kind, _, arg = spec.source.partition(":")
    if kind == "files" and not _matching_files(arg):
        raise UserError(f"corpus.source: no files match {arg!r}")
    if kind == "builtin" and arg not in BUILTINS:
        raise UserError(f"corpus.source: unknown built-in corpus {arg!r}; choose one of {', '.join(BUILTINS)}")


# ---------------------------------------------------------------- files


def _matching_files(pattern: str) -> list[Path]:
    return sorted(Path(p) for p in glob.glob(str(Path(pattern).expanduser()), recursive=True) if Path(p).is_file())


def _files(pattern: str, spec: CorpusSpec) -> Iterator[tuple[str, str]]:
    files = _matching_files(pattern)
    if not files:
        raise UserError(f"corpus.source: no files match {pattern!r}")
    for f in files:
        if f.suffix == ".jsonl":
            yield from _jsonl(f, spec.text_field)
        elif f.suffix == ".parquet":
            yield from _parquet(f, spec.text_field)
        else:
            yield str(f), _read_text(f)


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"corpus: {path} is not UTF-8 text (bad byte at offset {e.start}); convert or exclude it") from None


def _jsonl(path: Path, field: str) -> Iterator[tuple[str, str]]:
    for i, line in enumerate(_read_text(path).splitlines()):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"corpus: {path}:{i + 1} is not valid JSON ({e.msg})") from None
        text = record.get(field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise UserError(f"corpus.text_field: {path}:{i + 1} has no string field {field!r}")
        yield f"{path}:{i + 1}", text


def _parquet(path: Path, field: str) -> Iterator[tuple[str, str]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise UserError(f"corpus: {path} is not a readable Parquet file ({e})") from None
    if field not in pf.schema_arrow.names:
        raise UserError(f"corpus.text_field: {path} has no column {field!r} (columns: {', '.join(pf.schema_arrow.names)})")
    row = 0
    for batch in pf.iter_batches(columns=[field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            yield f"{path}#{row}", text or ""
            row += 1


# ---------------------------------------------------------------- datasets


def _dataset(name: str, spec: CorpusSpec) -> Iterator[tuple[str, str]]:
    try:
        import datasets
    except ImportError:
        raise UserError("corpus.source: dataset sources need the `datasets` package") from None
    local = Path(name).expanduser()
    try:
        if (local / "dataset_info.json").exists() or (local / "state.json").exists():
            ds = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[spec.split]
        else:  # a local data folder or a hub name; streaming never materializes the whole set
            ds = datasets.load_dataset(str(local) if local.exists() else name, split=spec.split, streaming=True)
    except Exception as e:
        raise UserError(f"corpus.source: cannot open dataset {name!r}: {str(e).splitlines()[0][:200]}") from None
    for i, record in enumerate(ds):
        text = record.get(spec.text_field)
        if not isinstance(text, str):
            raise UserError(f"corpus.text_field: dataset {name!r} row {i} has no string field {spec.text_field!r}")
        yield f"{name}#{i}", text


# ---------------------------------------------------------------- built-ins


def _builtin(name: str, spec: CorpusSpec) -> Iterator[tuple[str, str]]:
    if name == "python-stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts
                       and "tests" not in p.parts and "idle_test" not in p.parts)
        for f in files:
            try:
                yield str(f.relative_to(root)), f.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue  # a handful of stdlib files are deliberately not UTF-8
    elif name == "python-docs":
        from pydoc_data.topics import topics  # the reference manual, as plain text

        for key in sorted(topics):
            yield f"pydoc_data.topics:{key}", topics[key]
    else:
        raise UserError(f"corpus.source: unknown built-in corpus {name!r}; choose one of {', '.join(BUILTINS)}")
