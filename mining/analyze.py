"""Analyses over the dense activation sample (`activations.zarr/<hook>`): `mine analyze STORE KIND`.

    regex   Pearson correlation of each neuron with "the token overlaps a match of PATTERN"
            -> regex_neurons
    pca     principal components of the centered sample, the tokens that score highest and
            lowest on each, and the neurons that load most -> pca_components, pca_examples,
            pca_loadings
    cofire  neuron pairs whose firing sets overlap most (Jaccard) and groups of neurons joined
            by pairs at or above a Jaccard threshold -> cofiring, cofire_groups
    offsets an attention pattern's sample (attn.hook_pattern) by distance instead of key position:
            each head's mean attention from a token to the token d positions back -> pattern_offsets

Each analysis is a pure function over one hook's sample, values (n, N) float32, that tests check
against brute force; the `analyze_*` functions read the store, run it for every chosen hook and
write the tables through the store (atomic Parquet), replacing only the rows they recomputed —
the same (pattern,) hook and layer — so analyses accumulate. Counting conventions are 1-based:
component 1 is the largest principal component, rank 1 the strongest example, group 1 the
largest group.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from .dense import dense_hooks, read_dense
from .errors import UserError
from .merge import split_hook
from .store import Store

BLOCK = 1024  # neurons per block: bounds the (n, BLOCK) float64 and (BLOCK, N) pair matrices
EXACT_MAX_DIM = 4096  # PCA is exact while min(n, N) is at most this, else randomized (pca_lowrank)
F16_MAX = 65504.0
DENSE_HINT = "mine with `dense: {hooks: [...], token_fraction: 0.05}` in the job spec"


# ---------------------------------------------------------------- regex (pure)


def regex_indicator(regex: re.Pattern, texts: dict[int, str], doc_id: np.ndarray, start: np.ndarray,
                    end: np.ndarray) -> np.ndarray:
    """(n,) bool: token i's span [start, end) overlaps a match of regex in texts[doc_id[i]].

    An empty match at p (lookarounds, `\\b`) counts as covering character p."""
    out = np.zeros(len(doc_id), bool)
    order = np.argsort(doc_id, kind="stable")
    ids, first = np.unique(doc_id[order], return_index=True)
    for d, lo, hi in zip(ids.tolist(), first, np.r_[first[1:], len(order)]):
        spans = [(m.start(), max(m.end(), m.start() + 1)) for m in regex.finditer(texts[d])]
        if not spans:
            continue
        ms, me = np.array(spans, np.int64).T  # both non-decreasing: finditer's matches never overlap
        idx = order[lo:hi]
        j = np.searchsorted(me, start[idx], side="right")  # first match ending after the token starts
        inside = j < len(me)
        hit = np.zeros(len(idx), bool)
        hit[inside] = ms[j[inside]] < end[idx][inside]
        out[idx] = hit
    return out


def correlate(values: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(N,) Pearson correlation of each column of values (n, N) with y (n,); NaN where either is constant."""
    yc = y.astype(np.float64) - y.mean()
    ynorm = np.sqrt(yc @ yc)
    out = np.full(values.shape[1], np.nan)
    for lo in range(0, values.shape[1], BLOCK):
        x = values[:, lo:lo + BLOCK].astype(np.float64)  # (n, B)
        xc = x - x.mean(0)
        den = np.sqrt((xc * xc).sum(0)) * ynorm
        constant = (x.max(0) == x.min(0)) | (ynorm == 0)
        out[lo:lo + BLOCK] = np.where(constant, np.nan, (yc @ xc) / np.where(constant, 1.0, den))
    return out


# ---------------------------------------------------------------- PCA (pure)


@dataclass
class PCA:
    components: np.ndarray  # (K, N) unit loadings; sign: the largest |loading| is positive
    singular_values: np.ndarray  # (K,)
    explained_variance_ratio: np.ndarray  # (K,) of the total variance of the sample
    scores: np.ndarray  # (n, K) projections of the centered sample


def pca(values: np.ndarray, k: int, exact: bool | None = None) -> PCA:
    """Top-k principal components of values (n, N). Exact (eigendecomposition of the smaller Gram
    matrix in float64: much faster on CPU than a float32 SVD) when cheap enough or exact=True, else
    torch.pca_lowrank (randomized, seeded) with k + 10 columns and 6 power iterations."""
    n, n_neurons = values.shape
    most = min(n - 1, n_neurons)
    if not 1 <= k <= most:
        raise UserError(f"--components {k}: must be between 1 and {most} here ({n} sampled tokens, "
                        f"{n_neurons} neurons); give a smaller --components or mine a larger dense sample")
    x = torch.from_numpy(np.ascontiguousarray(values, np.float32)).double()
    x = x - x.mean(0)
    total = float((x ** 2).sum())
    if exact is None:
        exact = min(n, n_neurons) <= EXACT_MAX_DIM
    if exact:
        small = n <= n_neurons
        lam, vec = torch.linalg.eigh(x @ x.T if small else x.T @ x)  # ascending
        lam, vec = lam.flip(0)[:k].clamp(min=0), vec.flip(1)[:, :k]
        s = lam.sqrt()
        v = (x.T @ vec) / s.clamp(min=1e-300) if small else vec  # (N, K)
    else:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            _, s, v = torch.pca_lowrank(x.float(), q=min(k + 10, most), center=False, niter=6)
        s, v = s[:k].double(), v[:, :k].double()
    top = v.abs().argmax(0)
    v = v * torch.sign(v[top, torch.arange(k)])[None, :]  # SVD signs are arbitrary: fix them
    s64 = s.numpy()
    ratio = s64 ** 2 / total if total > 0 else np.zeros(k)
    return PCA(v.T.numpy().copy(), s64.copy(), ratio, (x @ v).numpy())


def extremes(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of the k largest and the k smallest of scores (n,), ties by lower index."""
    idx = np.arange(len(scores))
    return np.lexsort((idx, -scores))[:k], np.lexsort((idx, scores))[:k]


# ---------------------------------------------------------------- co-firing (pure)


def firing(values: np.ndarray, quantile: float) -> np.ndarray:
    """(n, N) bool: the value is above 0 and above its neuron's own `quantile` over the sample, so
    every neuron fires on at most 1 - quantile of the tokens and always-on neurons pair with nothing."""
    return values > np.maximum(np.quantile(values, quantile, axis=0), 0)[None, :]


@dataclass
class CoFiring:
    a: np.ndarray  # (P,) neuron_a < neuron_b
    b: np.ndarray
    both: np.ndarray  # (P,) tokens where both fire
    jaccard: np.ndarray
    edges: np.ndarray  # (E, 2) every pair with jaccard >= threshold (and both >= min_both)


def cofiring(fire: np.ndarray, top: int, threshold: float, min_both: int) -> CoFiring:
    """The `top` pairs by Jaccard of firing sets (ties by a, then b), among pairs that fire together
    on at least min_both tokens, and every such pair with Jaccard >= threshold. O(n·N²), in blocks."""
    f = torch.from_numpy(fire).float()  # (n, N): 0/1 products are exact in float32 up to 2**24
    n_neurons = f.shape[1]
    count = f.sum(0).double()
    cols = torch.arange(n_neurons)
    cand: list[np.ndarray] = []
    edges: list[np.ndarray] = []
    for lo in range(0, n_neurons, BLOCK):
        rows = cols[lo:lo + BLOCK]
        both = (f[:, rows].T @ f).double()  # (B, N)
        union = count[rows, None] + count[None, :] - both
        ok = (cols[None, :] > rows[:, None]) & (both >= max(min_both, 1))
        jac = torch.where(ok, both / union.clamp(min=1), torch.tensor(-1.0, dtype=torch.float64))
        if top > 0 and ok.any():
            kth = jac.flatten().topk(min(top, jac.numel())).values[-1]
            cand.append(torch.nonzero(ok & (jac >= kth)).numpy() + [lo, 0])  # every tie at the cut
        edges.append(torch.nonzero(ok & (both >= threshold * union)).numpy() + [lo, 0])
    pairs = np.concatenate(cand) if cand else np.zeros((0, 2), np.int64)
    both = (fire[:, pairs[:, 0]] & fire[:, pairs[:, 1]]).sum(0)
    cnt = fire.sum(0)
    jac = both / (cnt[pairs[:, 0]] + cnt[pairs[:, 1]] - both)
    order = np.lexsort((pairs[:, 1], pairs[:, 0], -jac))[:top]
    return CoFiring(pairs[order, 0], pairs[order, 1], both[order], jac[order],
                    np.concatenate(edges) if edges else np.zeros((0, 2), np.int64))


def pair_correlation(values: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(P,) Pearson correlation of neuron a[i] with neuron b[i]; NaN when either is constant."""
    xa, xb = values[:, a].astype(np.float64), values[:, b].astype(np.float64)
    xa, xb = xa - xa.mean(0), xb - xb.mean(0)
    den = np.sqrt((xa * xa).sum(0) * (xb * xb).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (xa * xb).sum(0) / den, np.nan)


def components(edges: np.ndarray, n: int) -> list[list[int]]:
    """Connected components (size >= 2) of an undirected graph on n nodes, largest first
    (ties by smallest member), each sorted."""
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in edges.tolist():
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = {}
    for i in sorted({v for e in edges.tolist() for v in e}):
        groups.setdefault(root(i), []).append(i)
    return sorted((g for g in groups.values() if len(g) > 1), key=lambda g: (-len(g), g[0]))


# ---------------------------------------------------------------- offsets (pure)


def attention_by_offset(values: np.ndarray, pos: np.ndarray, n_ctx: int, max_offset: int) -> tuple[np.ndarray,
                                                                                                    np.ndarray]:
    """Sampled attention patterns by distance. values (n, heads * n_ctx): each token's row over key positions, per
    head (attn.hook_pattern's layout); pos (n,): its own position, the query. Returns (sums (heads, D), counts (D,))
    over offsets d = 0..D-1, D = max_offset + 1: the attention to key pos - d, summed over the tokens that have one
    (d <= pos)."""
    n = len(pos)
    rows = values.reshape(n, -1, n_ctx)
    keys = pos[:, None] - np.arange(max_offset + 1)[None, :]  # (n, D)
    seen = keys >= 0
    picked = np.take_along_axis(rows, np.clip(keys, 0, None)[:, None, :], axis=2)  # (n, heads, D)
    sums = np.where(seen[:, None, :], picked, 0.0).sum(0, dtype=np.float64)
    return sums, seen.sum(0)


# ---------------------------------------------------------------- the store side


def _open(store: str | Path) -> Store:
    s = Store(store)
    if not s.files.exists("manifest.parquet"):
        raise UserError(f"{store}: not a complete store (no manifest.parquet); "
                        "finish it with `mine run --resume` or point at a store directory")
    return s


def pick_hooks(s: Store, hook: str | None) -> list[str]:
    """Dense hooks named by --hook: a full name, a glob (blocks.*.mlp.hook_post) or a site (every layer)."""
    found = sorted((h for h in dense_hooks(s) if not h.startswith(".")), key=lambda h: split_hook(h)[::-1])
    if not found:
        raise UserError(f"{s.root}: this store has no dense activations; {DENSE_HINT}")
    if hook is None:
        return found
    chosen = [h for h in found if h == hook or fnmatch.fnmatchcase(h, hook) or split_hook(h)[0] == hook]
    if not chosen:
        raise UserError(f"--hook {hook}: no dense activations for it in this store; it has: {', '.join(found)}")
    return chosen


def load_sample(s: Store, hook: str) -> tuple[np.ndarray, np.ndarray]:
    """(tok (n,) ascending, values (n, N) float32) of one dense hook; float16 overflow clipped."""
    tok, values = read_dense(s, hook)
    if len(tok) < 2:
        raise UserError(f"{hook}: only {len(tok)} densely sampled token(s); raise dense.token_fraction")
    order = np.argsort(tok, kind="stable")
    return tok[order], np.nan_to_num(values[order].astype(np.float32), nan=0.0, posinf=F16_MAX, neginf=-F16_MAX)


def _put(s: Store, name: str, new: pa.Table, keys: list[str], order: list[str]) -> int:
    """Write `name`, keeping the old rows whose key (e.g. hook, layer) the new rows do not recompute;
    rows sorted by keys + order."""
    if s.files.exists(f"{name}.parquet"):
        old = s.read_table(name)
        if old.schema.names == new.schema.names:  # else an older layout: the new rows replace it
            def key(t: pa.Table) -> pa.Array:
                return pc.binary_join_element_wise(*[pc.cast(t[k], pa.string()) for k in keys], "\x1f")
            keep = pc.invert(pc.is_in(key(old), value_set=pc.unique(key(new))))
            new = pa.concat_tables([old.filter(keep).cast(new.schema), new])
    s.write_table(name, new.sort_by([(k, "ascending") for k in keys + order]))
    s.reseal()  # the manifest covers every file, the new table included
    return new.num_rows


def _site_layer(hook: str, n: int) -> dict[str, pa.Array]:
    site, layer = split_hook(hook)
    return {"hook": pa.array([site] * n, pa.string()), "layer": pa.array(np.full(n, layer, np.int32))}


def _token_rows(s: Store, toks: np.ndarray, cols: list[str], needs: str) -> pa.Table:
    """The token table's `cols` (and tok) of the given sorted toks, in their order; `needs` says who asks."""
    names = [n for n, is_dir in s.files.listdir("tokens") if not is_dir and n.endswith(".parquet")]
    if not names:
        raise UserError(f"{s.root}: {needs} the token table; mine with `stats: {{token_table: true}}`")
    parts = [pq.read_table(pa.BufferReader(s.files.read_bytes(f"tokens/{n}")), columns=["tok", *cols])
             for n in sorted(names)]
    table = pa.concat_tables(parts)
    table = table.filter(pc.is_in(table["tok"], value_set=pa.array(toks, pa.int64()))).sort_by("tok")
    if table.num_rows != len(toks):
        raise UserError(f"{s.root}: {len(toks) - table.num_rows} sampled tokens are missing from tokens/; "
                        "the store is damaged (check it with `mine verify`)")
    return table


def _spans(s: Store, toks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[int, str]]:
    """doc_id, char_start, char_end of the given (sorted) toks, and the text of their documents."""
    if not s.files.exists("docs.parquet"):
        raise UserError(f"{s.root}: regex needs the token table and docs.parquet; "
                        "mine with `stats: {token_table: true}`")
    table = _token_rows(s, toks, ["doc_id", "char_start", "char_end"], "regex needs")
    doc_id = table["doc_id"].to_numpy()
    docs = pq.read_table(pa.BufferReader(s.files.read_bytes("docs.parquet")), columns=["doc_id", "text"])
    docs = docs.filter(pc.is_in(docs["doc_id"], value_set=pa.array(np.unique(doc_id))))
    texts = dict(zip(docs["doc_id"].to_pylist(), docs["text"].to_pylist()))
    return doc_id, table["char_start"].to_numpy(), table["char_end"].to_numpy(), texts


def analyze_regex(store: str | Path, pattern: str, hook: str | None = None, name: str | None = None) -> list[str]:
    """Correlate every neuron of the chosen dense hooks with PATTERN -> regex_neurons. Returns summary lines."""
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise UserError(f"regex {pattern!r} is not a valid Python regular expression: {e}") from None
    label = name or pattern
    s = _open(store)
    parts, lines = [], []
    for h in pick_hooks(s, hook):
        tok, values = load_sample(s, h)
        doc_id, start, end, texts = _spans(s, tok)
        y = regex_indicator(regex, texts, doc_id, start, end)
        m = int(y.sum())
        if m == 0 or m == len(y):
            raise UserError(f"regex {pattern!r} matches {'no' if m == 0 else 'every'} densely sampled token of {h} "
                            f"({m} of {len(y)}): nothing to correlate; try another pattern or a larger sample")
        corr = correlate(values, y)
        mean_in, mean_out = values[y].mean(0, dtype=np.float64), values[~y].mean(0, dtype=np.float64)
        n_neurons = values.shape[1]
        parts.append(pa.table({
            "pattern": pa.array([label] * n_neurons, pa.string()), "regex": pa.array([pattern] * n_neurons, pa.string()),
            **_site_layer(h, n_neurons), "neuron": pa.array(np.arange(n_neurons, dtype=np.int32)),
            "corr": pa.array(corr, pa.float64(), mask=np.isnan(corr)),
            "n": pa.array(np.full(n_neurons, len(y), np.int64)), "matches": pa.array(np.full(n_neurons, m, np.int64)),
            "mean_match": pa.array(mean_in), "mean_other": pa.array(mean_out),
        }))
        best = int(np.nanargmax(corr)) if not np.isnan(corr).all() else -1
        lines.append(f"{h}: {m} of {len(y)} sampled tokens match; best neuron {best} (corr {np.nanmax(corr):.3f})")
    rows = _put(s, "regex_neurons", pa.concat_tables(parts), ["pattern", "hook", "layer"], ["neuron"])
    return [*lines, (f"regex_neurons: {rows:,} rows; see `mine query {store} --named regex-neurons "
                     f"--param pattern={_shell(label)}`")]


PCA_COMPONENTS = 10
"""Components `mine analyze pca` keeps unless --components says otherwise."""


def analyze_pca(store: str | Path, hook: str | None = None, components: int | None = None, examples: int = 20,
                loadings: int = 20) -> list[str]:
    """PCA of each chosen dense hook -> pca_components, pca_examples, pca_loadings. components None: PCA_COMPONENTS,
    or as many as a hook's sample allows where that is fewer (a mixture of experts' 8 routing probabilities)."""
    if examples < 1 or loadings < 1:
        raise UserError("--examples and --loadings must be at least 1")
    s = _open(store)
    comps, exs, loads, lines = [], [], [], []
    for h in pick_hooks(s, hook):
        tok, values = load_sample(s, h)
        k = components if components is not None else min(PCA_COMPONENTS, len(values) - 1, values.shape[1])
        try:
            p = pca(values, k)
        except UserError as e:
            raise UserError(f"{h}: {e}") from None
        c = np.arange(1, k + 1, dtype=np.int32)
        comps.append(pa.table({**_site_layer(h, k), "component": c,
                               "explained_variance_ratio": p.explained_variance_ratio,
                               "singular_value": p.singular_values, "n": np.full(k, len(tok), np.int64)}))
        for i in range(k):
            pos, neg = extremes(p.scores[:, i], examples)
            for sign, idx in (("positive", pos), ("negative", neg)):
                exs.append(pa.table({**_site_layer(h, len(idx)), "component": np.full(len(idx), i + 1, np.int32),
                                     "sign": [sign] * len(idx), "rank": np.arange(1, len(idx) + 1, dtype=np.int32),
                                     "score": p.scores[idx, i].astype(np.float64), "tok": tok[idx]}))
            top = extremes(np.abs(p.components[i]), loadings)[0]
            loads.append(pa.table({**_site_layer(h, len(top)), "component": np.full(len(top), i + 1, np.int32),
                                   "rank": np.arange(1, len(top) + 1, dtype=np.int32), "neuron": top.astype(np.int32),
                                   "loading": p.components[i, top].astype(np.float64)}))
        lines.append(f"{h}: {k} components explain {100 * p.explained_variance_ratio.sum():.1f}% of the variance "
                     f"of {len(tok)} sampled tokens (component 1: {100 * p.explained_variance_ratio[0]:.1f}%)")
    keys = ["hook", "layer"]
    _put(s, "pca_components", pa.concat_tables(comps), keys, ["component"])
    _put(s, "pca_examples", pa.concat_tables(exs), keys, ["component", "sign", "rank"])
    _put(s, "pca_loadings", pa.concat_tables(loads), keys, ["component", "rank"])
    return lines + [f"pca_components, pca_examples, pca_loadings written; see `mine query {store} --named pca-components`"]


def analyze_cofire(store: str | Path, hook: str | None = None, threshold: float = 0.5, pairs: int = 100,
                   quantile: float = 0.9, min_both: int = 5) -> list[str]:
    """Co-firing neuron pairs and groups of each chosen dense hook -> cofiring, cofire_groups."""
    if not 0 < threshold <= 1:
        raise UserError(f"--threshold {threshold}: a Jaccard index, must be in (0, 1]")
    if not 0 <= quantile < 1:
        raise UserError(f"--quantile {quantile}: must be in [0, 1)")
    if pairs < 1 or min_both < 1:
        raise UserError("--pairs and --min-both must be at least 1")
    s = _open(store)
    pair_tables, group_tables, lines = [], [], []
    for h in pick_hooks(s, hook):
        tok, values = load_sample(s, h)
        fire = firing(values, quantile)
        cf = cofiring(fire, pairs, threshold, min_both)
        p = len(cf.a)
        pair_tables.append(pa.table({
            **_site_layer(h, p), "rank": np.arange(1, p + 1, dtype=np.int32), "neuron_a": cf.a.astype(np.int32), "neuron_b": cf.b.astype(np.int32),
            "jaccard": cf.jaccard.astype(np.float64), "corr": pair_correlation(values, cf.a, cf.b),
            "both": cf.both.astype(np.int64), "n": np.full(p, len(tok), np.int64)}))
        groups = components(cf.edges, values.shape[1])
        members = [(g, n, len(ns)) for g, ns in enumerate(groups, 1) for n in ns]
        group_tables.append(pa.table({
            **_site_layer(h, len(members)), "group": pa.array([m[0] for m in members], pa.int32()),
            "neuron": pa.array([m[1] for m in members], pa.int32()), "size": pa.array([m[2] for m in members], pa.int32())}))
        best = f"best {cf.a[0]} & {cf.b[0]} (jaccard {cf.jaccard[0]:.3f})" if p else "none fire together enough"
        lines.append(f"{h}: {p} pairs, {best}; {len(groups)} groups at jaccard >= {threshold:g}"
                     + (f" (largest {len(groups[0])} neurons)" if groups else ""))
    _put(s, "cofiring", pa.concat_tables(pair_tables), ["hook", "layer"], ["rank"])
    _put(s, "cofire_groups", pa.concat_tables(group_tables), ["hook", "layer"], ["group", "neuron"])
    return lines + [f"cofiring, cofire_groups written; see `mine query {store} --named cofiring`"]


def analyze_offsets(store: str | Path, hook: str | None = None, max_offset: int = 64) -> list[str]:
    """Each chosen attn.hook_pattern sample by distance -> pattern_offsets(hook, layer, head, distance, mean, n): a
    previous-token head has a high mean at distance 1 on the corpus itself, not only on probe sequences."""
    if max_offset < 0:
        raise UserError(f"--max-offset {max_offset}: must be at least 0")
    s = _open(store)
    hooks = [h for h in pick_hooks(s, hook) if split_hook(h)[0] == "attn.hook_pattern"]
    if not hooks:
        raise UserError(f"{s.root}: offsets reads attention patterns and this store has no dense attn.hook_pattern; "
                        "mine with `dense: {hooks: [\"blocks.5.attn.hook_pattern\"], token_fraction: 0.05}`")
    n_ctx = int(((s.recorded_job() or {}).get("corpus") or {}).get("context_length", 0))
    tables, lines = [], []
    for h in hooks:
        tok, values = load_sample(s, h)
        if not n_ctx or values.shape[1] % n_ctx:
            raise UserError(f"{h}: {values.shape[1]} features are not heads x the job's context length ({n_ctx})")
        d = min(max_offset, n_ctx - 1)
        pos = _token_rows(s, tok, ["pos"], "offsets needs each token's position from")["pos"].to_numpy()
        sums, counts = attention_by_offset(values, pos.astype(np.int64), n_ctx, d)
        heads, offsets = sums.shape
        mean = sums / np.maximum(counts, 1)[None, :]
        keep = np.broadcast_to(counts > 0, mean.shape).reshape(-1)
        head = np.repeat(np.arange(heads, dtype=np.int32), offsets)[keep]
        offset = np.tile(np.arange(offsets, dtype=np.int32), heads)[keep]
        tables.append(pa.table({**_site_layer(h, int(keep.sum())), "head": head, "distance": offset,
                                "mean": mean.reshape(-1)[keep], "n": np.tile(counts, heads)[keep].astype(np.int64)}))
        best = int(mean[:, 1].argmax()) if offsets > 1 else 0
        lines.append(f"{h}: {heads} heads, offsets 0..{offsets - 1} over {len(tok)} sampled tokens; "
                     + (f"head {best} attends most to the previous token ({mean[best, 1]:.3f})" if offsets > 1 else ""))
    _put(s, "pattern_offsets", pa.concat_tables(tables), ["hook", "layer"], ["head", "distance"])
    return lines + [f"pattern_offsets written; see `mine query {store} --named pattern-offsets`"]


def _shell(text: str) -> str:
    return text if re.fullmatch(r"[\w.,:/=+-]+", text) else "'" + text.replace("'", "'\\''") + "'"
