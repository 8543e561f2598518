"""`mine export`: chosen neurons' example sets, as JSONL, Parquet, OpenAI neuron-explainer records,
a Neuronpedia export, or a static HTML viewer.

Neurons are chosen by an explicit list, a named query's result (its `layer`, `neuron` and optional
`hook` columns) or the top N by a metric. Per-token activations come from a replay of just the
needed contexts (replay.py): one forward pass per distinct context, stopped after the deepest
exported layer.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import UserError
from .examples import SETS, Example, NeuronId, attach, example_record, pick_examples, random_contexts
from .query import connect, has_tables, local_root, run_named
from .replay import Replayer
from .sae import split_sae
from .storage import atomic_write, atomic_write_text

FORMATS = ("jsonl", "parquet", "openai", "neuronpedia", "html")


@dataclass(frozen=True)
class ExampleCounts:
    """How many examples of each set every exported neuron gets."""

    k: int = 10  # top contexts and bottom tokens
    per_band: int = 2  # per quantile band (kind `all`), when the store has quantile_samples
    random: int = 5  # random contexts, shared by all neurons of one export
    seed: int = 0
    sets: tuple[str, ...] = SETS


# ---------------------------------------------------------------- neuron selection


def require_single_model(con: duckdb.DuckDBPyConnection, store: str | Path) -> None:
    """Examples and the viewer read one model's per-neuron tables; a diff store has neuron_diff instead."""
    if has_tables(con, "neurons"):
        return
    if has_tables(con, "neuron_diff"):
        raise UserError(f"{store}: a diff store (models a and b) has no per-model neurons table to export or view; "
                        "use its named queries (neuron-diff, token-gains, dla-diff), or mine each model alone")
    raise UserError(f"{store}: this store has no neurons table; mine with `stats: {{moments: true}}`")


def default_hook(hooks: Sequence[str]) -> str:
    """The hook a command shows when none is named: mlp.hook_post, or a store's first where it has none (a mixture
    of experts' routing)."""
    return "mlp.hook_post" if "mlp.hook_post" in hooks or not hooks else hooks[0]


def select_neurons(con: duckdb.DuckDBPyConnection, hook: str | None, explicit: Sequence[tuple[int, int]] = (),
                   query: str | None = None, params: dict[str, str] | None = None, top: int | None = 0,
                   by: str = "kurtosis", order: str = "desc", layer: int = -1) -> list[NeuronId]:
    """Explicit neurons first, then a named query's rows, then the top N by `by`; duplicates dropped. hook None:
    mlp.hook_post, or the store's first hook where it has none (a mixture of experts' routing)."""
    if hook is None:
        hook = default_hook([r[0] for r in con.execute("SELECT DISTINCT hook FROM neurons ORDER BY hook").fetchall()])
    chosen: list[NeuronId] = [NeuronId(hook, layer_, neuron) for layer_, neuron in explicit]
    if query:
        table = run_named(con, query, dict(params or {}))
        missing = {"layer", "neuron"} - set(table.column_names)
        if missing:
            raise UserError(f"--query {query}: its result has no {' or '.join(sorted(missing))} column; "
                            "export needs layer and neuron (and optionally hook)")
        for r in table.to_pylist():
            chosen.append(NeuronId(r.get("hook") or hook, int(r["layer"]), int(r["neuron"])))
    if top:
        rows = run_named(con, "top-neurons", {"hook": hook, "layer": str(layer), "by": by, "order": order,
                                               "limit": str(top)}).to_pylist()
        chosen += [NeuronId(r["hook"], r["layer"], r["neuron"]) for r in rows]
    if not chosen:
        raise UserError("no neurons chosen: give --neuron LAYER:NEURON, --query NAME or --top N "
                        "(the query or ranking matched nothing)" if (query or top) else
                        "no neurons chosen: give --neuron LAYER:NEURON, --query NAME or --top N")
    unique = list(dict.fromkeys(chosen))
    check_exist(con, unique)
    return unique


def check_exist(con: duckdb.DuckDBPyConnection, nids: Sequence[NeuronId]) -> None:
    wanted = pa.table({"hook": [n.hook for n in nids], "layer": [n.layer for n in nids],
                       "neuron": [n.neuron for n in nids]})
    con.register("_wanted", wanted)
    try:
        missing = con.execute("SELECT w.hook, w.layer, w.neuron FROM _wanted AS w ANTI JOIN neurons AS n "
                              "USING (hook, layer, neuron) ORDER BY ALL LIMIT 1").fetchall()
    finally:
        con.unregister("_wanted")
    if missing:
        h, layer, neuron = missing[0]
        raise UserError(f"neuron {layer}:{neuron} of {h} is not in the store (see `mine query STORE "
                        f"--named neuron-index --param hook={h}`)")


# ---------------------------------------------------------------- collection


def collect(root: Path, con: duckdb.DuckDBPyConnection, nids: Sequence[NeuronId], counts: ExampleCounts,
            replayer: Replayer | None = None) -> dict[NeuronId, list[Example]]:
    """Every chosen neuron's examples with their contexts and per-token activations."""
    shared_random = random_contexts(con, counts.random if "random" in counts.sets else 0, counts.seed)
    k = counts.k if {"top", "bottom"} & set(counts.sets) else 0
    per_band = counts.per_band if "band" in counts.sets else 0
    by_neuron = {}
    for nid in nids:
        exs = pick_examples(con, nid, k, per_band, shared_random)
        by_neuron[nid] = [e for e in exs if e.set in counts.sets]
    attach(root, replayer or Replayer(root), by_neuron)
    return by_neuron


def doc_paths(con: duckdb.DuckDBPyConnection, doc_ids: Iterable[int]) -> dict[int, str]:
    ids = sorted(set(doc_ids))
    if not ids or not has_tables(con, "docs"):
        return {}
    return dict(con.execute("SELECT doc_id, path FROM docs WHERE doc_id IN (SELECT unnest($ids))",
                            {"ids": ids}).fetchall())


def records(con: duckdb.DuckDBPyConnection, by_neuron: dict[NeuronId, list[Example]]) -> list[dict]:
    paths = doc_paths(con, (e.context.doc_id for exs in by_neuron.values() for e in exs if e.context))
    return [example_record(nid, e, paths) for nid, exs in by_neuron.items() for e in exs]


# ---------------------------------------------------------------- writers


def write_rows(rows: list[dict], fmt: str, out: Path) -> None:
    if fmt == "jsonl":
        atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    else:
        atomic_write(out, lambda p: pq.write_table(pa.Table.from_pylist(rows), p, compression="zstd"))


def write_openai(con: duckdb.DuckDBPyConnection, by_neuron: dict[NeuronId, list[Example]], out: Path) -> int:
    """One `NeuronRecord` JSON per neuron at OUT/neurons/LAYER/NEURON.json, the layout and schema of
    openai/automated-interpretability (neuron_explainer.activations.activations, loadable with its
    fast_dataclasses `loads`, which refuses unknown fields). Stable example ids therefore sit beside
    each record in NEURON.ids.json, in the record lists' order. One hook per export (the format has
    no hook field)."""
    hooks = {nid.hook for nid in by_neuron}
    if len(hooks) > 1:
        raise UserError(f"--format openai: the neurons span hooks {sorted(hooks)}; export one hook at a time")
    paths = doc_paths(con, (e.context.doc_id for exs in by_neuron.values() for e in exs if e.context))

    def build(tmp: Path) -> None:
        for nid, exs in by_neuron.items():
            stats = con.execute("SELECT mean, std, skew, kurtosis FROM neurons WHERE hook = ? AND layer = ? "
                                "AND neuron = ?", [nid.hook, nid.layer, nid.neuron]).fetchone()
            mean, std, skew, kurt = (_finite(v) for v in stats)
            bands: dict[str, list[Example]] = {}
            for e in exs:
                if e.set == "band":
                    bands.setdefault(e.band or "", []).append(e)
            ordered = [b for _, b in sorted(bands.items(), key=lambda kv: kv[1][0].band_lo or 0.0)]
            record = {
                "dataclass_name": "NeuronRecord",
                "neuron_id": {"dataclass_name": "NeuronId", "layer_index": nid.layer, "neuron_index": nid.neuron},
                "random_sample": [_activation_record(e) for e in exs if e.set == "random"],
                "random_sample_by_quantile": [[_activation_record(e) for e in b] for b in ordered] or None,
                "quantile_boundaries": [b[0].band_hi for b in ordered[:-1]] or None,
                "mean": mean, "variance": None if std is None else std * std, "skewness": skew, "kurtosis": kurt,
                "most_positive_activation_records": [_activation_record(e) for e in exs if e.set == "top"],
            }
            folder = tmp / "neurons" / str(nid.layer)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{nid.neuron}.json").write_text(json.dumps(record, ensure_ascii=False, allow_nan=False))
            ids = {"most_positive_activation_records": [_id(e, paths) for e in exs if e.set == "top"],
                   "random_sample": [_id(e, paths) for e in exs if e.set == "random"],
                   "random_sample_by_quantile": [[_id(e, paths) for e in b] for b in ordered],
                   "most_negative": [_id(e, paths) for e in exs if e.set == "bottom"]}
            (folder / f"{nid.neuron}.ids.json").write_text(json.dumps(ids, ensure_ascii=False))

    publish_dir(out, build)
    return len(by_neuron)


def _activation_record(e: Example) -> dict:
    assert e.context is not None
    return {"dataclass_name": "ActivationRecord", "tokens": list(e.context.token), "activations": e.activations}


def _id(e: Example, paths: dict[int, str]) -> dict:
    c = e.context
    assert c is not None
    start, end = c.span
    return {"id": f"{c.doc_id}:{start}-{end}", "doc_id": c.doc_id, "doc_path": paths.get(c.doc_id),
            "char_start": start, "char_end": end, "peak_index": e.peak_index}


def _finite(v) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


def write_neuronpedia(con: duckdb.DuckDBPyConnection, by_neuron: dict[NeuronId, list[Example]], out: Path,
                      model_id: str, source_set: str) -> int:
    """Neuronpedia's export layout: OUT/MODEL/LAYER-SOURCESET/{features,activations}/batch-0.jsonl.gz, one
    Feature row per neuron (logit-lens tokens as pos_str/neg_str, the histogram as freq_hist_*) and one
    Activation row per example (dataIndex carries the stable example id, dataSource the corpus)."""
    paths = doc_paths(con, (e.context.doc_id for exs in by_neuron.values() for e in exs if e.context))
    corpus = _corpus_source(con)
    by_layer: dict[tuple[str, int], list[NeuronId]] = {}
    for nid in by_neuron:
        by_layer.setdefault((nid.hook, nid.layer), []).append(nid)
    sets = {nid.hook for nid in by_neuron}

    def build(tmp: Path) -> None:
        for (hook, layer), nids in sorted(by_layer.items()):
            name = source_set if len(sets) == 1 else f"{source_set}-{_slug(hook)}"
            source_id = f"{layer}-{name}"
            folder = tmp / model_id / source_id
            features, activations = [], []
            for nid in nids:
                exs = by_neuron[nid]
                features.append(_np_feature(con, nid, model_id, source_id, exs))
                for i, e in enumerate(exs):
                    assert e.context is not None
                    peak = e.peak_index
                    activations.append({
                        "id": f"{model_id}@{source_id}:{nid.neuron}:{i}",
                        "tokens": list(e.context.token), "index": str(nid.neuron), "layer": source_id,
                        "modelId": model_id, "maxValue": max(e.activations), "maxValueTokenIndex":
                            e.activations.index(max(e.activations)), "minValue": min(e.activations),
                        "values": e.activations, "creatorId": "", "dataSource": corpus,
                        "dataIndex": _id(e, paths)["id"], "qualifyingTokenIndex": peak,
                        "binMin": e.band_lo if e.set == "band" else None,
                        "binMax": e.band_hi if e.set == "band" else None,
                        "binContains": None,
                    })
            for kind, rows in (("features", features), ("activations", activations)):
                (folder / kind).mkdir(parents=True, exist_ok=True)
                body = "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in rows)
                (folder / kind / "batch-0.jsonl.gz").write_bytes(gzip.compress(body.encode(), compresslevel=5))
            (folder / "source.jsonl").write_text(json.dumps({
                "modelId": model_id, "setName": name, "id": source_id, "dataset": corpus, "visibility": "PUBLIC",
                "hookName": f"blocks.{layer}.{split_sae(hook)[0]}"}) + "\n")  # an SAE's: the hook it reads

    publish_dir(out, build)
    return len(by_neuron)


def _np_feature(con: duckdb.DuckDBPyConnection, nid: NeuronId, model_id: str, source_id: str,
                exs: list[Example]) -> dict:
    frac = con.execute("SELECT frac_active, max FROM neurons WHERE hook = ? AND layer = ? AND neuron = ?",
                       [nid.hook, nid.layer, nid.neuron]).fetchone()
    hist = run_named(con, "histogram", {"hook": nid.hook, "layer": str(nid.layer),
                                        "neuron": str(nid.neuron)}).to_pylist() if has_tables(con, "histograms") else []
    pos, neg = [], []
    if has_tables(con, "logit_lens"):
        rows = run_named(con, "logit-lens", {"hook": nid.hook, "layer": str(nid.layer), "neuron": str(nid.neuron),
                                             "sign": "both", "k": "10"}).to_pylist()
        pos = [r for r in rows if r["sign"] == "boost"]
        neg = [r for r in rows if r["sign"] == "suppress"]
    return {
        "modelId": model_id, "layer": source_id, "index": str(nid.neuron), "creatorId": "",
        "maxActApprox": _finite(frac[1]) or 0.0, "hookName": f"blocks.{nid.layer}.{nid.hook}",
        "frac_nonzero": _finite(frac[0]) or 0.0,
        "pos_str": [r["token"] for r in pos], "pos_values": [float(r["weight"]) for r in pos],
        "neg_str": [r["token"] for r in neg], "neg_values": [float(r["weight"]) for r in neg],
        "freq_hist_data_bar_heights": [int(r["count"]) for r in hist],
        "freq_hist_data_bar_values": [(max(r["lo"], -1e30) + min(r["hi"], 1e30)) / 2 for r in hist],
    }


def _corpus_source(con: duckdb.DuckDBPyConnection) -> str | None:
    if not has_tables(con, "docs"):
        return None
    row = con.execute("SELECT any_value(source) FROM docs").fetchone()
    return row[0] if row else None


def _slug(hook: str) -> str:
    return hook.replace(".", "-").replace("_", "-")


def publish_dir(out: Path, build: Callable[[Path], None]) -> None:
    """Build a directory beside `out` and move it into place whole: never a half-written export."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not (out / ".mine-export").exists():
        raise UserError(f"--out {out}: a non-empty directory that `mine export` did not write; choose a new path")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        build(tmp)
        (tmp / ".mine-export").write_text("written by mine export\n")
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------- entry points


def export(store: str | Path, fmt: str, out: Path, nids: Sequence[NeuronId] | None = None,
           counts: ExampleCounts = ExampleCounts(), selection: dict | None = None,
           model_id: str | None = None, source_set: str | None = None, heads: int = 0,
           replayer: Replayer | None = None, actors: int = 0, address: str | None = None) -> str:
    """Run one export; returns a one-line summary. `selection` holds select_neurons' keyword arguments.
    With `actors` (or `address`) the replay runs on that many Ray actors, the contexts split among them."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    root = local_root(store)
    con = connect(store)
    try:
        from .viewer.diffview import is_diff_store

        if is_diff_store(con):
            return _export_diff(root, con, store, fmt, out, nids, selection or {})
        require_single_model(con, store)
        nids = list(nids) if nids else select_neurons(con, **(selection or {}))
        if replayer is None and (actors or address):
            from .replay import RayReplayer

            replayer = RayReplayer(root, actors or 1, address)
        replayer = replayer or Replayer(root)
        by_neuron = collect(root, con, nids, counts, replayer)
        n_examples = sum(len(v) for v in by_neuron.values())
        if fmt in ("jsonl", "parquet"):
            write_rows(records(con, by_neuron), fmt, out)
            return f"wrote {n_examples} examples of {len(nids)} neurons to {out}"
        if fmt == "openai":
            write_openai(con, by_neuron, out)
            return f"wrote {len(nids)} NeuronRecord files ({n_examples} examples) under {out}/neurons"
        if fmt == "neuronpedia":
            model_id = model_id or _model_slug(replayer.spec.model.id)
            write_neuronpedia(con, by_neuron, out, model_id, source_set or "mine")
            return f"wrote {len(nids)} features and {n_examples} activations under {out}/{model_id}"
        from .viewer.site import write_site

        n_heads = write_site(root, con, by_neuron, out, replayer, heads)
        return (f"wrote a viewer of {len(nids)} neurons and {n_heads} heads ({n_examples} examples) to "
                f"{out}/index.html")
    finally:
        con.close()
        if replayer is not None and hasattr(replayer, "close"):
            replayer.close()


def _export_diff(root: Path, con: duckdb.DuckDBPyConnection, store: str | Path, fmt: str, out: Path,
                 nids: Sequence[NeuronId] | None, selection: dict) -> str:
    """A diff store's viewer: documents and tokens by B's gain, and the neurons chosen (default: the 20 whose
    activations changed most)."""
    from .viewer.diffview import pick_neurons, write_diff_site

    if fmt != "html":
        raise UserError(f"{store}: a diff store (models a and b) exports as --format html (its viewer); for rows, "
                        "use its named queries with --out (token-gains, neuron-diff-examples, doc-tokens)")
    if selection.get("query"):
        raise UserError("--query: not for a diff store; choose neurons with --neuron or --top N --by "
                        "mean_abs_diff|corr|overlap")
    by = selection.get("by", "kurtosis")
    explicit = [(n.layer, n.neuron) for n in nids or ()] or list(selection.get("explicit", ()))
    top = selection.get("top")
    if top is None:  # --top not given: the 20 whose activations changed most, unless neurons were named
        top = 0 if explicit else 20
    chosen = pick_neurons(con, selection.get("hook") or "mlp.hook_post", explicit, top,
                          "mean_abs_diff" if by == "kurtosis" else by, selection.get("layer", -1))
    return write_diff_site(root, con, chosen, out)


def _model_slug(model_id: str) -> str:
    return Path(model_id).name.replace(".gguf", "").lower() or "model"


def export_examples(store: str | Path, hook: str, neurons: Sequence[tuple[int, int]], k: int, fmt: str,
                    out: Path) -> int:
    """Top-k contexts of each neuron as JSONL/Parquet rows (the library form of `mine export --sets top`)."""
    root = local_root(store)
    con = connect(store)
    try:
        nids = select_neurons(con, hook, explicit=neurons)
        by_neuron = collect(root, con, nids, ExampleCounts(k=k, sets=("top",)))
        rows = records(con, by_neuron)
        write_rows(rows, fmt, out)
        return len(rows)
    finally:
        con.close()
