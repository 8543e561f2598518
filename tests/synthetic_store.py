"""A small, self-consistent store built by brute force with NumPy, for testing the query layer.

Every table has the schema the miner writes (see mining/store.py and mining/merge.py); every
statistic is computed straight from random activations, which are kept beside the store in
`_test/activations.npz` (one (T, L, N) float32 array per hook) so tests can check answers.

The histogram mirrors the miner's binning on purpose but is written out here independently
(sign, exact-zero bin, underflow bins, MANTISSA_BITS linear sub-bins per octave between
2**MIN_EXP and 2**MAX_EXP, overflow bins with infinite outer edges); bins increase with value.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

MANTISSA_BITS, MIN_EXP, MAX_EXP = 4, -12, 8
HOOKS = ("mlp.hook_post", "mlp.hook_pre")
CONTEXT_LENGTH = 48
WORDS = ("the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "from", "home", "ship",
         "sea", "blue", "red", "code", "def", "return", "x", "=", "(", ")", ".", ",", "\n", "é", "42")


# ---------------------------------------------------------------- histogram bins


def bin_edges() -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) of every bin, in increasing value order."""
    sub = 2 ** MANTISSA_BITS
    mags = np.array([2.0 ** e * (1 + m / sub) for e in range(MIN_EXP, MAX_EXP) for m in range(sub)] + [2.0 ** MAX_EXP])
    pos_lo, pos_hi = mags[:-1], mags[1:]  # (P,)
    lo = np.concatenate([[-np.inf], -pos_hi[::-1], [-(2.0 ** MIN_EXP), 0.0, 0.0], pos_lo, [2.0 ** MAX_EXP]])
    hi = np.concatenate([[-(2.0 ** MAX_EXP)], -pos_lo[::-1], [0.0, 0.0, 2.0 ** MIN_EXP], pos_hi, [np.inf]])
    return lo, hi


def bin_index(x: np.ndarray) -> np.ndarray:
    """Bin of each value (same shape), for bins as laid out by bin_edges()."""
    x = np.asarray(x, np.float64)
    sub = 2 ** MANTISSA_BITS
    n_log = (MAX_EXP - MIN_EXP) * sub
    zero = n_log + 2  # 0: neg overflow, 1..n_log: negative log bins, n_log+1: neg underflow, then zero
    mags = np.array([2.0 ** e * (1 + m / sub) for e in range(MIN_EXP, MAX_EXP) for m in range(sub)])
    a = np.abs(x)
    k = np.clip(np.searchsorted(mags, a, side="right") - 1, 0, n_log - 1)  # log bin of |x|
    pos = np.where(a < 2.0 ** MIN_EXP, zero + 1, np.where(a >= 2.0 ** MAX_EXP, zero + 2 + n_log, zero + 2 + k))
    neg = 2 * zero - pos  # mirror image around the zero bin
    return np.where(x == 0, zero, np.where(x > 0, pos, neg)).astype(np.int64)


# ---------------------------------------------------------------- activations


def _activations(rng: np.random.Generator, t: int, n_layers: int, n_neurons: int) -> np.ndarray:
    """(T, L, N) float32 with varied shapes: both signs, exact zeros, dead, dense, heavy tails, ties."""
    out = np.empty((t, n_layers, n_neurons), np.float32)
    for layer in range(n_layers):
        for n in range(n_neurons):
            z = rng.standard_normal(t)
            kind = (n + layer) % 8
            if kind == 0:  # GELU-ish: mostly small negatives, some positives
                v = 0.5 * z * (1 + np.tanh(0.8 * (z + 0.04 * z ** 3)))
            elif kind == 1:  # ReLU: many exact zeros
                v = np.maximum(z, 0) * (1 + layer)
            elif kind == 2:  # heavy-tailed: rare huge spikes, some in the overflow bins
                v = 0.1 * z + np.where(rng.random(t) < 0.01, rng.uniform(20, 600, t), 0.0)
            elif kind == 3:  # dead: never anything but zero
                v = np.zeros(t)
            elif kind == 4:  # dense: always positive
                v = np.exp(z)
            elif kind == 5:  # tiny values straddling the underflow bins
                v = z * 3e-4
            elif kind == 6:  # negative only (never fires, but not constant)
                v = -np.exp(z) - 0.5
            else:  # coarse values: many ties
                v = np.round(z * 2) / 2
            out[:, layer, n] = v
    return out


# ---------------------------------------------------------------- tables


def _tokens_and_docs(rng: np.random.Generator, n_tokens: int) -> tuple[pa.Table, pa.Table, np.ndarray]:
    """Docs of varied length cut into contexts of CONTEXT_LENGTH; a doc's first context starts at pos 1 (BOS)."""
    words = rng.integers(0, len(WORDS), n_tokens)
    rows = {k: [] for k in ("tok", "ctx", "pos", "doc_id", "char_start", "char_end", "token_id", "token")}
    docs = []
    tok = ctx = doc_id = 0
    while tok < n_tokens:
        n_doc = min(int(rng.integers(20, 3 * CONTEXT_LENGTH)), n_tokens - tok)
        pieces, chars = [], 0
        start = 0
        while start < n_doc:
            first = 1 if start == 0 else 0  # BOS is never mined
            take = min(CONTEXT_LENGTH - first, n_doc - start)
            for i in range(take):
                w = WORDS[words[tok]]
                text = w if (start + i == 0 or w in ".,)\n") else " " + w
                rows["tok"].append(tok)
                rows["ctx"].append(ctx)
                rows["pos"].append(first + i)
                rows["doc_id"].append(doc_id)
                rows["char_start"].append(chars)
                rows["char_end"].append(chars + len(text))
                rows["token_id"].append(int(words[tok]) + 3)
                rows["token"].append(text)
                pieces.append(text)
                chars += len(text)
                tok += 1
            start += take
            ctx += 1
        text = "".join(pieces)
        docs.append({"doc_id": doc_id, "source": "synthetic", "path": f"doc-{doc_id:04d}.txt",
                     "n_chars": len(text), "n_tokens": n_doc, "text": text})
        doc_id += 1
    n = len(rows["tok"])
    logprob = -rng.exponential(2.0, n).astype(np.float32)
    entropy = rng.uniform(0, 5, n).astype(np.float32)
    last = np.r_[np.diff(np.array(rows["doc_id"])) != 0, True]  # the last token of a doc has no next token
    tokens = pa.table({
        "tok": pa.array(rows["tok"], pa.int64()), "ctx": pa.array(rows["ctx"], pa.int64()),
        "pos": pa.array(rows["pos"], pa.int32()), "doc_id": pa.array(rows["doc_id"], pa.int64()),
        "char_start": pa.array(rows["char_start"], pa.int64()), "char_end": pa.array(rows["char_end"], pa.int64()),
        "token_id": pa.array(rows["token_id"], pa.int32()), "token": pa.array(rows["token"], pa.string()),
        "logprob": pa.array(logprob, pa.float32(), mask=last), "entropy": pa.array(entropy, pa.float32(), mask=last),
    })
    doc_table = pa.table({
        "doc_id": pa.array([d["doc_id"] for d in docs], pa.int64()),
        **{k: pa.array([d[k] for d in docs]) for k in ("source", "path")},
        **{k: pa.array([d[k] for d in docs], pa.int64()) for k in ("n_chars", "n_tokens")},
        "text": pa.array([d["text"] for d in docs], pa.string()),
    })
    return tokens, doc_table, np.array(rows["ctx"], np.int64)


def _moments(x: np.ndarray) -> dict:
    x = x.astype(np.float64)
    mean, std = x.mean(), x.std()
    if std > 0:
        zs = (x - mean) / std
        skew, kurt = float((zs ** 3).mean()), float((zs ** 4).mean() - 3)
    else:
        skew = kurt = None
    return {"count": len(x), "mean": mean, "std": std, "skew": skew, "kurtosis": kurt,
            "frac_active": float((x > 0).mean()), "min": float(x.min()), "max": float(x.max())}


def ranked(values: np.ndarray, k: int, descending: bool) -> np.ndarray:
    """Indices of the k largest (or smallest) values, ties broken by lower index (= global token index)."""
    order = np.lexsort((np.arange(len(values)), -values if descending else values))
    return order[:k]


def context_peaks(values: np.ndarray, ctx: np.ndarray) -> np.ndarray:
    """Token index of each context's peak (highest value, lowest tok on ties)."""
    order = np.lexsort((np.arange(len(values)), -values, ctx))  # by ctx, then value desc, then tok
    first = np.r_[True, np.diff(ctx[order]) != 0]
    return order[first]


def _neuron_tables(hook: str, acts: np.ndarray, ctx: np.ndarray, k: int) -> dict[str, list[dict]]:
    lo, hi = bin_edges()
    out: dict[str, list[dict]] = {n: [] for n in ("neurons", "histograms", "top_examples", "bottom_examples",
                                                  "top_contexts")}
    _, n_layers, n_neurons = acts.shape
    for layer in range(n_layers):
        for n in range(n_neurons):
            x = acts[:, layer, n]
            key = {"hook": hook, "layer": layer, "neuron": n}
            out["neurons"].append({**key, **_moments(x)})
            bins, counts = np.unique(bin_index(x), return_counts=True)
            out["histograms"] += [{**key, "bin": int(b), "lo": float(lo[b]), "hi": float(hi[b]), "count": int(c)}
                                  for b, c in zip(bins, counts)]
            for name, idx in (("top_examples", ranked(x, k, True)), ("bottom_examples", ranked(x, k, False))):
                out[name] += [{**key, "rank": r + 1, "value": float(x[i]), "tok": int(i)} for r, i in enumerate(idx)]
            peaks = context_peaks(x, ctx)
            best = peaks[ranked(x[peaks], k, True)]  # peaks are in tok order, so index ties still break by tok
            out["top_contexts"] += [{**key, "rank": r + 1, "value": float(x[i]), "tok": int(i)}
                                    for r, i in enumerate(best)]
    return out


_SCHEMAS = {
    "neurons": [("count", pa.int64())] + [(c, pa.float64()) for c in
                                          ("mean", "std", "skew", "kurtosis", "frac_active", "min", "max")],
    "histograms": [("bin", pa.int32()), ("lo", pa.float64()), ("hi", pa.float64()), ("count", pa.int64())],
    "examples": [("rank", pa.int32()), ("value", pa.float32()), ("tok", pa.int64())],
}


def _to_table(rows: list[dict], fields: list[tuple[str, pa.DataType]]) -> pa.Table:
    schema = pa.schema([("hook", pa.string()), ("layer", pa.int32()), ("neuron", pa.int32()), *fields])
    return pa.Table.from_pylist(rows, schema=schema)


def make_synthetic_store(root: Path, n_tokens: int = 3000, n_layers: int = 2, n_neurons: int = 8, k: int = 5,
                         seed: int = 0) -> Path:
    """Write a complete store under root/"store" (manifest last) and return its path."""
    rng = np.random.default_rng(seed)
    store = Path(root) / "store"
    (store / "tokens").mkdir(parents=True)
    tokens, docs, ctx = _tokens_and_docs(rng, n_tokens)
    acts = {hook: _activations(rng, n_tokens, n_layers, n_neurons) for hook in HOOKS}
    (store / "_test").mkdir()
    np.savez(store / "_test" / "activations.npz", **acts)

    pq.write_table(docs, store / "docs.parquet")
    split = int(ctx[n_tokens // 2])  # two shards, each holding whole contexts
    manifest = []
    for shard, mask in enumerate((ctx < split, ctx >= split)):
        part = tokens.filter(pa.array(mask))
        part = part.append_column("shard", pa.array(np.full(part.num_rows, shard, np.int32)))
        pq.write_table(part, store / "tokens" / f"shard-{shard:05d}.parquet", row_group_size=1024)
        manifest.append({"shard": shard, "status": "done", "tokens": part.num_rows,
                         "first_tok": int(part["tok"][0].as_py()), "contexts": len(set(ctx[mask].tolist())),
                         "rows": part.num_rows, "seconds": 0.0, "checksum": "0" * 64, "files": "{}"})
        (store / "_shards").mkdir(exist_ok=True)
        (store / "_shards" / f"shard-{shard:05d}.json").write_text(json.dumps({"shard": shard}))
    zarr = store / "activations.zarr" / "mlp.hook_post"
    zarr.mkdir(parents=True)
    (zarr / "zarr.json").write_text("{}")

    tables: dict[str, list[dict]] = {}
    for hook in HOOKS:
        for name, rows in _neuron_tables(hook, acts[hook], ctx, k).items():
            tables.setdefault(name, []).extend(rows)
    for name, rows in tables.items():
        fields = _SCHEMAS.get(name, _SCHEMAS["examples"])
        pq.write_table(_to_table(rows, fields), store / f"{name}.parquet")
    _polysemanticity_tables(store, acts, tokens, rng)
    pq.write_table(pa.Table.from_pylist(manifest).cast(pa.schema([
        ("shard", pa.int32()), ("status", pa.string()), ("tokens", pa.int64()), ("first_tok", pa.int64()),
        ("contexts", pa.int64()), ("rows", pa.int64()), ("seconds", pa.float64()), ("checksum", pa.string()),
        ("files", pa.string())])), store / "manifest.parquet")
    return store


def _polysemanticity_tables(store: Path, acts: dict[str, np.ndarray], tokens: pa.Table,
                            rng: np.random.Generator) -> None:
    """neuron_variance by brute force (every token id its own group); neuron_coherence made up."""
    from mining.reducers.group_variance import explained_brute_force

    token_id, pos = tokens["token_id"].to_numpy(), tokens["pos"].to_numpy()
    var, coh = [], []
    for hook, a in acts.items():
        for layer in range(a.shape[1]):
            by_tok, by_pos = explained_brute_force(a[:, layer], token_id), explained_brute_force(a[:, layer], pos)
            for neuron in range(a.shape[2]):
                key = {"hook": hook, "layer": layer, "neuron": neuron}
                var.append({**key, "var_token": float(by_tok[neuron]), "var_position": float(by_pos[neuron]),
                            "token_groups": len(np.unique(token_id)), "token_coverage": 1.0})
                coh.append({**key, "coherence": float(rng.uniform(-0.1, 1.0)), "peaks": 5, "distinct_tokens": 3})
    pq.write_table(_to_table(var, [("var_token", pa.float64()), ("var_position", pa.float64()),
                                   ("token_groups", pa.int32()), ("token_coverage", pa.float64())]),
                   store / "neuron_variance.parquet")
    pq.write_table(_to_table(coh, [("coherence", pa.float64()), ("peaks", pa.int32()),
                                   ("distinct_tokens", pa.int32())]), store / "neuron_coherence.parquet")


def load_activations(store: Path) -> dict[str, np.ndarray]:
    """The raw (T, L, N) activations per hook that the store was computed from."""
    with np.load(Path(store) / "_test" / "activations.npz") as z:
        return {hook: z[hook] for hook in z.files}
