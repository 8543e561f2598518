"""`mine export`: example sets with per-token activations (replay checked against a plain forward),
stable ids checked against the documents, neuron selection, the OpenAI and Neuronpedia formats, and
the static site's files (escaping; the browser tests are in test_viewer_browser.py)."""

import gzip
import html
import json
import re

import pyarrow.parquet as pq
import pytest
import torch

from mining.cli import main
from mining.hooks import record
from mining.query import connect, run_sql

pytestmark = [pytest.mark.ray]


def _export(store, out, *args) -> int:
    return main(["export", str(store), "--out", str(out), *args])


@pytest.fixture(scope="module")
def rows(viewer_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("ex") / "ex.jsonl"
    assert _export(viewer_store, out, "--neuron", "0:3", "--neuron", "1:7", "--k", "4", "--per-band", "1",
                   "--random", "3") == 0
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


def test_every_set_with_replayed_activations_matching_the_mined_values(rows):
    sets = {(r["layer"], r["neuron"], r["set"]) for r in rows}
    assert {s for _, _, s in sets} == {"top", "bottom", "band", "random"}
    for r in rows:
        assert len(r["tokens"]) == len(r["activations"]) > 0
        assert r["activations"][r["peak_index"]] == pytest.approx(r["value"], abs=2e-4)
        if r["set"] == "top":  # a top context's peak is its maximum
            assert max(r["activations"]) == pytest.approx(r["value"], abs=2e-4)
        if r["set"] == "bottom":
            assert min(r["activations"]) == pytest.approx(r["value"], abs=2e-4)
    top = [r["value"] for r in rows if r["set"] == "top" and (r["layer"], r["neuron"]) == (0, 3)]
    assert top == sorted(top, reverse=True) and len(top) == 4
    randoms = {(l, n): [r["ctx"] for r in rows if r["set"] == "random" and (r["layer"], r["neuron"]) == (l, n)]
               for l, n in ((0, 3), (1, 7))}
    assert randoms[(0, 3)] == randoms[(1, 7)] and len(set(randoms[(0, 3)])) == 3  # shared, distinct


def test_stable_ids_point_at_the_text(rows, viewer_store):
    con = connect(viewer_store)
    docs = {r["doc_id"]: r["text"] for r in run_sql(con, "SELECT doc_id, text FROM docs").to_pylist()}
    for r in rows:
        assert r["id"] == f"{r['doc_id']}:{r['char_start']}-{r['char_end']}"
        text = docs[r["doc_id"]]
        peak = r["tokens"][r["peak_index"]]
        assert text[r["peak_char_start"]:r["peak_char_end"]].strip() == peak.strip() or "\ufffd" in peak
        assert r["char_start"] <= r["peak_char_start"] < r["peak_char_end"] <= r["char_end"]
        assert r["doc_path"].endswith(".txt")


def test_replay_equals_a_plain_forward(rows, viewer_store):
    from mining.models import load_model, resolve_source
    from mining.shards import special_tokens
    from mining.spec import load_spec

    spec = load_spec(viewer_store / "job.yaml")
    loaded = load_model(spec.model)
    specials = list(special_tokens(loaded.tokenizer, spec.corpus.bos, resolve_source(spec.model).bos).prefix)
    con = connect(viewer_store)
    checked = 0
    for r in rows[:12]:
        ids = run_sql(con, f"SELECT token_id FROM tokens WHERE ctx = {r['ctx']} ORDER BY pos").column(0).to_pylist()
        with torch.inference_mode(), record(loaded.model, [f"blocks.{r['layer']}.mlp.hook_post"]) as got:
            loaded.model(torch.tensor([specials + ids]))
        acts = got[f"blocks.{r['layer']}.mlp.hook_post"][0, len(specials):, r["neuron"]]
        assert acts.tolist() == pytest.approx(r["activations"], abs=1e-4)
        checked += 1
    assert checked == 12


def test_parquet_holds_the_same_rows(viewer_store, rows, tmp_path):
    out = tmp_path / "ex.parquet"
    assert _export(viewer_store, out, "--neuron", "0:3", "--neuron", "1:7", "--k", "4", "--per-band", "1",
                   "--random", "3", "--format", "parquet") == 0
    table = pq.read_table(out).to_pylist()
    assert [(r["id"], r["set"], r["rank"]) for r in table] == [(r["id"], r["set"], r["rank"]) for r in rows]
    assert table[0]["activations"] == pytest.approx(rows[0]["activations"])


def test_selection_by_query_top_and_list(viewer_store, tmp_path, capsys):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert _export(viewer_store, a, "--top", "3", "--by", "max", "--sets", "top", "--k", "1") == 0
    assert _export(viewer_store, b, "--query", "top-neurons", "--param", "by=max", "--param", "limit=3",
                   "--sets", "top", "--k", "1") == 0
    assert a.read_text() == b.read_text()  # deterministic, and the same neurons either way
    chosen = [(json.loads(l)["layer"], json.loads(l)["neuron"]) for l in a.read_text().splitlines()]
    best = run_sql(connect(viewer_store), "SELECT layer, neuron FROM neurons WHERE hook = 'mlp.hook_post' "
                                          "ORDER BY max DESC, layer, neuron LIMIT 3").to_pylist()
    assert chosen == [(r["layer"], r["neuron"]) for r in best]
    capsys.readouterr()
    assert _export(viewer_store, a, "--neuron", "0:9999") == 2
    assert "neuron 0:9999 of mlp.hook_post is not in the store" in capsys.readouterr().err
    assert _export(viewer_store, a) == 2
    assert "no neurons chosen" in capsys.readouterr().err
    assert _export(viewer_store, a, "--query", "heads") == 2  # rows without a neuron column
    assert "no neuron column" in capsys.readouterr().err
    assert _export(viewer_store, a, "--top", "2", "--by", "nonsense") == 2
    assert "by must be one of" in capsys.readouterr().err
    assert _export(viewer_store, a, "--neuron", "0:1", "--sets", "top,everything") == 2


def test_openai_neuron_records(viewer_store, tmp_path):
    out = tmp_path / "openai"
    assert _export(viewer_store, out, "--neuron", "1:7", "--k", "4", "--per-band", "1", "--random", "3",
                   "--format", "openai") == 0
    record_ = json.loads((out / "neurons" / "1" / "7.json").read_text(encoding="utf-8"))
    # the fields of openai/automated-interpretability's NeuronRecord, exactly (its loader refuses others)
    assert set(record_) == {"dataclass_name", "neuron_id", "random_sample", "random_sample_by_quantile",
                            "quantile_boundaries", "mean", "variance", "skewness", "kurtosis",
                            "most_positive_activation_records"}
    assert record_["dataclass_name"] == "NeuronRecord"
    assert record_["neuron_id"] == {"dataclass_name": "NeuronId", "layer_index": 1, "neuron_index": 7}
    for rec in record_["most_positive_activation_records"] + record_["random_sample"]:
        assert set(rec) == {"dataclass_name", "tokens", "activations"} and len(rec["tokens"]) == len(rec["activations"])
    assert len(record_["most_positive_activation_records"]) == 4 and len(record_["random_sample"]) == 3
    bands = record_["random_sample_by_quantile"]
    assert len(bands) == len(record_["quantile_boundaries"]) + 1
    assert record_["quantile_boundaries"] == sorted(record_["quantile_boundaries"])
    ids = json.loads((out / "neurons" / "1" / "7.ids.json").read_text())
    assert len(ids["most_positive_activation_records"]) == 4
    assert [len(b) for b in ids["random_sample_by_quantile"]] == [len(b) for b in bands]
    assert all(":" in i["id"] and "-" in i["id"] for i in ids["random_sample"])


def test_neuronpedia_export(viewer_store, tmp_path):
    out = tmp_path / "np"
    assert _export(viewer_store, out, "--neuron", "0:3", "--neuron", "1:7", "--k", "3", "--format", "neuronpedia",
                   "--model-id", "tiny-llama") == 0
    folder = out / "tiny-llama" / "1-mine"
    features = [json.loads(l) for l in gzip.decompress((folder / "features" / "batch-0.jsonl.gz").read_bytes())
                .decode().splitlines()]
    acts = [json.loads(l) for l in gzip.decompress((folder / "activations" / "batch-0.jsonl.gz").read_bytes())
            .decode().splitlines()]
    assert [f["index"] for f in features] == ["7"] and features[0]["layer"] == "1-mine"
    assert len(features[0]["pos_str"]) == 10 and features[0]["freq_hist_data_bar_heights"]
    required = {"id", "tokens", "index", "layer", "modelId", "maxValue", "maxValueTokenIndex", "minValue",
                "values", "creatorId"}
    for a in acts:
        assert required <= set(a) and a["index"] == "7" and a["modelId"] == "tiny-llama"
        assert len(a["tokens"]) == len(a["values"]) and a["maxValue"] == max(a["values"])
        assert a["dataIndex"].count(":") == 1
    assert len({a["id"] for a in acts}) == len(acts)
    assert (out / "tiny-llama" / "0-mine" / "features" / "batch-0.jsonl.gz").exists()


def test_html_site_escapes_and_replaces_whole(viewer_store, tmp_path):
    out = tmp_path / "site"
    assert _export(viewer_store, out, "--top", "4", "--format", "html", "--heads", "2", "--k", "3") == 0
    pages = list(out.rglob("*.html"))
    assert (out / "index.html").exists() and len(list((out / "neurons").glob("*.html"))) == 4
    assert len(list((out / "heads").glob("*.html"))) == 2
    neuron = next((out / "neurons").glob("*.html")).read_text(encoding="utf-8")
    shown = "".join(html.unescape(re.sub(r"<[^>]+>", "", block))  # the examples' text, as a reader sees it
                    for block in re.findall(r'<div class="toks">(.*?)</div>', neuron, flags=re.S))
    for part in ('<script>alert("x")</script>', '"><img src=x onerror=alert(1)>', "&amp; </textarea>"):
        assert part in shown
    # a character split across byte-level tokens shows once per token: each token's span covers it
    for pattern in (r"(<U\+202E>)+evil(<U\+202C>)+", r"zero(<U\+200B>)+width", "caf(é)+"):
        assert re.search(pattern, shown), pattern
    for p in pages:
        text = p.read_text(encoding="utf-8")
        assert text.count("<script>") == 1  # the viewer's own, nothing from the corpus
        assert "<img" not in text and "\u202e" not in text and "onerror=alert(1)>" not in text
    # a second export replaces the first whole; a foreign non-empty directory is refused
    assert _export(viewer_store, out, "--neuron", "0:1", "--format", "html", "--heads", "0", "--k", "2") == 0
    assert [p.name for p in (out / "neurons").glob("*.html")] == ["mlp.hook_post-0-1.html"]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert _export(viewer_store, foreign, "--neuron", "0:1", "--format", "html") == 2
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_a_tiny_replay_cache_changes_nothing(viewer_store, rows):
    """Results never depend on the replay cache (an export across layers once read evicted entries)."""
    from mining.examples import NeuronId
    from mining.export import ExampleCounts, collect, records
    from mining.replay import Replayer

    con = connect(viewer_store)
    nids = [NeuronId("mlp.hook_post", 0, 3), NeuronId("mlp.hook_post", 1, 7)]
    got = records(con, collect(viewer_store, con, nids, ExampleCounts(k=4, per_band=1, random=3),
                               Replayer(viewer_store, batch_size=3, cache_entries=1)))
    assert [(r["id"], r["set"], r["activations"]) for r in got] == [(r["id"], r["set"], r["activations"]) for r in rows]


def test_replay_on_ray_actors_gives_the_same_examples(viewer_store, rows, tmp_path):
    """`--actors 2`: the contexts split across two Ray actors, each with its own model; same rows."""
    out = tmp_path / "ex.jsonl"
    assert _export(viewer_store, out, "--neuron", "0:3", "--neuron", "1:7", "--k", "4", "--per-band", "1",
                   "--random", "3", "--actors", "2") == 0
    got = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [(r["id"], r["set"], r["rank"]) for r in got] == [(r["id"], r["set"], r["rank"]) for r in rows]
    for a, b in zip(got, rows):
        assert a["activations"] == pytest.approx(b["activations"], abs=1e-5)


def test_a_diff_store_is_refused_in_one_line(viewer_store, tmp_path, capsys):
    import shutil

    store = tmp_path / "store"
    shutil.copytree(viewer_store, store)
    (store / "neurons.parquet").rename(store / "neuron_diff.parquet")  # what a diff store holds instead
    capsys.readouterr()
    assert _export(store, tmp_path / "x.jsonl", "--top", "2") == 2
    assert "a diff store (models a and b) has no per-model neurons table" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()

