"""End to end on SmolLM2-135M's real weights: `mine run` on a local Ray cluster, then the store
checked against a brute-force recomputation with plain transformers forward passes."""

import json
import math
import subprocess
import sys

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch

from mining.cli import main
from mining.query import connect, run_named

pytestmark = [pytest.mark.slow, pytest.mark.ray]

LAYERS = (3, 20)
JOB = """
name: e2e
model: {id: smollm2-135m}
corpus: {source: "builtin:python-docs", max_tokens: 1500, context_length: 64}
hooks: ["blocks.3.mlp.hook_post", "blocks.20.mlp.hook_post"]
stats: {top_k: 8, quantile_samples: 4, dla: true, logit_lens: true, heads: true, gate_cases: true}
dense: {hooks: ["blocks.3.mlp.hook_post"], token_fraction: 0.1}
compute: {actors: 2, cpus_per_actor: 1, batch_size: 4, shard_tokens: 400}
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    job = root / "job.yaml"
    job.write_text(JOB)
    assert main(["run", str(job), "--store", str(root / "store"), "--no-progress"]) == 0
    return root / "store"


@pytest.fixture(scope="module")
def brute(store, smollm2):
    """Every mined token's activations for both layers, recomputed context by context without padding."""
    tokens = ds.dataset(store / "tokens").to_table().sort_by("tok").to_pandas()
    model = smollm2.model
    acts = {layer: [] for layer in LAYERS}
    logprob, entropy = [], []
    grabbed = {}
    handles = [model.model.layers[layer].mlp.down_proj.register_forward_pre_hook(
        lambda mod, args, layer=layer: grabbed.__setitem__(layer, args[0][0])) for layer in LAYERS]
    for layer in LAYERS:  # the gate and up projections' outputs, for the sign cases of gated neurons
        for part in ("gate_proj", "up_proj"):
            handles.append(getattr(model.model.layers[layer].mlp, part).register_forward_hook(
                lambda mod, args, out, key=(layer, part): grabbed.__setitem__(key, out[0])))
    try:
        with torch.inference_mode():
            for ctx, group in tokens.groupby("ctx", sort=True):
                ids = [0] + group.token_id.tolist()  # <|endoftext|> BOS, as the demo alias prepends
                logits = model(torch.tensor([ids])).logits[0].float()
                for layer in LAYERS:
                    acts[layer].append(grabbed[layer][1:].numpy())
                    for part in ("gate_proj", "up_proj"):
                        acts.setdefault((layer, part), []).append(grabbed[(layer, part)][1:].numpy() > 0)
                lsm = torch.log_softmax(logits[1:], -1)
                nxt = ids[2:] + [-1]
                logprob += [float(lsm[i, t]) if t >= 0 else math.nan for i, t in enumerate(nxt)]
                entropy += (-(lsm.exp() * lsm).sum(-1)).tolist()
    finally:
        for h in handles:
            h.remove()
    return tokens, {layer: np.concatenate(a) for layer, a in acts.items()}, np.array(logprob), np.array(entropy)


def test_store_files_and_manifest(store):
    names = {p.name for p in store.iterdir()}
    assert {"job.yaml", "provenance.json", "docs.parquet", "tokens", "neurons.parquet", "histograms.parquet",
            "top_examples.parquet", "bottom_examples.parquet", "top_contexts.parquet", "manifest.parquet",
            "activations.zarr", "_shards"} <= names
    assert not list(store.rglob("*.tmp"))
    manifest = pq.read_table(store / "manifest.parquet").to_pylist()
    assert len(manifest) >= 3 and all(m["status"] == "complete" for m in manifest)
    assert sum(m["tokens"] for m in manifest) == 1500
    prov = json.loads((store / "provenance.json").read_text())
    assert prov["model"]["weights_sha256"] and prov["packages"]["torch"] and len(prov["shards"]) == len(manifest)


def test_top_examples_match_brute_force(store, brute):
    tokens, acts, _, _ = brute
    top = pq.read_table(store / "top_examples.parquet").to_pandas()
    bottom = pq.read_table(store / "bottom_examples.parquet").to_pandas()
    for layer in LAYERS:
        a = acts[layer]
        assert a.shape == (1500, 1536)
        for neuron in (0, 100, 777, 1535, int(a.max(0).argmax())):
            col = a[:, neuron]
            mine = top[(top.layer == layer) & (top.neuron == neuron)].sort_values("rank")
            order = np.lexsort((np.arange(len(col)), -col))[:8]
            np.testing.assert_allclose(mine.value, col[order], rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(col[mine.tok.to_numpy()], mine.value, rtol=1e-4, atol=1e-4)
            low = bottom[(bottom.layer == layer) & (bottom.neuron == neuron)].sort_values("rank")
            np.testing.assert_allclose(low.value, np.sort(col)[:8], rtol=1e-4, atol=1e-4)


def test_moments_and_quantiles_match_brute_force(store, brute):
    _, acts, _, _ = brute
    neurons = pq.read_table(store / "neurons.parquet").to_pandas()
    con = connect(store)
    for layer in LAYERS:
        for neuron in (5, 100, 1000):
            col = acts[layer][:, neuron].astype(np.float64)
            row = neurons[(neurons.layer == layer) & (neurons.neuron == neuron)].iloc[0]
            assert row["count"] == 1500
            z = (col - col.mean()) / col.std()
            np.testing.assert_allclose([row["mean"], row["std"], row["skew"], row["kurtosis"]],
                                       [col.mean(), col.std(), (z ** 3).mean(), (z ** 4).mean() - 3],
                                       rtol=1e-3, atol=1e-5)
            assert row["frac_active"] == pytest.approx((col > 0).mean(), abs=2 / 1500)
            qs = run_named(con, "quantiles", {"layer": str(layer), "neuron": str(neuron)}).to_pylist()
            for q in qs:
                true = np.quantile(col, q["q"], method="inverted_cdf")
                assert abs(q["value"] - true) <= max(abs(true) * 2 ** -5, 2 ** -13) + 1e-4, (layer, neuron, q)


def test_token_table_matches_brute_force(store, brute):
    tokens, _, logprob, entropy = brute
    known = ~np.isnan(logprob)
    assert known.sum() >= 1500 - 30
    np.testing.assert_allclose(tokens.logprob.to_numpy(dtype=float)[known], logprob[known], atol=2e-3)
    np.testing.assert_allclose(tokens.entropy.to_numpy(dtype=float), entropy, atol=2e-3)
    docs = pq.read_table(store / "docs.parquet").to_pandas().set_index("doc_id")
    for row in tokens.sample(50, random_state=0).itertuples():
        assert docs.loc[row.doc_id, "text"][row.char_start:row.char_end] == row.token


def test_dense_sample_is_the_activations(store, brute):
    from mining.dense import read_dense

    tokens, acts, _, _ = brute
    toks, values = read_dense(store, "blocks.3.mlp.hook_post")
    assert 50 < len(toks) < 300 and values.dtype == np.float16
    np.testing.assert_allclose(values.astype(np.float32), acts[3][toks], rtol=2e-3, atol=2e-3)


def test_named_query_cli_marks_the_token(store, capsys):
    assert main(["query", str(store), "--named", "top-activations", "--param", "layer=3", "--param", "neuron=100"]) == 0
    out = capsys.readouterr().out
    assert "«" in out and "»" in out
    rows = run_named(connect(store), "top-activations", {"layer": "3", "neuron": "100"}).to_pylist()
    assert rows[0]["rank"] == 1 and "«" in rows[0]["context"]
    assert run_named(connect(store), "invariants", {}).num_rows == 0


def test_export_replays_activations(store, tmp_path):
    out = tmp_path / "ex.jsonl"
    assert main(["export", str(store), "--neuron", "3:100", "--neuron", "20:5", "--k", "3", "--sets", "top",
                 "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6
    for r in rows:
        assert len(r["tokens"]) == len(r["activations"])
        assert r["activations"][r["peak_index"]] == pytest.approx(r["value"], rel=1e-3, abs=1e-3)
        assert max(r["activations"]) <= r["value"] + 1e-3  # the peak is the context's max for a top example
    assert main(["export", str(store), "--neuron", "3:99999", "--out", str(out)]) == 2


def test_existing_store_is_refused(store, tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(JOB)
    before = sorted(p.name for p in store.iterdir())
    r = subprocess.run([sys.executable, "-m", "mining.cli", "run", str(job), "--store", str(store)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "already exists" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in store.iterdir()) == before


def test_resume_of_a_complete_store_changes_nothing(store, tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(JOB)
    top = (store / "top_examples.parquet").read_bytes()
    assert main(["run", str(job), "--store", str(store), "--resume", "--no-progress"]) == 0
    assert (store / "top_examples.parquet").read_bytes() == top


def test_quantile_band_samples_are_real_activations_in_their_band(store, brute):
    tokens, acts, _, _ = brute
    samples = pq.read_table(store / "quantile_samples.parquet").to_pandas()
    assert set(samples.kind) == {"all", "firing", "frac_max"}
    for layer in LAYERS:
        for neuron in (0, 100, 777):
            col = acts[layer][:, neuron]
            mine = samples[(samples.layer == layer) & (samples.neuron == neuron)]
            assert len(mine) > 0
            np.testing.assert_allclose(mine.value, col[mine.tok.to_numpy()], rtol=1e-4, atol=1e-4)
            assert ((mine.value >= mine.band_lo - 1e-6) & (mine.value <= mine.band_hi + 1e-6)).all()
            every = mine[(mine.kind == "all") & mine.exact]
            for band, group in every.groupby("band"):
                lo, hi = (float(x) / 100 for x in band.split("-"))
                ranks = np.searchsorted(np.sort(col), group.value, side="right") / len(col)
                assert ((ranks >= lo - 0.03) & (ranks <= hi + 0.03)).all(), (layer, neuron, band)


def test_model_tables_logit_lens_and_heads(store):
    lens = pq.read_table(store / "logit_lens.parquet").to_pandas()
    assert len(lens) == len(LAYERS) * 1536 * 2 * 10 and set(lens.sign) == {"boost", "suppress"}
    heads = pq.read_table(store / "heads.parquet").to_pandas()
    assert len(heads) == 30 * 9 and heads.induction.max() > 0.3
    con = connect(store)
    assert run_named(con, "heads", {"limit": "3"}).num_rows == 3
    assert run_named(con, "dla-neurons", {"limit": "3"}).num_rows == 3


def test_gate_sign_cases_match_brute_force(store, brute):
    _, acts, _, _ = brute
    cases = pq.read_table(store / "gate_cases.parquet").to_pandas()
    examples = pq.read_table(store / "gate_case_examples.parquet").to_pandas()
    for layer in LAYERS:
        a, g, u = acts[layer], acts[(layer, "gate_proj")], acts[(layer, "up_proj")]
        for neuron in (0, 100, 1535):
            rows = cases[(cases.layer == layer) & (cases.neuron == neuron)]
            assert rows["count"].sum() == 1500
            for gs, us in (("+", "+"), ("+", "-"), ("-", "+"), ("-", "-")):
                hit = (g[:, neuron] == (gs == "+")) & (u[:, neuron] == (us == "+"))
                row = rows[(rows.gate_sign == gs) & (rows.up_sign == us)].iloc[0]
                assert row["count"] == hit.sum()
                top = examples[(examples.layer == layer) & (examples.neuron == neuron)
                               & (examples.gate_sign == gs) & (examples.up_sign == us)].sort_values("rank")
                if hit.any():
                    vals = a[hit, neuron]
                    best = np.sort(vals)[::-1] if gs == us else np.sort(vals)
                    np.testing.assert_allclose(top.value, best[:len(top)], rtol=1e-4, atol=1e-4)
                    np.testing.assert_allclose(row["mean"], vals.mean(), rtol=1e-3, atol=1e-5)
    con = connect(store)
    shown = run_named(con, "gate-cases", {"layer": "3", "neuron": "100"}).to_pylist()
    tokens = con.execute("SELECT tok, token, doc_id FROM tokens").df().set_index("tok")
    texts = dict(con.execute("SELECT doc_id, text FROM docs").fetchall())
    con.close()
    assert len(shown) == 4
    for r in shown:  # each case's strongest example, shown in its own text around its «token»
        best = examples[(examples.layer == 3) & (examples.neuron == 100) & (examples.gate_sign == r["gate_sign"])
                        & (examples.up_sign == r["up_sign"]) & (examples["rank"] == 1)]
        if len(best):
            tok = int(best.tok.iloc[0])
            assert r["top_value"] == best.value.iloc[0]
            assert "«" + tokens.token[tok] + "»" in r["top_context"]
            assert r["top_context"].replace("«", "").replace("»", "") in texts[tokens.doc_id[tok]]
        else:
            assert r["top_value"] is None and r["top_context"] is None
