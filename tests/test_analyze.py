"""Analyses over the dense sample (`mine analyze`): the pure functions against brute force on data
with planted structure, the CLI and named queries on a small hand-built store, and a `\\d` regex
on SmolLM2's real activations finding digit neurons."""

from __future__ import annotations

import itertools
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from mining import analyze
from mining.analyze import cofiring, components, correlate, extremes, firing, pair_correlation, pca, regex_indicator
from mining.cli import main
from mining.dense import write_dense_shard
from mining.errors import UserError
from mining.query import connect, run_named

# ---------------------------------------------------------------- regex


def random_docs(rng: np.random.Generator, n_docs: int = 30) -> tuple[dict[int, str], list[tuple[int, int, int]]]:
    """Documents of words, numbers and punctuation, and a tokenization: (doc_id, start, end) per token."""
    pieces = ["the", " cat", " 42", "7", " x", "=", "(", ")", " ab", "abc", "\n", " 1999", ".", " é", "", " "]
    texts, spans = {}, []
    for d in range(n_docs):
        chars = 0
        text = ""
        for p in rng.choice(pieces, int(rng.integers(1, 40))):
            spans.append((d, chars, chars + len(p)))  # "" gives an empty span, as some tokenizers do
            text += p
            chars += len(p)
        texts[d] = text
    return texts, spans


@pytest.mark.parametrize("pattern", [r"\d", r"\d+", r"ab", r"c a", r"(?=x)", r"\b", r"^", r"z", r"[a-z]+"])
def test_regex_indicator_matches_brute_force(pattern):
    rng = np.random.default_rng(0)
    texts, spans = random_docs(rng)
    order = rng.permutation(len(spans))  # any token order
    doc_id, start, end = (np.array([spans[i][k] for i in order]) for k in range(3))
    got = regex_indicator(re.compile(pattern), texts, doc_id, start, end)
    want = []
    for d, a, b in zip(doc_id, start, end):
        matches = [(m.start(), max(m.end(), m.start() + 1)) for m in re.finditer(pattern, texts[d])]
        want.append(any(ms < b and a < me for ms, me in matches))
    assert got.tolist() == want


def test_correlate_matches_corrcoef_and_finds_the_planted_neuron():
    rng = np.random.default_rng(1)
    y = rng.random(600) < 0.1
    x = rng.standard_normal((600, 300)).astype(np.float32)
    x[:, 17] += 1.5 * y  # planted
    x[:, 5] = 0.25  # constant: undefined
    got = correlate(x, y)
    want = np.array([np.corrcoef(x[:, j].astype(np.float64), y)[0, 1] if j != 5 else np.nan for j in range(300)])
    np.testing.assert_allclose(got, want, atol=1e-10)
    assert np.isnan(got[5]) and int(np.nanargmax(got)) == 17


# ---------------------------------------------------------------- PCA


def planted_low_rank(rng: np.random.Generator, n: int, n_neurons: int) -> np.ndarray:
    latent = rng.standard_normal((n, 3)) * np.array([6.0, 3.0, 2.0])  # three strong directions
    basis = np.linalg.qr(rng.standard_normal((n_neurons, 3)))[0].T  # (3, N)
    return (latent @ basis + 0.3 * rng.standard_normal((n, n_neurons)) + 1.0).astype(np.float32)


@pytest.mark.parametrize("shape", [(400, 60), (50, 120)])  # covariance side and Gram side
def test_pca_matches_numpy_svd(shape):
    rng = np.random.default_rng(2)
    x = planted_low_rank(rng, *shape)
    k = 5
    p = pca(x, k)
    xc = x.astype(np.float64) - x.astype(np.float64).mean(0)
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    np.testing.assert_allclose(p.singular_values, s[:k], rtol=1e-5)
    np.testing.assert_allclose(np.abs((p.components * vt[:k]).sum(1)), 1, atol=1e-5)  # same axes up to sign
    np.testing.assert_allclose(p.components @ p.components.T, np.eye(k), atol=1e-6)
    np.testing.assert_allclose(p.scores, xc @ p.components.T, atol=1e-4)
    np.testing.assert_allclose(p.explained_variance_ratio, s[:k] ** 2 / (s ** 2).sum(), rtol=1e-5)
    assert p.explained_variance_ratio[:3].sum() > 0.8  # the planted directions
    assert np.all(np.diff(p.explained_variance_ratio) <= 0)
    top = np.abs(p.components).argmax(1)
    assert np.all(p.components[np.arange(k), top] > 0)  # the sign convention
    full = pca(x, min(shape[0] - 1, shape[1]))  # every component: the whole variance, exact reconstruction
    assert full.explained_variance_ratio.sum() == pytest.approx(1, abs=1e-6)
    np.testing.assert_allclose(full.scores @ full.components, xc, atol=1e-3)


def test_randomized_pca_agrees_on_strong_components():
    x = planted_low_rank(np.random.default_rng(3), 300, 80)
    exact, fast = pca(x, 3, exact=True), pca(x, 3, exact=False)
    np.testing.assert_allclose(fast.singular_values, exact.singular_values, rtol=1e-3)
    np.testing.assert_allclose(np.abs((fast.components * exact.components).sum(1)), 1, atol=1e-3)


def test_pca_refuses_too_many_components():
    x = np.random.default_rng(0).standard_normal((10, 30)).astype(np.float32)
    with pytest.raises(UserError, match="--components 10: must be between 1 and 9"):
        pca(x, 10)


def test_extremes_break_ties_by_index():
    pos, neg = extremes(np.array([1.0, 3.0, 3.0, -2.0, -2.0, 0.0]), 3)
    assert pos.tolist() == [1, 2, 0] and neg.tolist() == [3, 4, 5]


# ---------------------------------------------------------------- co-firing


def planted_cofiring(rng: np.random.Generator, n: int = 500, n_neurons: int = 40) -> np.ndarray:
    x = np.maximum(rng.standard_normal((n, n_neurons)), 0).astype(np.float32)  # ReLU-ish: fire half the time
    signal = rng.random(n) < 0.07
    for j, drop in ((5, 0.0), (23, 0.0), (31, 0.3)):  # a group of three around one signal
        x[:, j] = np.where(signal & (rng.random(n) >= drop), 3 + rng.random(n), 0.0)
    x[:, 9] = np.exp(rng.standard_normal(n))  # always positive: only its top 10% count as firing
    return x


def test_cofiring_matches_brute_force(monkeypatch):
    monkeypatch.setattr(analyze, "BLOCK", 16)  # several blocks, pairs across them
    rng = np.random.default_rng(4)
    x = planted_cofiring(rng)
    fire = firing(x, 0.9)
    thr = np.maximum(np.quantile(x, 0.9, axis=0), 0)
    assert (fire == (x > thr)).all() and fire.mean(0).max() <= 0.1 + 1e-9
    sets = [set(np.nonzero(fire[:, j])[0]) for j in range(x.shape[1])]
    brute = []
    for a, b in itertools.combinations(range(x.shape[1]), 2):
        both = len(sets[a] & sets[b])
        if both >= 3:
            brute.append((-both / len(sets[a] | sets[b]), a, b, both))
    brute.sort()
    cf = cofiring(fire, 15, 0.4, 3)
    got = list(zip(-cf.jaccard, cf.a.tolist(), cf.b.tolist(), cf.both.tolist()))
    assert [g[1:] for g in got] == [b[1:] for b in brute[:15]]
    np.testing.assert_allclose([g[0] for g in got], [b[0] for b in brute[:15]])
    assert (cf.a[0], cf.b[0]) == (5, 23)
    assert {tuple(e) for e in cf.edges.tolist()} == {(a, b) for j, a, b, _ in brute if -j >= 0.4}
    assert components(cf.edges, x.shape[1]) == [[5, 23, 31]]
    corr = pair_correlation(x, cf.a, cf.b)
    np.testing.assert_allclose(corr, [np.corrcoef(x[:, a], x[:, b])[0, 1] for a, b in zip(cf.a, cf.b)], atol=1e-9)


def test_attention_by_offset_matches_brute_force():
    """Each sampled token's pattern row (heads x n_ctx key positions) read back by distance: the attention to key
    pos - d, summed over the tokens with such a key, for d up to max_offset."""
    rng = np.random.default_rng(3)
    n, heads, n_ctx, max_offset = 50, 3, 12, 7
    pos = rng.integers(0, n_ctx, n)
    values = rng.random((n, heads * n_ctx)).astype(np.float32)
    sums, counts = analyze.attention_by_offset(values, pos, n_ctx, max_offset)
    want_sums, want_counts = np.zeros((heads, max_offset + 1)), np.zeros(max_offset + 1, np.int64)
    for i in range(n):
        for d in range(max_offset + 1):
            if pos[i] - d >= 0:
                want_counts[d] += 1
                for h in range(heads):
                    want_sums[h, d] += values[i, h * n_ctx + pos[i] - d]
    np.testing.assert_array_equal(counts, want_counts)
    np.testing.assert_allclose(sums, want_sums, rtol=1e-6)
    assert counts[0] == n and counts[-1] < n  # every token has itself; not every token has one 7 back


def test_components_by_brute_force():
    rng = np.random.default_rng(5)
    edges = rng.integers(0, 30, (25, 2))
    edges = edges[edges[:, 0] != edges[:, 1]]
    groups = components(edges, 30)
    adj = {i: set() for i in range(30)}
    for a, b in edges.tolist():
        adj[a].add(b)
        adj[b].add(a)
    for g in groups:
        reach, todo = set(), [g[0]]
        while todo:
            i = todo.pop()
            if i not in reach:
                reach.add(i)
                todo += list(adj[i])
        assert sorted(reach) == g
    assert [len(g) for g in groups] == sorted((len(g) for g in groups), reverse=True)
    assert sorted(i for g in groups for i in g) == sorted(set(edges.ravel().tolist()))


# ---------------------------------------------------------------- CLI and named queries on a small store


WORDS = ["the", " cat", " sat", " 42", " on", " 7", " mat", ".", " dog", " 1999", " ran", "\n"]
N_NEURONS = 48


def build_store(root: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """A complete store of word tokens with a dense sample of every token for blocks.1.mlp.hook_post
    (planted: neuron 3 tracks digits, 5/23/31 co-fire, neurons 40 and 41 carry one strong direction) and
    pure noise for blocks.0.mlp.hook_post. Returns (store, is_digit (n,), values of layer 1)."""
    rng = np.random.default_rng(6)
    store = root / "store"
    (store / "tokens").mkdir(parents=True)
    rows, docs, tok = [], [], 0
    for d in range(40):
        text = ""
        for pos, w in enumerate(rng.choice(WORDS, 30)):
            rows.append({"tok": tok, "ctx": d, "pos": pos + 1, "doc_id": d, "char_start": len(text),
                         "char_end": len(text) + len(w), "token_id": WORDS.index(w), "token": w, "shard": d // 20})
            text += w
            tok += 1
        docs.append({"doc_id": d, "source": "synthetic", "text": text})
    tokens = pa.Table.from_pylist(rows)
    for shard in (0, 1):
        pq.write_table(tokens.filter(pc.equal(tokens["shard"], shard)),
                       store / "tokens" / f"shard-{shard:05d}.parquet")
    pq.write_table(pa.Table.from_pylist(docs), store / "docs.parquet")
    n = tokens.num_rows
    digit = np.array([any(c.isdigit() for c in r["token"]) for r in rows])
    x = planted_cofiring(rng, n, N_NEURONS)
    x[:, 3] = 2.0 * digit + 0.5 * rng.standard_normal(n)
    x[:, 40:42] += (8 * rng.standard_normal(n))[:, None] * np.array([0.8, -0.6])
    toks = np.arange(n)
    for hook, values in (("blocks.1.mlp.hook_post", x), ("blocks.0.mlp.hook_post", rng.standard_normal((n, 16)))):
        for shard, part in enumerate((toks < n // 2, toks >= n // 2)):
            write_dense_shard(store / "activations.zarr" / hook / f"shard-{shard:05d}", toks[part],
                              values[part].astype(np.float16))
    top = [{"hook": "mlp.hook_post", "layer": 1, "neuron": j, "rank": r + 1, "value": float(x[i, j]), "tok": int(i)}
           for j in range(N_NEURONS) for r, i in enumerate(np.lexsort((toks, -x[:, j]))[:5])]
    pq.write_table(pa.Table.from_pylist(top), store / "top_examples.parquet")
    pq.write_table(pa.table({"shard": [0, 1], "status": ["complete"] * 2}), store / "manifest.parquet")
    return store, digit, x.astype(np.float16).astype(np.float32)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return build_store(tmp_path_factory.mktemp("analyze"))


def mine(*args: str) -> int:
    return main(["analyze", *map(str, args)])


def test_regex_on_a_store(small, capsys):
    store, digit, x = small
    assert mine(store, "regex", r"\d", "--hook", "mlp.hook_post", "--name", "digits") == 0
    assert "best neuron 3" in capsys.readouterr().out
    table = pq.read_table(store / "regex_neurons.parquet")
    layer1 = table.filter(pc.equal(table["layer"], 1)).sort_by("neuron")
    np.testing.assert_allclose(layer1["corr"].to_numpy(zero_copy_only=False), correlate(x, digit), atol=1e-9)
    assert set(layer1["matches"].to_pylist()) == {int(digit.sum())} and set(layer1["n"].to_pylist()) == {len(x)}
    assert set(table["regex"].to_pylist()) == {r"\d"} and set(table["layer"].to_pylist()) == {0, 1}

    assert mine(store, "regex", "cat", "--hook", "blocks.1.mlp.hook_post") == 0  # another pattern: both kept
    assert mine(store, "regex", r"\d", "--hook", "blocks.1.*", "--name", "digits") == 0  # recomputed: replaced
    rows = pq.read_table(store / "regex_neurons.parquet").to_pylist()
    assert sorted({(r["pattern"], r["layer"]) for r in rows}) == [("cat", 1), ("digits", 0), ("digits", 1)]
    assert len(rows) == 2 * N_NEURONS + 16

    con = connect(store)
    top = run_named(con, "regex-neurons", {"pattern": "digits", "layer": "1", "limit": "3"}).to_pylist()
    assert top[0]["neuron"] == 3 and top[0]["rank"] == 1 and top[0]["corr"] > 0.8
    assert all(t.strip().isdigit() for t in top[0]["top_tokens"].split(" | "))
    every = run_named(con, "regex-neurons", {"limit": "2"}).to_pylist()
    assert [r["pattern"] for r in every] == ["cat", "cat", "digits", "digits"]
    neg = run_named(con, "regex-neurons", {"pattern": "digits", "layer": "1", "sign": "negative"}).to_pylist()
    assert neg[0]["corr"] == min(r["corr"] for r in layer1.to_pylist() if r["corr"] is not None)


def test_pca_on_a_store(small, capsys):
    store, _, x = small
    assert mine(store, "pca", "--hook", "blocks.1.mlp.hook_post", "--components", "4", "--examples", "6",
                "--loadings", "5") == 0
    assert "4 components explain" in capsys.readouterr().out
    con = connect(store)
    comps = run_named(con, "pca-components", {"layer": "1"}).to_pylist()
    assert [c["component"] for c in comps] == [1, 2, 3, 4]
    want = pca(x, 4)
    np.testing.assert_allclose([c["explained_variance_ratio"] for c in comps], want.explained_variance_ratio,
                               rtol=1e-6)
    assert comps[-1]["cumulative"] == pytest.approx(want.explained_variance_ratio.sum())
    first = [(int(n), float(v)) for n, v in (item.split(":") for item in comps[0]["top_neurons"].split())]
    assert [n for n, _ in first[:2]] == [40, 41]  # the planted direction, its largest loading positive
    np.testing.assert_allclose([v for _, v in first[:2]], [0.8, -0.6], atol=0.02)
    examples = run_named(con, "pca-examples", {"layer": "1", "k": "6"}).to_pylist()
    pos = extremes(want.scores[:, 0], 6)[0]
    assert [e["tok"] for e in examples] == pos.tolist() and [e["rank"] for e in examples] == list(range(1, 7))
    assert all("«" in e["context"] and e["token"] for e in examples)
    low = run_named(con, "pca-examples", {"layer": "1", "sign": "negative", "component": "2"}).to_pylist()
    assert [e["tok"] for e in low] == extremes(want.scores[:, 1], 6)[1].tolist()
    loads = con.execute("SELECT neuron, loading FROM pca_loadings WHERE layer = 1 AND component = 1 ORDER BY rank").fetchall()
    assert [n for n, _ in loads] == np.argsort(-np.abs(want.components[0]), kind="stable")[:5].tolist()


def test_cofire_on_a_store(small, capsys):
    store, _, x = small
    assert mine(store, "cofire", "--threshold", "0.4", "--pairs", "10", "--min-both", "3") == 0
    out = capsys.readouterr().out
    assert "blocks.0.mlp.hook_post" in out and "best 5 & 23" in out
    con = connect(store)
    pairs = run_named(con, "cofiring", {"layer": "1", "limit": "10"}).to_pylist()
    want = cofiring(firing(x, 0.9), 10, 0.4, 3)
    assert [(p["neuron_a"], p["neuron_b"]) for p in pairs] == list(zip(want.a.tolist(), want.b.tolist()))
    assert pairs[0]["corr"] > 0.5 and pairs[0]["n"] == len(x)
    assert all(5 in (p["neuron_a"], p["neuron_b"]) for p in run_named(con, "cofiring", {"neuron": "5"}).to_pylist())
    groups = run_named(con, "cofire-groups", {"layer": "1"}).to_pylist()
    assert groups[0]["group"] == 1 and groups[0]["neurons"] == [5, 23, 31] and groups[0]["size"] == 3
    assert con.execute("SELECT count(DISTINCT layer) FROM cofiring").fetchall() == [(2,)]  # both dense hooks


def test_every_new_query_is_listed(capsys):
    assert main(["queries"]) == 0
    out = capsys.readouterr().out
    for name in ("regex-neurons", "pca-components", "pca-examples", "cofiring", "cofire-groups"):
        assert name in out


@pytest.mark.parametrize("args, message", [
    (["regex", "("], r"regex '\(' is not a valid Python regular expression"),
    (["regex", "zebra"], "matches no densely sampled token"),
    (["regex", "x", "--hook", "blocks.9.attn.hook_z"], "--hook blocks.9.attn.hook_z: no dense activations for it"),
    (["pca", "--components", "999"], "blocks.0.mlp.hook_post: --components 999: must be between 1 and 16"),
    (["cofire", "--threshold", "2"], "--threshold 2.0: a Jaccard index"),
])
def test_bad_input_is_one_line(small, capsys, args, message):
    store = small[0]
    before = sorted(p.name for p in store.iterdir())
    assert mine(store, *args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and re.search(message, err), err
    assert sorted(p.name for p in store.iterdir()) == before  # nothing written


def test_store_without_dense_activations(tmp_path, capsys):
    store = build_store(tmp_path)[0]
    shutil.rmtree(store / "activations.zarr")
    with pytest.raises(UserError, match="no regex_neurons table; run `mine analyze STORE regex PATTERN`"):
        run_named(connect(store), "regex-neurons", {})
    assert mine(store, "pca") == 2
    assert "has no dense activations; mine with `dense:" in capsys.readouterr().err
    assert mine(tmp_path / "nowhere", "cofire") == 2
    assert "not a complete store" in capsys.readouterr().err


# ---------------------------------------------------------------- SmolLM2, mined for real


JOB = """
name: analyze
model: {id: smollm2-135m}
corpus: {source: "builtin:python-stdlib", max_tokens: 1000, context_length: 64}
hooks: ["blocks.4.mlp.hook_post"]
stats: {top_k: 8}
dense: {hooks: ["blocks.4.mlp.hook_post"], token_fraction: 1.0}
compute: {actors: 1, cpus_per_actor: 1, batch_size: 8, shard_tokens: 500}
"""


@pytest.mark.slow
@pytest.mark.ray
def test_smollm2_digit_neurons(tmp_path, capsys):
    (tmp_path / "job.yaml").write_text(JOB)
    store = tmp_path / "store"
    assert main(["run", str(tmp_path / "job.yaml"), "--store", str(store), "--no-progress"]) == 0
    assert mine(store, "regex", r"\d") == 0
    con = connect(store)
    top = run_named(con, "regex-neurons", {"pattern": r"\d", "limit": "3"}).to_pylist()
    assert top[0]["layer"] == 4 and top[0]["corr"] > 0.3 and top[0]["n"] > 900 and top[0]["matches"] > 20
    # the best neuron's strongest tokens over the whole corpus are digits
    tokens = top[0]["top_tokens"].split(" | ")
    assert sum(any(c.isdigit() for c in t) for t in tokens) >= 4, tokens
    assert mine(store, "pca", "--components", "3", "--examples", "5") == 0
    assert mine(store, "cofire", "--pairs", "20") == 0
    con = connect(store)  # a connection's views are those of the tables present when it opened
    comps = run_named(con, "pca-components", {}).to_pylist()
    assert len(comps) == 3 and comps[0]["explained_variance_ratio"] >= comps[2]["explained_variance_ratio"] > 0
    assert len(run_named(con, "pca-examples", {"k": "5"}).to_pylist()) == 5
    pairs = run_named(con, "cofiring", {"limit": "5"}).to_pylist()
    assert len(pairs) == 5 and all(0 < p["jaccard"] <= 1 and p["both"] >= 5 for p in pairs)


def test_pca_keeps_as_many_components_as_a_narrow_hook_has(tmp_path, capsys):
    """Without --components, a hook of 6 neurons (a mixture of experts' routing, say) keeps 6, not the default 10,
    which stays the limit where there are more; an explicit number too many is still refused."""
    store, _, _ = build_store(tmp_path)
    n = pq.read_metadata(store / "tokens" / "shard-00000.parquet").num_rows
    toks = np.arange(n)
    write_dense_shard(store / "activations.zarr" / "blocks.2.mlp.hook_expert_weights" / "shard-00000", toks,
                      np.random.default_rng(0).random((n, 6)).astype(np.float16))
    assert mine(store, "pca", "--hook", "blocks.2.mlp.hook_expert_weights") == 0
    assert "6 components explain" in capsys.readouterr().out
    assert mine(store, "pca", "--hook", "blocks.1.mlp.hook_post") == 0
    assert "10 components explain" in capsys.readouterr().out
    assert mine(store, "pca", "--hook", "blocks.2.mlp.hook_expert_weights", "--components", "7") == 2
