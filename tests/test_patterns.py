"""attn.hook_pattern mined end to end: `mine run` on a local Ray cluster over SmolLM2-135M's real weights, the store
checked against the attention patterns the model itself returns (eager attention, output_attentions=True), context
by context. Feature h * context_length + k of a token is head h's attention from it to key position k."""

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch

from mining.cli import main
from mining.query import connect, run_named

N_CTX, HEADS, LAYERS, TOKENS = 32, 9, (0, 5), 600
JOB = f"""
name: patterns
model: {{id: smollm2-135m}}
corpus: {{source: "builtin:python-docs", max_tokens: {TOKENS}, context_length: {N_CTX}}}
hooks: ["blocks.0.attn.hook_pattern", "blocks.5.attn.hook_pattern", "blocks.5.mlp.hook_post"]
stats: {{top_k: 4, quantile_samples: 2, dla: true}}
dense: {{hooks: ["blocks.5.attn.hook_pattern"], token_fraction: 0.2}}
compute: {{actors: 1, cpus_per_actor: 1, batch_size: 4, shard_tokens: 300}}
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("patterns")
    job = root / "job.yaml"
    job.write_text(JOB)
    assert main(["run", str(job), "--store", str(root / "store"), "--no-progress"]) == 0
    return root / "store"


@pytest.fixture(scope="module")
def brute(store, smollm2):
    """Every mined token's pattern rows (tokens, heads * N_CTX) per layer, each context alone, keys zero-padded."""
    from mining.hooks import eager_attention

    tokens = ds.dataset(store / "tokens").to_table().sort_by("tok").to_pandas()
    rows = {layer: [] for layer in LAYERS}
    with torch.inference_mode(), eager_attention(smollm2.model):
        for _, group in tokens.groupby("ctx", sort=True):
            assert group.pos.tolist() == list(range(1, len(group) + 1))  # BOS at 0, every other token mined
            ids = torch.tensor([[0] + group.token_id.tolist()])  # <|endoftext|> BOS, as the alias prepends
            attentions = smollm2.model(ids, output_attentions=True).attentions
            for layer in LAYERS:
                a = attentions[layer][0, :, 1:].transpose(0, 1)  # (queries, heads, keys)
                padded = torch.zeros(a.shape[0], HEADS, N_CTX)
                padded[..., :a.shape[-1]] = a
                rows[layer].append(padded.flatten(1).numpy())
    return tokens, {layer: np.concatenate(r) for layer, r in rows.items()}


@pytest.mark.slow
@pytest.mark.ray
def test_top_examples_and_moments_are_the_models_attention(store, brute):
    tokens, rows = brute
    assert len(tokens) == TOKENS
    top = pq.read_table(store / "top_examples.parquet").to_pandas()
    neurons = pq.read_table(store / "neurons.parquet").to_pandas()
    top, neurons = (t[t.hook == "attn.hook_pattern"] for t in (top, neurons))
    assert len(neurons) == len(LAYERS) * HEADS * N_CTX
    for layer in LAYERS:
        a = rows[layer]
        np.testing.assert_allclose(a.reshape(-1, HEADS, N_CTX).sum(-1), 1.0, rtol=1e-5)  # each head's row sums to 1
        for head, key in ((0, 0), (3, 1), (8, 5), (4, N_CTX - 1)):
            neuron = head * N_CTX + key
            col = a[:, neuron]
            mine = top[(top.layer == layer) & (top.neuron == neuron)].sort_values("rank")
            np.testing.assert_allclose(mine.value, np.sort(col)[::-1][:4], rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(col[mine.tok.to_numpy()], mine.value, rtol=1e-4, atol=1e-5)
            row = neurons[(neurons.layer == layer) & (neurons.neuron == neuron)].iloc[0]
            assert row["count"] == TOKENS and row["max"] == pytest.approx(col.max(), rel=1e-4, abs=1e-6)
            assert row["mean"] == pytest.approx(col.mean(), rel=1e-3, abs=1e-6)
            # a key after the query is masked: attention exactly 0, never "active"
            assert row["frac_active"] == pytest.approx((col > 0).mean(), abs=2 / TOKENS)


@pytest.mark.slow
@pytest.mark.ray
def test_dense_sample_is_the_pattern(store, brute):
    from mining.dense import read_dense

    _, rows = brute
    toks, values = read_dense(store, "blocks.5.attn.hook_pattern")
    assert 50 < len(toks) < 250 and values.shape[1] == HEADS * N_CTX
    np.testing.assert_allclose(values.astype(np.float32), rows[5][toks], rtol=2e-3, atol=1e-3)


@pytest.mark.slow
@pytest.mark.ray
def test_offsets_rank_the_previous_token_heads_of_the_corpus(store, brute):
    """`mine analyze STORE offsets` reads the dense pattern sample by distance: head h's mean attention to the token
    d back over the sampled tokens, here against the model's own patterns of those tokens."""
    from mining.dense import read_dense

    tokens, rows = brute
    assert main(["analyze", str(store), "offsets", "--max-offset", "4"]) == 0
    toks, _ = read_dense(store, "blocks.5.attn.hook_pattern")
    pos = tokens.set_index("tok").loc[toks, "pos"].to_numpy()
    a = rows[5][toks].reshape(len(toks), HEADS, N_CTX)
    con = connect(store)
    got = run_named(con, "pattern-offsets", {"limit": "50"}).to_pylist()
    table = con.execute("SELECT head, distance, mean, n FROM pattern_offsets ORDER BY head, distance").fetchall()
    con.close()
    assert len(table) == HEADS * 5
    for head, d, mean, n in table:
        seen = pos >= d
        assert n == seen.sum()
        assert mean == pytest.approx(a[seen, head, pos[seen] - d].mean(), rel=2e-3, abs=1e-4)
    previous = np.array([a[np.arange(len(toks)), h, pos - 1].mean() for h in range(HEADS)])  # distance 1
    assert sorted(r["head"] for r in got) == list(range(HEADS))
    assert [r["mean"] for r in got] == sorted((r["mean"] for r in got), reverse=True)  # ranked, highest first
    np.testing.assert_allclose([r["mean"] for r in got], previous[[r["head"] for r in got]], rtol=2e-3, atol=1e-4)


@pytest.mark.slow
@pytest.mark.ray
def test_named_queries_over_patterns(store, brute):
    """The named queries take the pattern as any other hook; pattern-heads ranks heads by their mean attention to
    one key position (0: the BOS sink) over the mined tokens."""
    _, rows = brute
    con = connect(store)
    best = run_named(con, "top-activations", {"hook": "attn.hook_pattern", "layer": "5",
                                              "neuron": str(2 * N_CTX)}).to_pylist()
    assert best and best[0]["value"] == pytest.approx(rows[5][:, 2 * N_CTX].max(), rel=1e-4)
    sinks = run_named(con, "pattern-heads", {"context_length": str(N_CTX), "layer": "5"}).to_pylist()
    second = run_named(con, "pattern-heads", {"context_length": str(N_CTX), "key": "1", "limit": "50"}).to_pylist()
    con.close()
    want = rows[5].reshape(-1, HEADS, N_CTX)[..., 0].mean(0)
    assert [r["head"] for r in sinks] == list(np.argsort(-want, kind="stable"))
    np.testing.assert_allclose([r["mean"] for r in sinks], np.sort(want)[::-1], rtol=1e-3, atol=1e-6)
    assert len(second) == len(LAYERS) * HEADS and {r["layer"] for r in second} == set(LAYERS)
    top = second[0]
    assert top["max_token_attention"] == pytest.approx(rows[top["layer"]][:, top["head"] * N_CTX + 1].max(), rel=1e-4)


@pytest.mark.slow
@pytest.mark.ray
def test_a_diff_job_finds_the_head_whose_attention_changed(tmp_path, smol_tokenizer):
    """Two tiny Llamas, B's head 0 of layer 1 with its queries scaled (a sharper pattern): neuron-diff over
    attn.hook_pattern ranks that head's features first, and no other head's changes at all."""
    from mining.tiny import tiny_model

    a, b = tiny_model("llama", vocab_size=len(smol_tokenizer)), tiny_model("llama", vocab_size=len(smol_tokenizer))
    d_head = a.config.hidden_size // a.config.num_attention_heads
    with torch.no_grad():
        b.model.layers[1].self_attn.q_proj.weight[:d_head] *= 4
    for name, model in (("A", a), ("B", b)):
        model.save_pretrained(tmp_path / name)
        smol_tokenizer.save_pretrained(tmp_path / name)
    job = tmp_path / "job.yaml"
    job.write_text(f"""
name: pattern-diff
models: {{a: {{id: "{tmp_path / 'A'}"}}, b: {{id: "{tmp_path / 'B'}"}}}}
corpus: {{source: "builtin:python-docs", max_tokens: 500, context_length: 32}}
hooks: ["blocks.*.attn.hook_pattern"]
stats: {{top_k: 4}}
compute: {{actors: 1, batch_size: 4, shard_tokens: 250}}
""")
    assert main(["run", str(job), "--store", str(tmp_path / "store"), "--no-progress"]) == 0
    con = connect(tmp_path / "store")
    ranked = run_named(con, "neuron-diff", {"hook": "attn.hook_pattern", "limit": "5"}).to_pylist()
    moved = con.execute("SELECT DISTINCT layer, neuron // 32 AS head FROM neuron_diff "
                        "WHERE mean_abs_diff > 0 ORDER BY ALL").fetchall()
    con.close()
    assert [(r["layer"], r["neuron"] // 32) for r in ranked] == [(1, 0)] * 5
    assert moved == [(1, 0)]


@pytest.mark.slow
@pytest.mark.ray
def test_the_viewer_names_a_pattern_feature_by_its_head_and_key(store, tmp_path):
    import re

    assert main(["export", str(store), "--format", "html", "--hook", "attn.hook_pattern", "--neuron",
                 f"5:{2 * N_CTX + 3}", "--out", str(tmp_path / "view")]) == 0
    page = (tmp_path / "view" / "neurons" / f"attn.hook_pattern-5-{2 * N_CTX + 3}.html").read_text()
    stats = re.search(r'<table[^>]*id="stats".*?</table>', page, re.S).group(0)
    names = re.findall(r'data-key="(\w+)"', stats)
    cells = re.findall(r"<td[^>]*>([^<]*)</td>", stats)
    assert dict(zip(names, cells))["head"] == "2" and dict(zip(names, cells))["key"] == "3"


def test_a_job_whose_statistics_would_not_fit_is_refused_in_one_line(tmp_path, smol_tokenizer, monkeypatch):
    """An attention pattern is heads x context_length wide a layer: the job's statistics (3.8 KB a feature with the
    default stats, measured) must fit a quarter of the driver's memory, else one line says what to cut."""
    import mining.diff
    from mining.errors import UserError
    from mining.runner import validate
    from mining.spec import spec_from_dict
    from mining.tiny import tiny_model

    tiny_model("llama", vocab_size=len(smol_tokenizer)).save_pretrained(tmp_path)
    smol_tokenizer.save_pretrained(tmp_path)
    spec = spec_from_dict({"name": "wide", "model": {"id": str(tmp_path)},
                           "corpus": {"source": "builtin:python-docs", "context_length": 128},
                           "hooks": ["blocks.*.mlp.hook_post", "blocks.*.attn.hook_pattern"]})
    features = 2 * 64 + 2 * 4 * 128  # two layers of 64 neurons and of 4 heads x 128 keys
    monkeypatch.setattr(mining.diff, "machine_memory", lambda: 4 * features * 3000)  # a quarter: 3 KB a feature
    with pytest.raises(UserError, match=r"^hooks: the job's statistics take about .*1,152 features, "
                                        r"blocks.0.attn.hook_pattern alone 512 wide.*shorten corpus.context_length"):
        validate(spec)
    monkeypatch.setattr(mining.diff, "machine_memory", lambda: 4 * features * 5000)
    validate(spec)


def test_the_bytes_a_feature_takes_are_measured_with_every_statistic_on():
    """The probe runs each reducer a job's stats turn on (polysemanticity's groups too) and counts its state."""
    from mining.engine import state_bytes_per_feature
    from mining.spec import spec_from_dict

    def per_feature(stats: dict) -> float:
        return state_bytes_per_feature(spec_from_dict({
            "name": "probe", "model": {"id": "smollm2-135m"}, "hooks": ["blocks.*.mlp.hook_post"],
            "corpus": {"source": "builtin:python-docs", "context_length": 8}, "stats": stats}))

    plain = per_feature({})
    every = per_feature({"quantile_samples": 8, "polysemanticity": True, "token_groups": 16, "dla": True,
                         "histogram": True, "moments": True})
    assert 3000 < plain < every
    assert per_feature({"histogram": False}) < plain / 2  # most of it is the histogram's counts
