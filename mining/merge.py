"""Driver side: merge shard states in shard order and write the final tables.

Merging is a left fold in shard-index order, so the result does not depend on how many actors
mined the shards or in which order they finished (each shard's state depends only on its own
contexts). Top-k and counts are exact under any order; moments are float64 and the fixed order
makes them bit-identical from run to run.
"""

from __future__ import annotations

import re
import threading
from typing import Sequence

import numpy as np
import pyarrow as pa

from .engine import HookStats, histogram_bins
from .spec import JobSpec
from .store import Store

HOOK_NAME = re.compile(r"^blocks\.(\d+)\.(.+)$")


def split_hook(name: str) -> tuple[str, int]:
    """'blocks.5.mlp.hook_post' -> ('mlp.hook_post', 5)."""
    m = HOOK_NAME.match(name)
    if not m:
        return name, -1
    return m.group(2), int(m.group(1))


def merge_shards(store: Store, spec: JobSpec, shards: Sequence[int]) -> dict[str, HookStats]:
    """Left fold of the shards' states in index order. Shards a complete earlier merge already folded
    (Store.compact_states) come from that merge, in the same order, so a resumed run's tables are
    bit for bit the first run's; a shard mined again since (its token file was lost) adds nothing."""
    folded = store.merged_shards()
    merged: dict[str, HookStats] = {}
    if folded:
        merged = {hook: HookStats.from_state_dict(t) for hook, t in store.load_merged_states().items()}
    for index in sorted(set(shards) - folded):
        _fold_shard(store, merged, index)
    return merged


def _fold_shard(store: Store, merged: dict[str, HookStats], index: int) -> None:
    digest = store.read_marker(index)["files"].get(store.states_name(index))
    for hook, tensors in store.load_states(index, digest).items():
        state = HookStats.from_state_dict(tensors)
        merged[hook] = state if hook not in merged else merged[hook].merge_(state)  # the fold owns merged


class RunningFold:
    """merge_shards while the job runs: each shard is folded on a driver thread as soon as every shard
    before it is complete, so the driver's merge (0.5 s a shard of the demo's statistics, measured by
    scripts/bench_states.py) overlaps the mining instead of following it. The order, and so every bit of
    the result, is merge_shards'. A failed shard stops the prefix; `finish` folds the rest in index
    order, skipping it, as merge_shards does."""

    def __init__(self, store: Store, spec: JobSpec, done: Sequence[int]):
        self.store, self.spec = store, spec
        self.merged: dict[str, HookStats] = {}
        self.next = 0  # every shard below it is folded
        self.ready: set[int] = set(done)
        self.error: BaseException | None = None
        self._cond = threading.Condition()
        self._stop = False
        # shards folded by an earlier complete merge come from its file (merge_shards): nothing to overlap
        self.active = not store.merged_shards()
        self._thread = threading.Thread(target=self._run, name="state-fold", daemon=True) if self.active else None
        if self._thread:
            self._thread.start()

    def add(self, index: int) -> None:
        """A shard's files and marker are written."""
        with self._cond:
            self.ready.add(index)
            self._cond.notify()

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while self.next not in self.ready and not self._stop:
                        self._cond.wait()
                    if self._stop:  # finish() folds the rest on its own thread
                        return
                    index = self.next
                _fold_shard(self.store, self.merged, index)
                with self._cond:
                    self.next += 1
        except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread by finish()
            self.error = e

    def finish(self, complete: Sequence[int]) -> dict[str, HookStats]:
        """The merge of `complete` (every complete shard), once the last has been added."""
        if not self.active:
            return merge_shards(self.store, self.spec, complete)
        self.close()
        if self.error is not None:
            raise self.error
        for index in sorted(set(complete)):
            if index >= self.next:
                _fold_shard(self.store, self.merged, index)
        return self.merged

    def close(self) -> None:
        """Stop the thread (after the shard it is folding, if any)."""
        if self._thread:
            with self._cond:
                self._stop = True
                self._cond.notify()
            self._thread.join()


def final_tables(merged: dict[str, HookStats], spec: JobSpec) -> dict[str, pa.Table]:
    hooks = sorted(merged, key=lambda h: (split_hook(h)[1], split_hook(h)[0]))
    parts: dict[str, list[pa.Table]] = {}
    for hook in hooks:
        site, layer = split_hook(hook)
        st = merged[hook]
        for name, table in _hook_tables(st, site, layer, spec).items():
            parts.setdefault(name, []).append(table)
    return {name: pa.concat_tables(tables) for name, tables in parts.items()}


def _hook_tables(st: HookStats, site: str, layer: int, spec: JobSpec) -> dict[str, pa.Table]:
    if st.top is None:  # a diff job's per-head DLA (attn.hook_z), or the cross-correlation of models of other sizes
        from .diff import cross_match_table, head_dla_table

        if st.cross is not None:
            return {"neuron_match": cross_match_table(st, site, layer, spec)}
        return {"head_dla_diff": head_dla_table(st, layer)}
    out = {"top_examples": examples_table(*st.top.finalize(), site, layer)}
    if st.bottom is not None:
        out["bottom_examples"] = examples_table(*st.bottom.finalize(), site, layer)
    if st.contexts is not None:
        out["top_contexts"] = examples_table(*st.contexts.finalize(), site, layer)
    if st.pair is not None:
        from .diff import diff_hook_tables

        out.update(diff_hook_tables(st, site, layer))
    if st.moments is not None:
        m = {k: (v.cpu().numpy() if hasattr(v, "cpu") else np.asarray(v)) for k, v in st.moments.finalize().items()}
        n = len(m["mean"])
        out["neurons"] = pa.table({
            "hook": pa.array([site] * n), "layer": np.full(n, layer, np.int32), "neuron": np.arange(n, dtype=np.int32),
            "count": np.broadcast_to(np.asarray(m["count"], np.int64), (n,)).copy(),
            **{k: np.asarray(m[k], np.float64) for k in ("mean", "std", "skew", "kurtosis", "frac_active", "min", "max")},
        })
    if st.dla_top is not None:
        out["dla_examples"] = _dla_examples(st, site, layer)
        m = st.dla_moments.finalize()
        n = len(m["mean"])
        out["dla_neurons"] = pa.table({
            "hook": pa.array([site] * n), "layer": np.full(n, layer, np.int32), "neuron": np.arange(n, dtype=np.int32),
            "count": np.asarray(m["count"], np.int64), "mean_dla": m["mean"], "std_dla": m["std"],
            "frac_positive": m["frac_active"], "min_dla": m["min"], "max_dla": m["max"],
        })
    if st.gate_cases is not None:
        out["gate_cases"], out["gate_case_examples"] = _gate_tables(st.gate_cases.finalize(), site, layer)
    if st.samples is not None:
        m = st.moments.finalize()
        out["quantile_samples"] = _band_samples(st.samples.finalize(st.histogram.finalize().cpu().numpy(),
                                                                    m["min"], m["max"]), site, layer)
    if st.by_token is not None:
        tok, pos = st.by_token.finalize(), st.by_position.finalize()
        n = len(tok["explained"])
        grouped = st.by_token.count[:-1].sum().item() / max(tok["n"], 1)  # the last group pools the rare ids
        out["neuron_variance"] = pa.table({
            "hook": pa.array([site] * n), "layer": np.full(n, layer, np.int32), "neuron": np.arange(n, dtype=np.int32),
            "var_token": tok["explained"], "var_position": pos["explained"],
            "token_groups": np.full(n, tok["k"], np.int32), "token_coverage": np.full(n, grouped, np.float64),
        })
    if st.histogram is not None:
        counts = st.histogram.finalize().cpu().numpy()  # (N, bins)
        lo, hi = histogram_bins(spec).edges()
        neuron, bin_ = np.nonzero(counts)
        out["histograms"] = pa.table({
            "hook": pa.array([site] * len(neuron)), "layer": np.full(len(neuron), layer, np.int32),
            "neuron": neuron.astype(np.int32), "bin": bin_.astype(np.int32),
            "lo": lo[bin_], "hi": hi[bin_], "count": counts[neuron, bin_].astype(np.int64),
        })
    return out


def _gate_tables(g: dict, site: str, layer: int) -> tuple[pa.Table, pa.Table]:
    from .reducers.gate_cases import CASES

    count, mean = g["count"], g["mean"]  # (4, N)
    n = count.shape[1]
    total = count.sum(0)
    cases, examples = [], []
    for c, gate_sign, up_sign in CASES:
        cases.append(pa.table({
            "hook": pa.array([site] * n), "layer": np.full(n, layer, np.int32), "neuron": np.arange(n, dtype=np.int32),
            "gate_sign": pa.array([gate_sign] * n), "up_sign": pa.array([up_sign] * n),
            "count": count[c].astype(np.int64), "frac": count[c] / np.maximum(total, 1),
            "mean": np.where(count[c] > 0, mean[c], np.nan),
        }))
        t = examples_table(*g["top"][c], site, layer)
        examples.append(t.add_column(3, "gate_sign", pa.array([gate_sign] * t.num_rows))
                        .add_column(4, "up_sign", pa.array([up_sign] * t.num_rows)))
    sort = [("neuron", "ascending"), ("gate_sign", "descending"), ("up_sign", "descending")]
    return pa.concat_tables(cases).sort_by(sort), pa.concat_tables(examples).sort_by(sort + [("rank", "ascending")])


def _band_samples(kinds: dict, site: str, layer: int) -> pa.Table:
    """One row per sampled example: kind ('all' | 'firing' | 'frac_max'), band ('90-95'), rank."""
    parts = []
    for kind, r in kinds.items():
        toks = r["toks"]  # (N, B, m)
        neuron, band, rank = np.nonzero(toks >= 0)
        labels = np.asarray(r["labels"], dtype=object)
        parts.append(pa.table({
            "hook": pa.array([site] * len(neuron)), "layer": np.full(len(neuron), layer, np.int32),
            "neuron": neuron.astype(np.int32), "kind": pa.array([kind] * len(neuron)),
            "band": pa.array(labels[band].tolist(), pa.string()), "band_index": band.astype(np.int32),
            "rank": (rank + 1).astype(np.int32), "value": r["values"][neuron, band, rank].astype(np.float32),
            "tok": toks[neuron, band, rank].astype(np.int64),
            "exact": rank < r["n_exact"][neuron, band],
            "band_lo": r["lo"][neuron, band].astype(np.float64), "band_hi": r["hi"][neuron, band].astype(np.float64),
        }))
    return pa.concat_tables(parts)


def _dla_examples(st: HookStats, site: str, layer: int) -> pa.Table:
    parts = []
    for sign, reducer in (("positive", st.dla_top), ("negative", st.dla_bottom)):
        t = examples_table(*reducer.finalize(), site, layer)
        parts.append(pa.table({"hook": t["hook"], "layer": t["layer"], "neuron": t["neuron"],
                               "sign": pa.array([sign] * t.num_rows),
                               "rank": t["rank"], "dla": t["value"], "tok": t["tok"]}))
    return pa.concat_tables(parts).sort_by([("neuron", "ascending"), ("sign", "descending"), ("rank", "ascending")])


def examples_table(values, toks, site: str, layer: int) -> pa.Table:
    v = values.cpu().numpy() if hasattr(values, "cpu") else np.asarray(values)  # (K, N)
    t = toks.cpu().numpy() if hasattr(toks, "cpu") else np.asarray(toks)
    neuron, rank = np.nonzero(t.T >= 0)  # row-major over (neuron, rank): rows sorted by neuron, then rank
    return pa.table({
        "hook": pa.array([site] * len(neuron)), "layer": np.full(len(neuron), layer, np.int32),
        "neuron": neuron.astype(np.int32), "rank": (rank + 1).astype(np.int32),
        "value": v[rank, neuron].astype(np.float32), "tok": t[rank, neuron].astype(np.int64),
    })


def manifest_table(markers: list[dict]) -> pa.Table:
    import json

    markers = sorted(markers, key=lambda m: m["shard"])
    return pa.table({
        "shard": pa.array([m["shard"] for m in markers], pa.int32()),
        "status": [m["status"] for m in markers],
        "tokens": pa.array([m["tokens"] for m in markers], pa.int64()),
        "first_tok": pa.array([m.get("first_tok", -1) for m in markers], pa.int64()),
        "contexts": pa.array([m.get("contexts", 0) for m in markers], pa.int64()),
        "rows": pa.array([m["rows"]["tokens"] for m in markers], pa.int64()),
        "seconds": pa.array([m.get("seconds", 0.0) for m in markers], pa.float64()),
        "attempts": pa.array([m.get("attempts", 1) for m in markers], pa.int32()),
        "error": pa.array([m.get("error") for m in markers], pa.string()),
        "checksum": [_combined(m["files"]) for m in markers],
        "files": [json.dumps(m["files"], sort_keys=True) for m in markers],
    })


def _combined(files: dict[str, str]) -> str:
    import hashlib

    h = hashlib.sha256()
    for name in sorted(files):
        h.update(f"{name}={files[name]};".encode())
    return h.hexdigest()


def merge_into_tables(store: Store, spec: JobSpec, n_shards: int,
                      fold: RunningFold | None = None) -> tuple[dict[str, int], list[dict]]:
    """Merge every complete shard and write the final tables (the manifest comes last, separately).

    Returns the row counts and the markers of failed shards (their tokens are left out of every
    table; the manifest lists them with their reason, and `mine run --resume` retries them)."""
    markers = [store.read_marker(i) for i in range(n_shards)]
    complete = [m["shard"] for m in markers if m["status"] == "complete"]
    failed = [m for m in markers if m["status"] != "complete"]
    merged = (fold.finish(complete) if fold else merge_shards(store, spec, complete)) if complete else {}
    tables = final_tables(merged, spec)
    for name, table in tables.items():
        store.write_table(name, table)
    if complete and not failed:  # a failed shard keeps every state, so that --resume folds it in shard order
        store.compact_states({hook: st.state_dict() for hook, st in merged.items()}, complete)
    return {name: t.num_rows for name, t in tables.items()}, failed


def write_manifest(store: Store, n_shards: int) -> None:
    """Written last: its presence is what marks the store complete."""
    store.seal(manifest_table([store.read_marker(i) for i in range(n_shards)]))
