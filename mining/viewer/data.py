"""What the viewer's pages show, read from a store's DuckDB views (named queries where one fits).

Tables only some jobs write (quantile_samples, logit_lens, dla_*, heads, neuron_coherence, ...)
are read when present; a page simply has no such section otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import duckdb
import yaml

from ..examples import Example, NeuronId
from ..query import has_tables, run_named

METRICS = ("mean", "std", "skew", "kurtosis", "frac_active", "min", "max")


def store_title(con: duckdb.DuckDBPyConnection, root) -> dict[str, Any]:
    spec = yaml.safe_load((root / "job.yaml").read_text())
    tokens = con.execute("SELECT count(*) FROM tokens").fetchone()[0] if has_tables(con, "tokens") else None
    model = spec.get("model") or (spec.get("models") or {}).get("a") or {}
    return {"name": spec.get("name", root.name), "model": model.get("id") if isinstance(model, dict) else model,
            "corpus": (spec.get("corpus") or {}).get("source"), "tokens": tokens}


def context_length(root) -> int | None:
    """The job's corpus.context_length: an attention pattern's keys per head (feature head * it + key)."""
    spec = yaml.safe_load((root / "job.yaml").read_text())
    return (spec.get("corpus") or {}).get("context_length")


def index_rows(con: duckdb.DuckDBPyConnection, nids: Sequence[NeuronId] | None = None, *, hook: str = "mlp.hook_post",
               layer: int = -1, by: str = "kurtosis", order: str = "desc", limit: int = 500) -> list[dict]:
    """Neuron rows for the index: the given neurons, or the top `limit` of `hook` by `by`. Each row has the
    neurons-table metrics, the peak token of its top context and, when mined, mean DLA and coherence."""
    if nids is None:
        rows = run_named(con, "top-neurons", {"hook": hook, "layer": str(layer), "by": by, "order": order,
                                               "limit": str(limit)}).to_pylist()
        keys = [(r["hook"], r["layer"], r["neuron"]) for r in rows]
    else:
        keys = [(n.hook, n.layer, n.neuron) for n in nids]
    if not keys:
        return []
    con.execute("CREATE OR REPLACE TEMP TABLE _picked AS SELECT * FROM (SELECT unnest($h) AS hook, "
                "unnest($l) AS layer, unnest($n) AS neuron, unnest($o) AS ord)",
                {"h": [k[0] for k in keys], "l": [k[1] for k in keys], "n": [k[2] for k in keys],
                 "o": list(range(len(keys)))})
    extra_cols, joins = [], []
    if has_tables(con, "top_contexts", "tokens"):
        extra_cols.append("t.token AS top_token")
        joins.append("LEFT JOIN top_contexts AS tc ON tc.hook = p.hook AND tc.layer = p.layer AND tc.neuron = p.neuron "
                     "AND tc.rank = 1 LEFT JOIN tokens AS t ON t.tok = tc.tok")
    if has_tables(con, "dla_neurons"):
        extra_cols.append("d.mean_dla")
        joins.append("LEFT JOIN dla_neurons AS d ON d.hook = p.hook AND d.layer = p.layer AND d.neuron = p.neuron")
    if has_tables(con, "neuron_coherence"):
        extra_cols.append("c.coherence")
        joins.append("LEFT JOIN neuron_coherence AS c ON c.hook = p.hook AND c.layer = p.layer AND c.neuron = p.neuron")
    sql = (f"SELECT n.hook, n.layer, n.neuron, {', '.join('n.' + m for m in METRICS)}"
           f"{''.join(', ' + c for c in extra_cols)} FROM _picked AS p "
           "JOIN neurons AS n ON n.hook = p.hook AND n.layer = p.layer AND n.neuron = p.neuron "
           f"{' '.join(joins)} ORDER BY p.ord")
    try:
        return con.sql(sql).to_arrow_table().to_pylist()
    finally:
        con.execute("DROP TABLE IF EXISTS _picked")


def head_rows(con: duckdb.DuckDBPyConnection) -> list[dict]:
    if not has_tables(con, "heads"):
        return []
    rows = con.sql("SELECT * FROM heads ORDER BY layer, head").to_arrow_table().to_pylist()
    if has_tables(con, "head_ablation"):
        deltas = {(r[0], r[1], r[2]): r[3] for r in con.execute(
            "SELECT layer, head, kind, loss_delta FROM head_ablation").fetchall()}
        for r in rows:
            for kind in ("zero", "mean"):
                r[f"{kind}_ablation"] = deltas.get((r["layer"], r["head"], kind))
    return rows


def top_heads(con: duckdb.DuckDBPyConnection, n: int) -> list[tuple[int, int]]:
    if n <= 0 or not has_tables(con, "heads"):
        return []
    return [(r["layer"], r["head"]) for r in run_named(con, "heads", {"order_by": "induction",
                                                                       "limit": str(n)}).to_pylist()]


@dataclass
class NeuronPage:
    nid: NeuronId
    stats: dict[str, Any]
    examples: list[Example]
    histogram: list[dict] = field(default_factory=list)
    quantiles: list[dict] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # dla / coherence / variance rows
    logit_lens: list[dict] = field(default_factory=list)
    dla_examples: dict[str, list[dict]] = field(default_factory=dict)


def neuron_page(con: duckdb.DuckDBPyConnection, nid: NeuronId, examples: list[Example],
                n_ctx: int | None = None) -> NeuronPage:
    """n_ctx: the job's context length, which names an attention pattern's feature by its head and key."""
    p = {"hook": nid.hook, "layer": str(nid.layer), "neuron": str(nid.neuron)}
    row = con.sql("SELECT * FROM neurons WHERE hook = ? AND layer = ? AND neuron = ?",
                  params=[nid.hook, nid.layer, nid.neuron]).to_arrow_table().to_pylist()
    page = NeuronPage(nid, row[0] if row else {}, examples)
    if nid.hook == "attn.hook_pattern" and n_ctx:
        page.extra.update({"head": nid.neuron // n_ctx, "key": nid.neuron % n_ctx})
    if has_tables(con, "histograms"):
        page.histogram = run_named(con, "histogram", p).to_pylist()
        page.quantiles = run_named(con, "quantiles", p).to_pylist()
    key = [nid.layer, nid.neuron]
    if has_tables(con, "dla_neurons"):  # MLP neurons, and SAE latents whose decoder writes the stream
        page.extra.update(_one(con, "SELECT mean_dla, std_dla, frac_positive, min_dla, max_dla FROM dla_neurons "
                                    "WHERE hook = ? AND layer = ? AND neuron = ?", [nid.hook, *key]))
    for table_name, cols in (("neuron_coherence", "coherence"), ("neuron_variance", "var_token, var_position")):
        if has_tables(con, table_name):
            page.extra.update(_one(con, f"SELECT {cols} FROM {table_name} WHERE hook = ? AND layer = ? AND neuron = ?",
                                   [nid.hook, *key]))
    if has_tables(con, "logit_lens"):  # MLP neurons' rows, and SAE latents' where their decoder writes the stream
        page.logit_lens = run_named(con, "logit-lens", {**p, "sign": "both", "k": "10"}).to_pylist()
    if has_tables(con, "dla_examples"):
        for sign in ("positive", "negative"):
            page.dla_examples[sign] = run_named(con, "dla-examples", {**p, "sign": sign, "k": "5"}).to_pylist()
    return page


def _one(con: duckdb.DuckDBPyConnection, sql: str, params: list) -> dict[str, Any]:
    rows = con.sql(sql, params=params).to_arrow_table().to_pylist()
    return rows[0] if rows else {}


def head_scores(con: duckdb.DuckDBPyConnection, layer: int, head: int) -> dict[str, Any]:
    for r in head_rows(con):
        if r["layer"] == layer and r["head"] == head:
            return r
    return {}
