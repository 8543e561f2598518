"""The store side of `mine bench`: bytes per token, peak memory as tokens grow, DuckDB query latency.

bytes   A real store (mining + DLA + token table, the demo's statistics) written through Store and
        merge.finalize exactly as a run writes it, divided by its tokens; the per-neuron tables are
        (nearly) constant in size, and so are the reducer states once the merge folds the shards'
        states into one file; the token table and docs grow linearly and the shard markers with the
        shard count, which gives the extrapolation to 1M tokens.
memory  Fresh processes (`python -m mining.bench_store memory-child ...`) load the model, then mine
        N and 10N tokens the way an actor does (ShardMiner.mine, Store.write_shard); each reports
        its RSS after loading and its peak RSS while mining (VmHWM reset after the load, so the
        load's transient peak does not hide the mining's).
duckdb  A synthetic store at full size (10M token rows, SmolLM2's 46,080 neurons, histograms,
        top examples; layouts as the miner writes them) queried through mining.query.connect and
        run_named, the path `mine query` takes.
"""

from __future__ import annotations

import copy
import gc
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from .errors import UserError

MILLION = 1_000_000
QUERIES = ("top-activations", "quantiles", "neuron-summary")
SYNTHETIC_VERSION = 2  # 2: WordPiece-like spans, docs with their text
SYNTHETIC_CONTEXT = 128
SYNTHETIC_SHARD_TOKENS = 65536


def _log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- bytes per token


def store_bytes(work, scratch: str) -> dict[str, Any]:
    from .engine import ShardMiner
    from .runner import provenance
    from .spec import CPU_SHARD_TOKENS, GPU_SHARD_TOKENS
    from .store import Store

    spec = work.spec("token_table")
    results = work.kept
    if results is None:
        _log("mining the store for the bytes part")
        miner = ShardMiner(spec, work.loaded)
        results = [miner.mine(s) for s in work.shards]
    root = Path(scratch) / "store"
    store = Store(root)
    store.begin(spec.to_dict(), provenance(spec, work.loaded.tokenizer, work.shards), resume=False)
    store.write_docs(work.docs)
    writes = []
    for shard, result in zip(work.shards, results):
        start = time.perf_counter()
        store.write_shard(result, {"first_tok": shard.first_tok, "contexts": len(shard.ids)})
        writes.append(time.perf_counter() - start)
    fold = _fold_seconds(store)
    _finish(store, spec, len(work.shards))
    sizes, tables = _sizes(root)
    shutil.rmtree(root)

    n, n_shards = work.n_tokens, len(work.shards)
    total = sum(sizes.values())
    shards_1m = math.ceil(MILLION / CPU_SHARD_TOKENS)
    at_1m = (sizes["neuron_tables"] + sizes["states"] + sizes["other"] + (sizes["tokens"] + sizes["docs"]) * MILLION / n
             + sizes["shard_markers"] / n_shards * shards_1m)
    dense = work.n_neurons * 2
    return {
        "tokens": n, "shards": n_shards, "stats": "top/bottom-k, contexts, histograms, moments, dla, token table",
        "bytes": total, "bytes_by_kind": sizes, "neuron_table_bytes": tables,
        "bytes_per_token": total / n, "dense_fp16_bytes_per_token": dense, "ratio_dense_to_store": dense / (total / n),
        "extrapolated_1m_bytes": at_1m, "dense_fp16_1m_bytes": dense * MILLION,
        "ratio_dense_to_store_1m": dense * MILLION / at_1m, "shards_at_1m": shards_1m,
        "per_shard": {"write_s": min(writes), "fold_s": fold,
                      "fold_keeps_up_tokens_per_s": {str(t): t / fold for t in (CPU_SHARD_TOKENS, GPU_SHARD_TOKENS)}},
    }


def _fold_seconds(store, repeats: int = 3) -> float:
    """The driver's fold of one shard into a running merge (merge._fold_shard: read, checksum, decode,
    restore, add), best of `repeats`: shard 0 folded again into the merge it started. This serial step
    bounds how many workers one driver keeps up with (BENCHMARKS.md, the scaling section)."""
    from . import merge

    merged: dict = {}
    merge._fold_shard(store, merged, 0)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        merge._fold_shard(store, merged, 0)
        best = min(best, time.perf_counter() - start)
    return best


def _finish(store, spec, n_shards: int) -> None:
    """Merge the shard states into the final tables and one merged states file, manifest last, as
    `mine run` does."""
    from . import merge

    merge.merge_into_tables(store, spec, n_shards)
    merge.write_manifest(store, n_shards)


def _sizes(root: Path) -> tuple[dict[str, int], dict[str, int]]:
    """Bytes by kind (how they grow), and per top-level table."""
    sizes = {"neuron_tables": 0, "states": 0, "tokens": 0, "docs": 0, "shard_markers": 0, "other": 0}
    tables: dict[str, int] = {}
    for f in root.rglob("*"):
        if not f.is_file():
            continue
        top, size = f.relative_to(root).parts[0], f.stat().st_size
        if top == "tokens":
            sizes["tokens"] += size
        elif top == "_shards":  # the merged states (one file, constant) and a small marker per shard
            sizes["states" if f.name.startswith("merged.") else "shard_markers"] += size
        elif top == "docs.parquet":
            sizes["docs"] += size
        elif top.endswith(".parquet") and top != "manifest.parquet":
            sizes["neuron_tables"] += size
            tables[top.removesuffix(".parquet")] = size
        else:
            sizes["other"] += size
    return sizes, tables


def store_lines(s: dict[str, Any]) -> list[str]:
    k = s["bytes_by_kind"]
    mb = 1e6
    return [
        f"store size ({s['stats']})",
        (f"  at {s['tokens']:,} tokens: {s['bytes'] / mb:,.1f} MB = {s['bytes_per_token']:,.0f} B/token "
         f"(per-neuron tables {k['neuron_tables'] / mb:,.1f} MB, tokens {k['tokens'] / mb:,.2f} MB, "
         f"docs {k['docs'] / mb:,.2f} MB, merged reducer states {k['states'] / mb:,.1f} MB)"),
        (f"  dense float16 cache of every neuron: {s['dense_fp16_bytes_per_token']:,} B/token "
         f"({s['ratio_dense_to_store']:,.1f}x the store)"),
        (f"  extrapolated to 1M tokens ({s['shards_at_1m']} shards): store {s['extrapolated_1m_bytes'] / mb:,.0f} MB, "
         f"dense cache {s['dense_fp16_1m_bytes'] / 1e9:,.1f} GB: {s['ratio_dense_to_store_1m']:,.0f}x smaller"),
        "  (per-neuron tables and merged states counted as constant; histograms gain a few non-empty bins as "
        "tokens grow)",
        *_per_shard_lines(s["per_shard"]),
    ]


def _per_shard_lines(p: dict[str, Any]) -> list[str]:
    keeps = ", ".join(f"{rate / 1e3:,.0f}k tok/s at {int(t):,}-token shards"
                      for t, rate in p["fold_keeps_up_tokens_per_s"].items())
    return [f"  per shard: the actor writes its files in {p['write_s']:.2f} s; the driver folds its states in "
            f"{p['fold_s']:.2f} s, so one driver keeps up with {keeps}"]


# ---------------------------------------------------------------- peak memory, N vs 10N


def memory_growth(job: dict[str, Any], n: int, threads: int, repeats: int = 1) -> dict[str, Any]:
    """Peak RSS mining n and 10n tokens, each size in `repeats` fresh processes (sizes alternating); a size's
    peak is the largest of its runs."""
    root = str(Path(__file__).resolve().parent.parent)  # the child imports this very checkout of `mining`
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
           "TOKENIZERS_PARALLELISM": "false"}
    runs = []
    for tokens in [n, 10 * n] * repeats:
        j = copy.deepcopy(job)
        j["corpus"]["max_tokens"] = tokens
        _log(f"memory: mining {tokens:,} tokens in a fresh process")
        proc = subprocess.run([sys.executable, "-m", "mining.bench_store", "memory-child", json.dumps(j), str(threads)],
                              capture_output=True, text=True, env=env, check=False)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode or not lines:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(f"memory part: the process mining {tokens:,} tokens failed: {last}")
        runs.append(json.loads(lines[-1]))
    small, big = (max((r for r in runs[i::2]), key=lambda r: r["peak_mb"]) for i in (0, 1))
    stats = [k for k, v in job["stats"].items() if v is True] + [f"dense {h}" for h in job.get("dense", {}).get("hooks", [])]
    return {"stats": ", ".join(stats), "runs": runs, "peak_mb": [small["peak_mb"], big["peak_mb"]],
            "peak_growth_pct": 100 * (big["peak_mb"] - small["peak_mb"]) / small["peak_mb"],
            "mining_growth_mb": big["mining_mb"] - small["mining_mb"]}


def memory_child(job_json: str, threads: int) -> dict[str, Any]:
    import torch

    from .engine import ShardMiner
    from .models import load_model, quiet_transformers
    from .runner import plan
    from .spec import spec_from_dict
    from .store import Store

    torch.set_num_threads(threads)
    quiet_transformers()
    spec = spec_from_dict(json.loads(job_json))
    loaded = load_model(spec.model)
    shards, _ = plan(spec, loaded.tokenizer)
    miner = ShardMiner(spec, loaded)
    with tempfile.TemporaryDirectory(prefix="mining-bench-mem-") as tmp:
        store = Store(Path(tmp) / "store")
        store.begin(spec.to_dict(), {}, resume=False)
        gc.collect()
        after_load = _status_kb("VmRSS")
        reset = _reset_peak()
        peaks = {"mine": 0, "write": 0}  # VmHWM, reset before each step: which of the two holds the peak
        start = time.perf_counter()
        for shard in shards:  # as an actor: mine, write the shard's files, keep nothing
            result = miner.mine(shard)
            peaks["mine"] = max(peaks["mine"], _status_kb("VmHWM"))
            _reset_peak()
            store.write_shard(result, {"first_tok": shard.first_tok, "contexts": len(shard.ids)})
            miner.raise_floors(result)
            del result
            peaks["write"] = max(peaks["write"], _status_kb("VmHWM"))
            _reset_peak()
        seconds = time.perf_counter() - start
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = max(peaks.values()) if reset else maxrss
    return {"tokens": sum(s.n_tokens for s in shards), "shards": len(shards), "rss_after_load_mb": after_load / 1024,
            "peak_mb": peak / 1024, "mining_mb": (peak - after_load) / 1024, "peak_is_mining_only": reset,
            "peak_mine_mb": peaks["mine"] / 1024, "peak_write_mb": peaks["write"] / 1024, "seconds": seconds,
            "ru_maxrss_mb": maxrss / 1024}


def _status_kb(key: str) -> int:
    m = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(m.group(1)) if m else 0


def _reset_peak() -> bool:
    """Reset VmHWM (Linux >= 4.0), so the peak read later is the mining's, not the model load's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kb("VmHWM") > 0
    except OSError:
        return False


def memory_lines(m: dict[str, Any]) -> list[str]:
    out = [f"peak memory of mining in a fresh process ({m['stats']})"]
    for r in m["runs"]:
        out.append(f"  {r['tokens']:>7,} tokens ({r['shards']} shard(s)): peak {r['peak_mb']:,.0f} MB "
                   f"(after load {r['rss_after_load_mb']:,.0f} MB, +{r['mining_mb']:,.0f} MB; peak while mining "
                   f"{r['peak_mine_mb']:,.0f} MB, while writing the shard {r['peak_write_mb']:,.0f} MB)")
    out.append(f"  growth from N to 10N: {m['peak_growth_pct']:+.1f}% peak ({m['mining_growth_mb']:+,.0f} MB), "
               f"each size's largest peak of its {len(m['runs']) // 2} run(s)")
    return out


# ---------------------------------------------------------------- DuckDB latency on a synthetic store


def duckdb_latency(folder: str | Path, n_tokens: int, repeats: int, n_layers: int = 30, n_neurons: int = 1536,
                   k: int = 32) -> dict[str, Any]:
    from .query import connect, run_named

    start = time.perf_counter()
    store, reused = synthetic_store(Path(folder), n_tokens, n_layers, n_neurons, k)
    generated = time.perf_counter() - start
    start = time.perf_counter()
    con = connect(store)
    connect_ms = 1000 * (time.perf_counter() - start)
    times: dict[str, list[float]] = {q: [] for q in QUERIES}
    rows: dict[str, int] = {}
    layer = n_layers // 2
    try:
        for r in range(repeats):  # a different neuron each round, the queries interleaved
            params = {"layer": str(layer), "neuron": str((17 + 389 * r) % n_neurons)}
            for name in QUERIES:
                t = time.perf_counter()
                rows[name] = run_named(con, name, params).num_rows
                times[name].append(1000 * (time.perf_counter() - t))
    finally:
        con.close()
    size = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
    return {
        "store": str(store), "reused": reused, "prepare_s": generated, "token_rows": n_tokens,
        "neurons": n_layers * n_neurons, "store_bytes": size, "connect_ms": connect_ms,
        "queries": {q: {"median_ms": statistics.median(t), "first_ms": t[0], "min_ms": min(t), "runs": len(t),
                        "rows": rows[q]} for q, t in times.items()},
    }


def duckdb_lines(d: dict[str, Any]) -> list[str]:
    how = "reused" if d["reused"] else f"generated in {d['prepare_s']:.0f} s"
    out = [(f"DuckDB named queries (synthetic store, {d['token_rows']:,} token rows, {d['neurons']:,} neurons, "
            f"{d['store_bytes'] / 1e6:,.0f} MB, {how}; connect {d['connect_ms']:.0f} ms)")]
    for name, q in d["queries"].items():
        out.append(f"  {name:<16} median {q['median_ms']:>8,.1f} ms   first {q['first_ms']:>8,.1f} ms   "
                   f"({q['runs']} runs, {q['rows']} rows)")
    return out


def synthetic_store(root: Path, n_tokens: int, n_layers: int, n_neurons: int, k: int,
                    seed: int = 0) -> tuple[Path, bool]:
    """A store with the miner's layouts at full size; reused when `root` holds one with these parameters."""
    params = {"version": SYNTHETIC_VERSION, "tokens": n_tokens, "layers": n_layers, "neurons": n_neurons, "k": k,
              "seed": seed}
    mark = root / "_bench.json"
    mine = mark.is_file()
    if mine and (root / "manifest.parquet").is_file() and json.loads(mark.read_text()) == params:
        return root, True
    if root.exists() and any(root.iterdir()):
        if not mine:
            raise UserError(f"--synthetic-store {root}: not empty and not a synthetic bench store; "
                            "give a new or empty directory")
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    mark.write_text(json.dumps(params))  # first: marks the directory as ours; manifest.parquet last: complete
    _log(f"writing a synthetic store of {n_tokens:,} tokens to {root}")
    _write_synthetic(root, params)
    return root, False


def _write_synthetic(root: Path, p: dict[str, Any]) -> None:
    from .merge import manifest_table
    from .reducers import HistogramBins
    from .store import Store

    rng = np.random.default_rng(p["seed"])
    store = Store(root)
    per_ctx = SYNTHETIC_CONTEXT - 1  # BOS is never mined
    # WordPiece-like: a token's span leaves out the space before it, so every context's text reads the gaps
    # from docs.parquet (tok_contexts), the costlier case; byte-level BPE's spans tile the text
    words = [f"w{i:04d}" for i in range(4096)]
    vocab, spelled = pa.array(words), np.frombuffer("".join(" " + w for w in words).encode(), np.uint8).reshape(-1, 6)
    all_ids = []
    markers = []
    for i, lo in enumerate(range(0, p["tokens"], SYNTHETIC_SHARD_TOKENS)):
        tok = np.arange(lo, min(lo + SYNTHETIC_SHARD_TOKENS, p["tokens"]), dtype=np.int64)
        ctx, doc = tok // per_ctx, tok // per_ctx // 8
        ids = rng.integers(0, len(vocab), len(tok)).astype(np.int32)
        all_ids.append(ids)
        start = ((tok - doc * 8 * per_ctx) * 6 + 1).astype(np.int32)
        table = pa.table({
            "tok": tok, "ctx": ctx, "pos": (tok % per_ctx + 1).astype(np.int32), "doc_id": doc,
            "char_start": start, "char_end": start + 5, "token_id": ids, "token": vocab.take(pa.array(ids)),
            "logprob": -rng.exponential(2.0, len(tok)).astype(np.float32),
            "entropy": rng.uniform(0, 5, len(tok)).astype(np.float32), "shard": np.full(len(tok), i, np.int32),
        })
        digest = store.files.write_parquet(store.tokens_name(i), table)
        markers.append({"shard": i, "status": "complete", "tokens": len(tok), "first_tok": int(lo),
                        "contexts": int(ctx[-1] - ctx[0] + 1), "rows": {"tokens": len(tok)},
                        "files": {store.tokens_name(i): digest}})
    n_docs = (p["tokens"] - 1) // per_ctx // 8 + 1
    ids = np.concatenate(all_ids)
    texts = [spelled[ids[d * 8 * per_ctx:(d + 1) * 8 * per_ctx]].tobytes().decode() for d in range(n_docs)]
    store.write_docs(pa.table({
        "doc_id": np.arange(n_docs, dtype=np.int64), "source": pa.repeat("synthetic", n_docs),
        "path": pa.array([f"doc-{d}.txt" for d in range(n_docs)]), "n_chars": pa.array([len(t) for t in texts]),
        "n_tokens": pa.array([len(t) // 6 for t in texts]), "text": texts}))
    for name, table in _neuron_tables(rng, p, HistogramBins()).items():
        store.write_table(name, table)
    store.write_table("manifest", manifest_table(markers))


def _neuron_tables(rng: np.random.Generator, p: dict[str, Any], bins) -> dict[str, pa.Table]:
    """neurons, histograms (a run of 40-200 non-empty bins per neuron), top_examples; sorted as the miner writes."""
    n_neurons, k = p["layers"] * p["neurons"], p["k"]
    lo, hi = bins.edges()
    width = rng.integers(40, 200, n_neurons)
    first_bin = rng.integers(0, bins.n_bins - width)
    row0 = np.cumsum(width) - width
    who = np.repeat(np.arange(n_neurons), width)
    bin_ = np.repeat(first_bin, width) + np.arange(width.sum()) - np.repeat(row0, width)
    count = (rng.random(len(bin_)) * 2 * np.repeat(p["tokens"] / width, width)).astype(np.int64) + 1
    vmin = np.maximum(lo[first_bin], -512.0)
    vmax = np.minimum(hi[first_bin + width - 1], 512.0)
    firing = np.add.reduceat(np.where(lo[bin_] > 0, count, 0), row0)
    total = np.add.reduceat(count, row0)

    def keys(idx: np.ndarray) -> dict[str, Any]:
        return {"hook": pa.repeat("mlp.hook_post", len(idx)), "layer": (idx // p["neurons"]).astype(np.int32),
                "neuron": (idx % p["neurons"]).astype(np.int32)}

    every = np.arange(n_neurons)
    mean = (vmin + vmax) / 2
    neurons = pa.table({**keys(every), "count": total, "mean": mean, "std": (vmax - vmin) / 4,
                        "skew": rng.normal(0, 1, n_neurons), "kurtosis": rng.exponential(3, n_neurons),
                        "frac_active": firing / total, "min": vmin, "max": vmax})
    histograms = pa.table({**keys(who), "bin": bin_.astype(np.int32), "lo": lo[bin_], "hi": hi[bin_], "count": count})
    ex = np.repeat(every, k)
    rank = np.tile(np.arange(1, k + 1, dtype=np.int32), n_neurons)
    top = pa.table({**keys(ex), "rank": rank, "value": (vmax[ex] * (1 - rank / (2 * k))).astype(np.float32),
                    "tok": rng.integers(0, p["tokens"], len(ex))})
    return {"neurons": neurons, "histograms": histograms, "top_examples": top}


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "memory-child":
        print(json.dumps(memory_child(sys.argv[2], int(sys.argv[3]))), flush=True)
    else:
        sys.exit("usage: python -m mining.bench_store memory-child JOB_JSON THREADS")
