"""DuckDB over a store: views, macros, a sandbox, named queries and result formats.

`connect(store)` opens an in-memory DuckDB with one view per store table (every top-level
`NAME.parquet` and every `NAME/` directory holding Parquet; private `_*`, `.*` and
`activations.zarr` excluded), then the macros of `queries/_macros.sql`, then locks itself in:
only the store directory (for an s3:// or other remote store: its local mirror) is readable,
no extension may be installed or loaded, and the configuration cannot be changed back. This
module is the only place store file paths appear in SQL. Named queries are `queries/*.sql` files with a header:

    -- name: top-activations
    -- purpose: one line
    -- param: layer          (required)
    -- param: k = 10         (default)
    -- requires: dla_examples (tables only some jobs write; a clear error names the spec key)

and DuckDB's native `$name` parameters in the body.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import sys
import tempfile
import uuid
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import UserError
from .storage import is_url

MACROS = "_macros.sql"
PRIVATE = {"activations.zarr"}
# statement kinds that read or write files outside the views, refused before DuckDB sees them
# (DuckDB's own sandbox stops them anyway; this also keeps COPY from overwriting store files)
REFUSED = {
    duckdb.StatementType.COPY: "COPY", duckdb.StatementType.EXPORT: "EXPORT",
    duckdb.StatementType.LOAD: "INSTALL/LOAD", duckdb.StatementType.ATTACH: "ATTACH",
    duckdb.StatementType.DETACH: "DETACH", duckdb.StatementType.COPY_DATABASE: "COPY DATABASE",
}
HIVE_INT_KEYS = {"layer", "neuron", "head", "shard", "band", "rank"}
FORMATS = ("table", "csv", "json", "parquet")


# ---------------------------------------------------------------- connection


def local_root(store: str | Path) -> Path:
    """The directory a complete store's tables are read from: the store itself, or for a remote store
    (s3://...) its local mirror (mirror.py), so DuckDB and exports never need network access."""
    if is_url(store):
        from .mirror import mirror

        root = mirror(str(store))
    else:
        root = Path(store).expanduser().resolve()
    if not (root / "manifest.parquet").is_file():
        raise UserError(f"{store}: not a complete store (no manifest.parquet); "
                        "finish it with `mine run --resume` or point at a store directory")
    return root


def has_tables(con: duckdb.DuckDBPyConnection, *names: str) -> bool:
    """Whether the store has all these views (tables only some jobs write)."""
    present = {row[0] for row in con.execute("SELECT view_name FROM duckdb_views()").fetchall()}
    return all(n in present for n in names)


def connect(store: str | Path) -> duckdb.DuckDBPyConnection:
    """A sandboxed connection over a store (see local_root for remote stores)."""
    root = local_root(store)
    temp = Path(tempfile.gettempdir()) / f"mining-duckdb-{os.getpid()}-{uuid.uuid4().hex[:8]}"  # created on spill
    con = duckdb.connect(":memory:", config={
        "threads": max(1, min(4, os.cpu_count() or 1)), "memory_limit": "2GB",
        "temp_directory": str(temp), "autoinstall_known_extensions": False,
        "parquet_metadata_cache": True,  # a store's token files are many; read their footers once
    })
    try:
        tables = store_tables(root)
        for name, source in tables.items():
            con.execute(f"CREATE VIEW {_ident(name)} AS SELECT * FROM {source}")
        for name in ("logit_lens", "dla_neurons", "dla_examples", "dla_diff"):
            if name in tables and "hook" not in _columns(con, name):
                # a store mined before SAE latents had lens and DLA rows: every row is an MLP neuron's
                con.execute(f"CREATE OR REPLACE VIEW {name} AS SELECT 'mlp.hook_post' AS hook, * FROM {tables[name]}")
        if "logprob_b" in _columns(con, "tokens"):
            # a diff store: both models' log-prob of the actual next token on each token row
            con.execute("CREATE VIEW token_diff AS SELECT tok, logprob AS logprob_a, logprob_b, "
                        "logprob_b - logprob AS diff FROM tokens")
        _create_macros(con)
        # order matters: the allow-list must be set while external access is still on, and
        # the lock must come last or the first SET would already be refused
        con.execute("SET allowed_directories = $dirs", {"dirs": [str(root)]})
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
    except duckdb.Error as e:
        con.close()
        raise UserError(f"{store}: cannot open the store's tables: {_one_line(e)}") from None
    return con


def _columns(con: duckdb.DuckDBPyConnection, view: str) -> set[str]:
    return {r[0] for r in con.execute("SELECT column_name FROM information_schema.columns WHERE table_name = ?",
                                      [view]).fetchall()}


def store_tables(root: Path) -> dict[str, str]:
    """View name -> table-function SQL reading it, for every table in the store directory."""
    tables: dict[str, str] = {}
    for entry in sorted(root.iterdir()):
        name = entry.name
        if name.startswith(("_", ".")) or name in PRIVATE:
            continue
        if entry.is_file() and name.endswith(".parquet"):
            tables.setdefault(name[: -len(".parquet")], f"read_parquet({_literal(str(entry))})")
        elif entry.is_dir() and name not in tables and any(entry.rglob("*.parquet")):
            tables[name] = _dir_source(entry)
    return tables


def _dir_source(folder: Path) -> str:
    """All Parquet under a folder; `key=value` subfolders become hive partition columns."""
    keys = {part.split("=", 1)[0] for p in folder.rglob("*.parquet")
            for part in p.relative_to(folder).parts[:-1] if "=" in part}
    options = ["union_by_name = true"]
    if keys:
        types = ", ".join(f"{_literal(k)}: {'INTEGER' if k in HIVE_INT_KEYS else 'VARCHAR'}" for k in sorted(keys))
        options += ["hive_partitioning = true", f"hive_types = {{{types}}}"]
    else:
        options.append("hive_partitioning = false")
    return f"read_parquet({_literal(str(folder / '**' / '*.parquet'))}, {', '.join(options)})"


def _create_macros(con: duckdb.DuckDBPyConnection) -> None:
    path = queries_dir() / MACROS
    if not path.is_file():
        path = _default_queries_dir() / MACROS
    for statement in con.extract_statements(path.read_text()):
        try:
            con.execute(statement)
        except (duckdb.CatalogException, duckdb.BinderException):
            pass  # the store lacks a table or column this macro reads (e.g. mined without histograms)


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


# ---------------------------------------------------------------- running SQL


def run_sql(con: duckdb.DuckDBPyConnection, sql: str, params: dict[str, Any] | None = None) -> pa.Table:
    """Run SQL (the last statement's rows come back); any DuckDB error becomes one UserError line."""
    try:
        statements = con.extract_statements(sql)
        if not statements:
            raise UserError("empty SQL: give a query, e.g. \"SELECT * FROM neurons LIMIT 5\"")
        for st in statements:
            if st.type in REFUSED:
                raise UserError(f"{REFUSED[st.type]} statements are not allowed in queries; "
                                "use --format/--out to save results")
        relation = con.sql(sql, params=params or None)
        return relation.to_arrow_table() if relation is not None else pa.table({})
    except duckdb.Error as e:
        raise UserError(f"query failed: {_one_line(e)}") from None


@dataclass(frozen=True)
class Param:
    name: str
    default: str | None  # None: required


@dataclass(frozen=True)
class NamedQuery:
    name: str
    purpose: str
    params: tuple[Param, ...]
    sql: str
    path: Path
    requires: tuple[str, ...] = ()
    """Tables that only some jobs write (e.g. dla_examples needs stats.dla: true)."""


def _default_queries_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "queries"


def queries_dir() -> Path:
    env = os.environ.get("MINING_QUERIES_DIR")
    return Path(env) if env else _default_queries_dir()


_HEADER = re.compile(r"^--\s*(name|purpose|param|requires)\s*:\s*(.*?)\s*$")
_PARAM = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\s*(?:=\s*(.*))?$")


def parse_named(path: Path) -> NamedQuery:
    text = path.read_text()
    fields: dict[str, str] = {}
    params: list[Param] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        if not line.lstrip().startswith("--"):
            break  # the header is the leading comment block
        m = _HEADER.match(line.strip())
        if not m:
            continue
        key, value = m.groups()
        if key == "param":
            pm = _PARAM.match(value)
            if not pm:
                raise UserError(f"{path}: bad parameter line {line.strip()!r}; write `-- param: NAME = DEFAULT`")
            params.append(Param(pm.group(1), pm.group(2).strip() if pm.group(2) is not None else None))
        else:
            fields[key] = value
    requires = tuple(t.strip() for t in fields.get("requires", "").split(",") if t.strip())
    return NamedQuery(fields.get("name", path.stem), fields.get("purpose", ""), tuple(params), text, path, requires)


def list_named() -> list[NamedQuery]:
    folder = queries_dir()
    if not folder.is_dir():
        raise UserError(f"{folder}: no queries directory (set MINING_QUERIES_DIR to a folder of .sql files)")
    found = [parse_named(p) for p in sorted(folder.glob("*.sql")) if not p.name.startswith("_")]
    return sorted(found, key=lambda q: q.name)


def load_named(name: str) -> NamedQuery:
    queries = list_named()
    for q in queries:
        if q.name == name:
            return q
    raise UserError(f"unknown named query {name!r}; available: {', '.join(q.name for q in queries)}")


def convert_param(value: Any) -> Any:
    """CLI strings to int, then float, else the string unchanged."""
    if not isinstance(value, str):
        return value
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def run_named(con: duckdb.DuckDBPyConnection, name: str, params: dict[str, str]) -> pa.Table:
    q = load_named(name)
    if q.requires:
        missing = [t for t in q.requires if not has_tables(con, t)]
        if missing:
            raise UserError(f"{name}: this store has no {', '.join(missing)} table; {_HOW_TO_GET.get(missing[0], '')}"
                            .rstrip("; "))
    declared = {p.name: p for p in q.params}
    unknown = sorted(set(params) - set(declared))
    if unknown:
        valid = ", ".join(declared) or "none"
        raise UserError(f"{name}: unknown parameter {', '.join(unknown)}; its parameters are: {valid}")
    values: dict[str, Any] = {}
    for p in q.params:
        if p.name in params:
            values[p.name] = convert_param(params[p.name])
        elif p.default is not None:
            values[p.name] = convert_param(p.default)
        else:
            raise UserError(f"{name}: missing required parameter {p.name} (give --param {p.name}=VALUE)")
    used = set(re.findall(r"\$([A-Za-z_][A-Za-z0-9_]*)", _strip_comments(q.sql)))
    try:
        return run_sql(con, q.sql, {k: v for k, v in values.items() if k in used})
    except UserError as e:
        text = [k for k in used if isinstance(values.get(k), str) and f"'{values[k]}'" in str(e)]
        if "Conversion Error" in str(e) and text:  # a number's parameter given text: name it, not just the cast
            raise UserError(f"{name}: parameter {text[0]}={values[text[0]]!r} is not a number") from None
        raise


_HOW_TO_GET = {
    "top_contexts": "mine with `stats: {top_k: 16}` (every job of this version writes it)",
    "bottom_examples": "mine with `stats: {top_k: 16}` (every job of this version writes it)",
    "histograms": "mine with `stats: {histogram: true}`",
    "dla_examples": "mine with `stats: {dla: true}`",
    "dla_neurons": "mine with `stats: {dla: true}`",
    "quantile_samples": "mine with `stats: {quantile_samples: 8}`",
    "heads": "mine with `stats: {heads: true}`",
    "logit_lens": "mine with `stats: {logit_lens: true}`",
    "gate_cases": "mine with `stats: {gate_cases: true}` (gated MLPs)",
    "neuron_variance": "mine with `stats: {polysemanticity: true}`",
    "neuron_coherence": "mine with `stats: {polysemanticity: true}`",
    "head_ablation": "mine with `stats: {head_ablation: true}`",
    "token_diff": "mine a diff job (`models: {a: ..., b: ...}` instead of `model`)",
    "neuron_diff": "mine a diff job (`models: {a: ..., b: ...}` instead of `model`) with hooks (one without compares "
                   "tokens only)",
    "neuron_diff_examples": "mine a diff job (`models: {a: ..., b: ...}` instead of `model`) with hooks (one "
                            "without compares tokens only)",
    "weight_diff": "mine a diff job (`models: {a: ..., b: ...}` instead of `model`) of two models that share weights "
                   "of the same name and shape",
    "neuron_weight_diff": "mine a diff job (`models: {a: ..., b: ...}` instead of `model`) of two models that share "
                          "weights of the same name and shape",
    "head_weight_diff": "mine a diff job (`models: {a: ..., b: ...}` instead of `model`) of two models that share "
                        "weights of the same name and shape",
    "neuron_match": "mine a diff job with `stats: {neuron_match: true}`",
    "dla_diff": "mine a diff job with `stats: {dla: true}`",
    "head_dla_diff": "mine a diff job with `stats: {dla: true}`",
    "regex_neurons": "run `mine analyze STORE regex PATTERN` (needs dense activations)",
    "pca_components": "run `mine analyze STORE pca` (needs dense activations)",
    "pca_examples": "run `mine analyze STORE pca` (needs dense activations)",
    "pca_loadings": "run `mine analyze STORE pca` (needs dense activations)",
    "cofiring": "run `mine analyze STORE cofire` (needs dense activations)",
    "cofire_groups": "run `mine analyze STORE cofire` (needs dense activations)",
    "pattern_offsets": "run `mine analyze STORE offsets` (needs a dense attn.hook_pattern sample)",
}


def _strip_comments(sql: str) -> str:
    return re.sub(r"--[^\n]*", "", sql)


# ---------------------------------------------------------------- results

MAX_WIDTH = 72
MAX_TABLE_ROWS = 500


def write_result(table: pa.Table, fmt: str, out: str | Path | None = None) -> None:
    """Print or save a result: table (aligned text, stdout only), csv, json (JSON lines), parquet (needs out)."""
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if fmt == "parquet" and out is None:
        raise UserError("--format parquet needs --out FILE")
    if fmt == "table":
        text = format_table(table)
    elif fmt == "csv":
        text = _csv(table)
    elif fmt == "json":
        text = "".join(json.dumps(_jsonable(row), ensure_ascii=False) + "\n" for row in table.to_pylist())
    if out is None:
        sys.stdout.write(text)
        sys.stdout.flush()
    elif fmt == "parquet":
        _atomic(Path(out), lambda tmp: pq.write_table(table, tmp, compression="zstd"))
    else:
        _atomic(Path(out), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _atomic(path: Path, write) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise UserError(f"{path}: cannot write: {e.strerror or e}") from None
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"{path}: cannot write: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _csv(table: pa.Table) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(table.column_names)
    for row in table.to_pylist():
        w.writerow(["" if v is None else _csv_cell(v) for v in row.values()])
    return buf.getvalue()


def _csv_cell(v: Any) -> Any:
    if isinstance(v, (list, dict)):
        return json.dumps(_jsonable(v), ensure_ascii=False)
    return repr(v) if isinstance(v, float) else v


def _jsonable(v: Any) -> Any:
    """JSON-safe values: non-finite floats become null (JSON has no NaN/Infinity)."""
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, Decimal):
        return float(v)
    if isinstance(v, bytes):
        return v.hex()
    if v is None or isinstance(v, (str, int, bool)):
        return v
    return str(v)


def format_table(table: pa.Table) -> str:
    """Aligned text: numbers right, text left; long text cut around its «marked» token."""
    names = table.column_names
    rows = table.slice(0, MAX_TABLE_ROWS).to_pylist()
    numeric = [pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)
               for t in table.schema.types]
    cells = [[_cell(row[n]) for n in names] for row in rows]
    widths = [max([len(n)] + [len(r[i]) for r in cells]) for i, n in enumerate(names)]

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(values, widths, numeric)).rstrip()

    out = [line(names), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    more = table.num_rows - len(rows)
    out.append(f"({table.num_rows} row{'s' if table.num_rows != 1 else ''}"
               + (f"; {more} not shown, use --format csv/json/parquet" if more else "") + ")")
    return "\n".join(out) + "\n"


def _cell(v: Any) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, dict)):
        v = json.dumps(_jsonable(v), ensure_ascii=False)
    text = str(v).replace("\r", "").replace("\n", "⏎").replace("\t", "→")
    return _shorten(text)


def _shorten(text: str, width: int = MAX_WIDTH) -> str:
    if len(text) <= width:
        return text
    start = text.find("«")
    end = text.find("»", start) + 1 if start >= 0 else 0
    if start < 0:
        return text[: width - 1] + "…"
    if end - start > width - 4:  # the marked token alone nearly fills the cell: start at it
        return ("…" if start else "") + text[start: start + width - 2] + "…"
    left = max(0, min(start - (width - (end - start)) // 2, len(text) - width))
    piece = text[left: left + width]
    if left > 0:
        piece = "…" + piece[1:]
    if left + width < len(text):
        piece = piece[:-1] + "…"
    return piece
