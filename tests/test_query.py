"""The query layer against a brute-force synthetic store: views, macros, named queries, sandbox, formats."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from mining.errors import UserError
from mining.query import (Param, connect, convert_param, format_table, list_named, load_named, run_named, run_sql,
                          write_result)
from synthetic_store import HOOKS, bin_edges, bin_index, context_peaks, load_activations, make_synthetic_store, ranked

K = 5
QS = (0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999, 1)
TABLES = {"docs", "tokens", "neurons", "histograms", "top_examples", "bottom_examples", "top_contexts", "manifest",
          "neuron_variance", "neuron_coherence"}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_synthetic_store(tmp_path_factory.mktemp("q"), n_tokens=3000, k=K)


@pytest.fixture(scope="module")
def con(store):
    c = connect(store)
    yield c
    c.close()


@pytest.fixture(scope="module")
def acts(store) -> dict[str, np.ndarray]:
    return load_activations(store)


@pytest.fixture(scope="module")
def tokens(store) -> pa.Table:
    return pa.concat_tables(pq.read_table(p) for p in sorted((store / "tokens").glob("*.parquet"))).sort_by("tok")


def neurons_of(acts):
    for hook in HOOKS:
        _, n_layers, n_neurons = acts[hook].shape
        for layer in range(n_layers):
            for n in range(n_neurons):
                yield hook, layer, n, acts[hook][:, layer, n].astype(np.float64)


def expected_context(tokens: pa.Table, tok: int, window: int = 12) -> str:
    ctx, pos, text = tokens["ctx"].to_numpy(), tokens["pos"].to_numpy(), tokens["token"].to_pylist()
    near = np.nonzero((ctx == ctx[tok]) & (np.abs(pos - pos[tok]) <= window))[0]
    return "".join(f"«{text[i]}»" if i == tok else text[i] for i in near[np.argsort(pos[near])])


def expected_quantile(x: np.ndarray, q: float) -> tuple[float, float, float] | None:
    """(estimate by the rule, true order statistic, half-width of its clamped bin); None when x is empty."""
    if len(x) == 0:
        return None
    lo_edges, hi_edges = bin_edges()
    xs = np.sort(x)
    if q <= 0:
        return xs[0], xs[0], 0.0
    if q >= 1:
        return xs[-1], xs[-1], 0.0
    true = xs[max(1, math.ceil(q * len(xs))) - 1]
    b = bin_index(np.array([true]))[0]
    lo, hi = max(lo_edges[b], x.min()), min(hi_edges[b], x.max())
    assert lo <= true <= hi
    est = 0.0 if lo_edges[b] == hi_edges[b] == 0 else (lo + hi) / 2
    return est, true, (hi - lo) / 2


def expected_firing(x: np.ndarray, q: float):
    """Firing-only rule: the zero bin and negatives are left out; q >= 1 gives the max; bins clamp to [min, max]."""
    f = x[x > 0]
    if len(f) == 0:
        return None
    if q >= 1:
        return f.max()
    true = np.sort(f)[max(1, math.ceil(q * len(f))) - 1]
    lo_edges, hi_edges = bin_edges()
    b = bin_index(np.array([true]))[0]
    lo, hi = max(lo_edges[b], x.min()), min(hi_edges[b], x.max())
    return (lo + hi) / 2


# ---------------------------------------------------------------- views


def test_views_for_every_table_and_none_for_private_dirs(con):
    views = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
    assert views == TABLES
    assert con.execute("SELECT count(*), count(DISTINCT shard) FROM tokens").fetchall()[0] == (3000, 2)


def test_future_tables_get_views_generically(store, tmp_path):
    s = tmp_path / "store"
    shutil.copytree(store, s)
    extra = pa.table({"layer": pa.array([0, 1], pa.int32()), "x": [1.0, 2.0]})
    pq.write_table(extra, s / "quantile_samples.parquet")
    (s / "heads").mkdir()
    pq.write_table(extra, s / "heads" / "part-0.parquet")
    (s / "dla_examples" / "layer=7").mkdir(parents=True)
    pq.write_table(extra.drop(["layer"]), s / "dla_examples" / "layer=7" / "part-0.parquet")
    (s / "_private").mkdir()
    pq.write_table(extra, s / "_private" / "x.parquet")
    (s / "empty_dir").mkdir()
    c = connect(s)
    views = {r[0] for r in c.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
    assert views == TABLES | {"quantile_samples", "heads", "dla_examples"}
    assert run_sql(c, "SELECT sum(x) AS s FROM heads").to_pylist() == [{"s": 3.0}]
    rows = run_sql(c, "SELECT layer, typeof(layer) AS t FROM dla_examples").to_pylist()
    assert rows[0]["layer"] == 7 and rows[0]["t"] == "INTEGER"


def test_incomplete_store_is_refused(store, tmp_path):
    s = tmp_path / "store"
    shutil.copytree(store, s)
    (s / "manifest.parquet").unlink()
    with pytest.raises(UserError, match="not a complete store"):
        connect(s)
    with pytest.raises(UserError, match="not a complete store"):
        connect(tmp_path / "nowhere")


def test_store_without_histograms_still_answers(store, tmp_path):
    s = tmp_path / "store"
    shutil.copytree(store, s)
    (s / "histograms.parquet").unlink()
    c = connect(s)
    assert run_named(c, "top-activations", {"layer": "0", "neuron": "0", "k": "2"}).num_rows == 2
    with pytest.raises(UserError):
        run_named(c, "quantiles", {"layer": "0", "neuron": "0"})


# ---------------------------------------------------------------- examples


@pytest.mark.parametrize("name", ["top-activations", "bottom-activations", "top-contexts"])
def test_examples_match_brute_force(con, acts, tokens, name):
    ctx = tokens["ctx"].to_numpy()
    for hook, layer, n, x in neurons_of(acts):
        if (layer + n) % 3:  # a third of the neurons keeps the test fast; every shape kind still appears
            continue
        got = run_named(con, name, {"layer": str(layer), "neuron": str(n), "hook": hook, "k": "4"}).to_pylist()
        x32 = x.astype(np.float32)
        if name == "top-contexts":
            peaks = context_peaks(x32, ctx)
            want = peaks[ranked(x32[peaks], 4, True)]
        else:
            want = ranked(x32, 4, name == "top-activations")
        assert [r["rank"] for r in got] == [1, 2, 3, 4]
        assert [r["tok"] for r in got] == want.tolist(), (hook, layer, n)
        assert [r["value"] for r in got] == x32[want].tolist()
        for r in got:
            assert r["token"] == tokens["token"][r["tok"]].as_py()
            assert r["context"] == expected_context(tokens, r["tok"])
            assert f"«{r['token']}»" in r["context"]


def test_tok_context_window_stays_in_context(con, tokens):
    first_of_ctx1 = int(np.nonzero(tokens["ctx"].to_numpy() == 1)[0][0])
    text = con.execute("SELECT tok_context($t, 2)", {"t": first_of_ctx1}).fetchall()[0][0]
    assert text == expected_context(tokens, first_of_ctx1, 2) and text.startswith("«")


def test_tok_contexts_in_one_scan_equal_tok_context_per_token(con, tokens):
    ctx = tokens["ctx"].to_numpy()
    edges = [int(np.nonzero(ctx == c)[0][i]) for c in (0, 1) for i in (0, -1)]  # first and last of contexts
    picks = sorted(set(edges + list(np.random.default_rng(3).choice(len(ctx), 25, replace=False).tolist())))
    rows = con.execute("SELECT tok, doc_id, pos, token, context FROM tok_contexts($toks, 4) ORDER BY tok",
                       {"toks": picks}).fetchall()
    assert [r[0] for r in rows] == picks
    for tok, doc_id, pos, token, context in rows:
        assert context == expected_context(tokens, tok, 4)
        assert (doc_id, pos, token) == (tokens["doc_id"][tok].as_py(), tokens["pos"][tok].as_py(),
                                        tokens["token"][tok].as_py())


# ---------------------------------------------------------------- quantiles


def test_quantile_macros_match_the_rule_for_every_neuron(con, acts):
    for q in QS:
        got = {(r["hook"], r["layer"], r["neuron"]): r for r in run_sql(
            con, "SELECT * FROM neuron_quantiles($h, -1, $q)", {"h": HOOKS[0], "q": q}).to_pylist()}
        got.update({(r["hook"], r["layer"], r["neuron"]): r for r in run_sql(
            con, "SELECT * FROM neuron_quantiles($h, -1, $q)", {"h": HOOKS[1], "q": q}).to_pylist()})
        for hook, layer, n, x in neurons_of(acts):
            est, true, half = expected_quantile(x, q)
            row = got[(hook, layer, n)]
            assert row["value"] == pytest.approx(est, rel=1e-12, abs=1e-15), (hook, layer, n, q)
            assert abs(row["value"] - true) <= half * (1 + 1e-12) + 1e-15
            if q in (0, 1):
                assert row["value"] == true
            firing = expected_firing(x, q)
            if firing is None:
                assert row["value_firing"] is None
            else:
                assert row["value_firing"] == pytest.approx(firing, rel=1e-12, abs=1e-15), (hook, layer, n, q)


def test_quantiles_query(con, acts):
    for hook, layer, n, x in neurons_of(acts):
        if hook != HOOKS[0] or n % 2:
            continue
        rows = run_named(con, "quantiles", {"layer": str(layer), "neuron": str(n)}).to_pylist()
        assert [r["q"] for r in rows] == list(map(float, QS))
        for r in rows:
            est, true, half = expected_quantile(x, r["q"])
            assert r["value"] == pytest.approx(est, rel=1e-12, abs=1e-15)
            assert r["frac_of_max"] == pytest.approx(r["q"] * x.max())
            firing = expected_firing(x, r["q"])
            assert (r["value_firing"] is None) == (firing is None)
    scalar = con.execute("SELECT neuron_quantile($h, 1, 4, 0.3), neuron_frac_of_max($h, 1, 4, 1.0)",
                         {"h": HOOKS[0]}).fetchall()[0]
    x = acts[HOOKS[0]][:, 1, 4].astype(np.float64)
    assert scalar[0] == pytest.approx(expected_quantile(x, 0.3)[0])
    assert scalar[1] == pytest.approx(1 / x.max())
    assert run_named(con, "quantiles", {"layer": "9", "neuron": "0"}).num_rows == 0  # no such neuron


def test_neuron_summary(con, acts):
    x = acts[HOOKS[1]][:, 0, 2].astype(np.float64)
    (row,) = run_named(con, "neuron-summary", {"layer": "0", "neuron": "2", "hook": HOOKS[1]}).to_pylist()
    assert row["count"] == len(x) and row["max"] == x.max() and row["mean"] == pytest.approx(x.mean())
    for col, q in (("p01", .01), ("p10", .1), ("p25", .25), ("p50", .5), ("p75", .75), ("p90", .9), ("p99", .99)):
        assert row[col] == pytest.approx(expected_quantile(x, q)[0]), col
    assert row["firing_p50"] == pytest.approx(expected_firing(x, 0.5))
    assert row["firing_p90"] == pytest.approx(expected_firing(x, 0.9))


# ---------------------------------------------------------------- neuron lists


def _kurtosis(x):
    s = x.std()
    return None if s == 0 else float((((x - x.mean()) / s) ** 4).mean() - 3)


def test_heavy_tailed_order(con, acts):
    want = sorted(((k, layer, n) for hook, layer, n, x in neurons_of(acts)
                   if hook == HOOKS[0] and (k := _kurtosis(x)) is not None), key=lambda t: (-t[0], t[1], t[2]))
    got = run_named(con, "heavy-tailed", {"limit": "6"}).to_pylist()
    assert [(r["layer"], r["neuron"]) for r in got] == [(layer, n) for _, layer, n in want[:6]]
    assert got[0]["kurtosis"] == pytest.approx(want[0][0])
    x = {(layer, n): x for hook, layer, n, x in neurons_of(acts) if hook == HOOKS[0]}
    assert [(r["min"], r["max"]) for r in got] == [pytest.approx((x[r["layer"], r["neuron"]].min(),
                                                                  x[r["layer"], r["neuron"]].max())) for r in got]
    one = run_named(con, "heavy-tailed", {"layer": "1", "limit": "100"}).to_pylist()
    assert {r["layer"] for r in one} == {1} and len(one) == sum(1 for k, layer, _ in want if layer == 1)


def test_dead_and_dense(con, acts):
    rows = run_named(con, "dead-and-dense", {"hook": HOOKS[1]}).to_pylist()
    frac = {(layer, n): (x > 0).mean() for hook, layer, n, x in neurons_of(acts) if hook == HOOKS[1]}
    assert {(r["layer"], r["neuron"]) for r in rows if r["kind"] == "dead"} == {k for k, f in frac.items() if f == 0}
    assert {(r["layer"], r["neuron"]) for r in rows if r["kind"] == "dense"} == {k for k, f in frac.items() if f >= .99}
    assert len(run_named(con, "dead-and-dense", {"hook": HOOKS[1], "limit": "1"})) == 2  # limit per kind


def test_neuron_index(con, acts):
    rows = run_named(con, "neuron-index", {}).to_pylist()
    assert [(r["layer"], r["neuron"]) for r in rows] == [(layer, n) for layer in range(2) for n in range(8)]
    x = acts[HOOKS[0]][:, 1, 6].astype(np.float64)
    assert rows[14]["p50"] == pytest.approx(expected_quantile(x, 0.5)[0])
    assert len(run_named(con, "neuron-index", {"layer": "1", "limit": "3"})) == 3


def test_invariants_hold_and_catch_a_broken_store(con, store, tmp_path):
    assert run_named(con, "invariants", {}).num_rows == 0
    s = tmp_path / "store"
    shutil.copytree(store, s)
    hist = pq.read_table(s / "histograms.parquet")
    counts = hist["count"].to_numpy().copy()
    counts[0] += 1
    pq.write_table(hist.set_column(hist.schema.get_field_index("count"), "count", pa.array(counts)),
                   s / "histograms.parquet")
    top = pq.read_table(s / "top_examples.parquet")
    pq.write_table(top.slice(1), s / "top_examples.parquet")  # neuron 0's rank 1 goes missing
    problems = {r["problem"] for r in run_named(connect(s), "invariants", {}).to_pylist()}
    assert problems == {"histogram counts do not sum to count", "top_examples rank gap or duplicate"}


def test_every_named_query_runs_with_defaults(con):
    present = {t for t in TABLES}
    for q in list_named():
        params = {p.name: "1" for p in q.params if p.default is None}
        if set(q.requires) <= present:
            assert isinstance(run_named(con, q.name, params), pa.Table)
        else:  # a table only some jobs write: one line that says how to get it
            with pytest.raises(UserError, match="this store has no .* table; (mine with|run `mine analyze|mine a diff job)"):
                run_named(con, q.name, params)


def test_top_activations_on_a_50k_token_store(tmp_path):
    c = connect(make_synthetic_store(tmp_path, n_tokens=50_000, n_layers=1, k=10))
    assert run_named(c, "top-activations", {"layer": "0", "neuron": "2"}).num_rows == 10  # speed: see mine bench


# ---------------------------------------------------------------- named queries: files and errors


def test_list_named_parses_headers():
    queries = {q.name: q for q in list_named()}
    assert {"top-activations", "top-contexts", "bottom-activations", "neuron-summary", "quantiles", "heavy-tailed",
            "dead-and-dense", "neuron-index", "invariants"} <= set(queries)
    top = queries["top-activations"]
    assert top.params == (Param("layer", None), Param("neuron", None), Param("hook", "mlp.hook_post"),
                          Param("k", "10"))
    assert top.purpose and top.path.name == "top-activations.sql"
    assert all(q.purpose for q in queries.values())
    assert not any(q.name.startswith("_") for q in queries.values())


def test_queries_dir_override(tmp_path, monkeypatch, con):
    (tmp_path / "mine.sql").write_text("-- name: mine\n-- purpose: test\n-- param: a = 2\n-- param: b\n"
                                       "SELECT $a * $b AS x\n")
    (tmp_path / "_helpers.sql").write_text("SELECT 1")
    monkeypatch.setenv("MINING_QUERIES_DIR", str(tmp_path))
    assert [q.name for q in list_named()] == ["mine"]
    assert run_named(con, "mine", {"b": "2.5"}).to_pylist() == [{"x": 5.0}]
    assert load_named("mine").params == (Param("a", "2"), Param("b", None))


def test_parameter_conversion():
    assert convert_param("5") == 5 and convert_param("-1") == -1 and convert_param("0.5") == 0.5
    assert convert_param("mlp.hook_post") == "mlp.hook_post"


def test_named_query_errors(con):
    with pytest.raises(UserError, match="missing required parameter neuron"):
        run_named(con, "top-activations", {"layer": "0"})
    with pytest.raises(UserError, match=r"unknown parameter bogus.*layer, neuron, hook, k"):
        run_named(con, "top-activations", {"layer": "0", "neuron": "1", "bogus": "1"})
    with pytest.raises(UserError, match=r"unknown named query 'nope'.*top-activations"):
        run_named(con, "nope", {})
    with pytest.raises(UserError, match=r"^top-activations: parameter layer='zero' is not a number$"):
        run_named(con, "top-activations", {"layer": "zero", "neuron": "1"})
    with pytest.raises(UserError, match="query failed") as e:
        run_sql(con, "SELEC * FROM neurons")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError):
        run_sql(con, "")


# ---------------------------------------------------------------- sandbox


@pytest.mark.parametrize("sql", [
    "SELECT * FROM read_csv('/etc/passwd')",
    "COPY (SELECT 1) TO '/tmp/x.csv'",
    "SET enable_external_access = true",
    "SET allowed_directories = ['/']",
    "SET lock_configuration = false",
    "INSTALL httpfs",
    "LOAD httpfs",
    "ATTACH '/tmp/elsewhere.duckdb' AS e",
    "SELECT * FROM glob('/etc/*')",
])
def test_sandbox_refuses(con, sql):
    with pytest.raises(UserError):
        run_sql(con, sql)
    assert run_sql(con, "SELECT count(*) AS n FROM neurons").to_pylist() == [{"n": 32}]


@pytest.mark.parametrize("sql", [
    "SELECT * FROM read_csv('/etc/passwd')",
    "COPY (SELECT 1) TO '/tmp/x.csv'",
    "SET enable_external_access = true",
    "INSTALL httpfs",
    "ATTACH '/tmp/elsewhere.duckdb' AS e",
])
def test_duckdb_itself_enforces_the_sandbox(con, sql):
    """The statement filter in run_sql is a second line; DuckDB's own settings hold without it."""
    with pytest.raises(duckdb.Error):
        con.execute(sql)


# ---------------------------------------------------------------- output formats


def test_write_result_formats(con, tmp_path, capsys):
    table = run_named(con, "top-activations", {"layer": "0", "neuron": "2", "k": "3"})
    write_result(table, "csv", tmp_path / "a.csv")
    assert pacsv.read_csv(tmp_path / "a.csv")["tok"].to_pylist() == table["tok"].to_pylist()
    write_result(table, "json", tmp_path / "a.json")
    rows = [json.loads(line) for line in (tmp_path / "a.json").read_text().splitlines()]
    assert rows == table.to_pylist()
    write_result(table, "parquet", tmp_path / "sub" / "a.parquet")
    assert pq.read_table(tmp_path / "sub" / "a.parquet").equals(table)
    assert not list(tmp_path.rglob("*.tmp"))
    with pytest.raises(UserError, match="parquet"):
        write_result(table, "parquet", None)
    with pytest.raises(UserError, match="unknown format"):
        write_result(table, "xml", None)

    capsys.readouterr()
    write_result(table, "table")
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["rank", "value", "tok", "doc_id", "pos", "token", "context"]
    assert out.count("«") == 3 and "(3 rows)" in out
    write_result(table, "json")
    assert len(capsys.readouterr().out.splitlines()) == 3


def test_json_has_no_nan_or_infinity(con, capsys):
    write_result(run_sql(con, "SELECT * FROM histograms WHERE isinf(hi) LIMIT 1"), "json")  # an overflow bin
    row = json.loads(capsys.readouterr().out)
    assert row["hi"] is None and row["lo"] == 256.0


def test_table_keeps_the_marked_token_visible():
    long = "word " * 40 + "«peak»" + " word" * 40
    text = format_table(pa.table({"context": [long], "n": [1.23456789]}))
    assert "«peak»" in text and "1.23457" in text and max(len(s) for s in text.splitlines()) < 100


def test_polysemanticity_matches_brute_force(con, store, tokens):
    import collections
    import math

    text = dict(zip(tokens["tok"].to_pylist(), tokens["token"].to_pylist()))
    peaks = collections.defaultdict(list)
    for row in pq.read_table(store / "top_contexts.parquet").to_pylist():
        if row["hook"] == "mlp.hook_post":
            peaks[(row["layer"], row["neuron"])].append(text[row["tok"]])
    rows = run_named(con, "polysemanticity", {"limit": "1000", "by": "entropy"}).to_pylist()
    assert len(rows) == len(peaks)
    for r in rows:
        counts = collections.Counter(peaks[(r["layer"], r["neuron"])])
        n = sum(counts.values())
        entropy = -sum(c / n * math.log2(c / n) for c in counts.values())
        assert r["entropy_bits"] == pytest.approx(entropy, abs=1e-9)
        assert r["distinct_tokens"] == len(counts) and r["purity"] == pytest.approx(max(counts.values()) / n)
    assert [r["entropy_bits"] for r in rows] == sorted((r["entropy_bits"] for r in rows), reverse=True)
    variance = {(r["hook"], r["layer"], r["neuron"]): r for r in pq.read_table(store / "neuron_variance.parquet").to_pylist()}
    for r in rows:
        v = variance[("mlp.hook_post", r["layer"], r["neuron"])]
        assert r["var_token"] == pytest.approx(v["var_token"], nan_ok=True)
        assert r["var_position"] == pytest.approx(v["var_position"], nan_ok=True)
    by_coherence = run_named(con, "polysemanticity", {"limit": "1000"}).to_pylist()  # least coherent first
    assert [r["coherence"] for r in by_coherence] == sorted(r["coherence"] for r in by_coherence)
    with pytest.raises(Exception, match="by must be"):
        run_named(con, "polysemanticity", {"by": "nonsense"})
