"""Example sets of a neuron: which contexts to show (from the store), with every token's activation (replay).

Sets: `top` (the k contexts where the neuron peaks highest), `bottom` (its k most negative tokens),
`band` (a few samples from each quantile band, if the job kept `quantile_samples`) and `random`
(contexts drawn uniformly with a fixed seed, the same for every neuron of one export). Every
example carries a stable id: the document and the character span of its context in it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import duckdb

from .query import has_tables, run_named
from .replay import Context, Replayer, load_contexts

SETS = ("top", "bottom", "band", "random")


@dataclass(frozen=True)
class NeuronId:
    hook: str
    layer: int
    neuron: int

    def __str__(self) -> str:
        return f"{self.hook} {self.layer}:{self.neuron}"


@dataclass
class Example:
    set: str
    rank: int
    ctx: int
    value: float | None = None  # the mined activation at the peak token (None for random contexts)
    tok: int | None = None  # the peak token's global index
    band: str | None = None
    band_lo: float | None = None
    band_hi: float | None = None
    context: Context | None = None
    activations: list[float] = field(default_factory=list)

    @property
    def peak_index(self) -> int:
        if self.tok is not None and self.context is not None:
            return self.context.tok.index(self.tok)
        return max(range(len(self.activations)), key=self.activations.__getitem__) if self.activations else 0


def pick_examples(con: duckdb.DuckDBPyConnection, nid: NeuronId, k: int, per_band: int,
                  random_ctxs: Sequence[int]) -> list[Example]:
    """The examples of one neuron, without their contexts (see `attach`)."""
    params = {"hook": nid.hook, "layer": str(nid.layer), "neuron": str(nid.neuron)}
    out: list[Example] = []
    if k > 0 and has_tables(con, "top_contexts", "bottom_examples"):
        for r in run_named(con, "neuron-examples", {**params, "k": str(k)}).to_pylist():
            out.append(Example(r["set"], r["rank"], r["ctx"], r["value"], r["tok"]))
    if per_band > 0 and has_tables(con, "quantile_samples"):
        for r in run_named(con, "band-examples", {**params, "per_band": str(per_band)}).to_pylist():
            out.append(Example("band", r["rank"], r["ctx"], r["value"], r["tok"], r["band"], r["band_lo"], r["band_hi"]))
    out += [Example("random", i + 1, ctx) for i, ctx in enumerate(random_ctxs)]
    return out


def random_contexts(con: duckdb.DuckDBPyConnection, n: int, seed: int = 0) -> list[int]:
    if n <= 0:
        return []
    return [r["ctx"] for r in run_named(con, "random-contexts", {"n": str(n), "seed": str(seed)}).to_pylist()]


def attach(root: Path, replayer: Replayer, by_neuron: dict[NeuronId, list[Example]]) -> None:
    """Fill each example's context and per-token activations: one replay per (hook site, context),
    keeping only the exported neurons' columns."""
    contexts = load_contexts(root, {e.ctx for exs in by_neuron.values() for e in exs})
    for site in sorted({nid.hook for nid in by_neuron}):
        nids = [nid for nid in by_neuron if nid.hook == site]
        columns: dict[int, list[int]] = {}
        for nid in nids:
            columns.setdefault(nid.layer, [])
            if nid.neuron not in columns[nid.layer]:
                columns[nid.layer].append(nid.neuron)
        needed = sorted({e.ctx for nid in nids for e in by_neuron[nid]})
        acts = replayer.activations(site, sorted(columns), {c: contexts[c] for c in needed}, columns)
        for nid in nids:
            col = columns[nid.layer].index(nid.neuron)
            for e in by_neuron[nid]:
                e.context = contexts[e.ctx]
                e.activations = [round(float(v), 6) for v in acts[(nid.layer, e.ctx)][:, col]]


def example_record(nid: NeuronId, e: Example, doc_paths: dict[int, str]) -> dict:
    """One example as a flat row: the JSONL/Parquet example-set schema."""
    c = e.context
    assert c is not None, "attach() first"
    start, end = c.span
    peak = e.peak_index
    return {
        "id": f"{c.doc_id}:{start}-{end}",
        "hook": nid.hook, "layer": nid.layer, "neuron": nid.neuron,
        "set": e.set, "rank": e.rank, "band": e.band, "band_lo": e.band_lo, "band_hi": e.band_hi,
        "value": e.value if e.value is not None else e.activations[peak],
        "doc_id": c.doc_id, "doc_path": doc_paths.get(c.doc_id), "char_start": start, "char_end": end,
        "ctx": c.ctx, "tok": c.tok[peak], "peak_index": peak,
        "peak_char_start": c.char_start[peak], "peak_char_end": c.char_end[peak],
        "tokens": list(c.token), "activations": e.activations,
    }

