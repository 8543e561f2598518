"""Diff jobs (`models: {a, b}`): tiny Llama pairs with a planted difference the diff must find first,
checked against brute force; a permuted copy whose neuron correspondence must be recovered."""

import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from mining.cli import main
from mining.query import connect, run_named
from mining.tiny import tiny_model

pytestmark = [pytest.mark.ray]

SCALED_NEURON, SCALED_HEAD = (0, 7), (1, 2)
JOB = """
name: diff
models: {a: {id: A}, b: {id: B}}
corpus: {source: "builtin:python-docs", max_tokens: 700, context_length: 64}
hooks: ["blocks.*.mlp.hook_post"]
stats: {top_k: 4, neuron_match: true, dla: true}
compute: {actors: 2, batch_size: 4, shard_tokens: 300}
"""


def _save(model, tokenizer, folder):
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pair(tmp_path_factory, smol_tokenizer):
    """A, B = A with one neuron's input rows x3 and one head's output slice x2, and C = A with layer 0's
    MLP neurons permuted (the same function)."""
    root = tmp_path_factory.mktemp("pair")
    a = tiny_model("llama", vocab_size=len(smol_tokenizer))
    b = tiny_model("llama", vocab_size=len(smol_tokenizer))
    layer, neuron = SCALED_NEURON
    with torch.no_grad():
        b.model.layers[layer].mlp.up_proj.weight[neuron] *= 3
        hl, hh = SCALED_HEAD
        d_head = a.config.hidden_size // a.config.num_attention_heads
        b.model.layers[hl].self_attn.o_proj.weight[:, hh * d_head:(hh + 1) * d_head] *= 2
    c = tiny_model("llama", vocab_size=len(smol_tokenizer))
    perm = torch.randperm(a.config.intermediate_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        mlp = c.model.layers[0].mlp
        mlp.gate_proj.weight.copy_(mlp.gate_proj.weight[perm])
        mlp.up_proj.weight.copy_(mlp.up_proj.weight[perm])
        mlp.down_proj.weight.copy_(mlp.down_proj.weight[:, perm])
    return {"tokenizer": smol_tokenizer, "a": _save(a, smol_tokenizer, root / "a"), "b": _save(b, smol_tokenizer, root / "b"),
            "c": _save(c, smol_tokenizer, root / "c"), "perm": perm.numpy(), "models": (a, b, c)}


def mine_diff(tmp, a, b) -> object:
    job = tmp / "job.yaml"
    job.write_text(JOB.replace("{id: A}", f"{{id: '{a}'}}").replace("{id: B}", f"{{id: '{b}'}}"))
    assert main(["run", str(job), "--store", str(tmp / "store"), "--no-progress"]) == 0
    return tmp / "store"


@pytest.fixture(scope="module")
def scaled(pair, tmp_path_factory):
    return mine_diff(tmp_path_factory.mktemp("scaled"), pair["a"], pair["b"])


def _brute(models, store, tokenizer):
    """Both models' layer activations and next-token log-probs at every mined token, context by context
    (the contexts as planned, special tokens included), in tok order."""
    from mining.runner import plan
    from mining.spec import load_spec

    shards, _ = plan(load_spec(store / "job.yaml"), tokenizer)
    out = []
    for model in models:
        grabbed, acts, logprob, toks = {}, {0: [], 1: []}, [], []
        handles = [model.model.layers[i].mlp.down_proj.register_forward_pre_hook(
            lambda mod, args, i=i: grabbed.__setitem__(i, args[0][0])) for i in range(2)]
        with torch.inference_mode():
            for shard in shards:
                grid = shard.tok_grid()
                for c in range(len(shard.ids)):
                    n = int(shard.length[c])
                    ids = torch.from_numpy(shard.ids[c, :n])[None]
                    lsm = torch.log_softmax(model(ids).logits[0].float(), -1)
                    mined = np.nonzero(grid[c, :n] >= 0)[0]
                    toks.append(grid[c, mined])
                    nxt = np.minimum(mined + 1, n - 1)
                    lp = lsm[torch.from_numpy(mined), ids[0, torch.from_numpy(nxt)]].numpy()
                    logprob.append(np.where(mined + 1 < n, lp, np.nan))
                    for i in range(2):
                        acts[i].append(grabbed[i][torch.from_numpy(mined)].numpy())
        for h in handles:
            h.remove()
        order = np.argsort(np.concatenate(toks))
        out.append(({i: np.concatenate(v)[order] for i, v in acts.items()}, np.concatenate(logprob)[order]))
    return np.sort(np.concatenate(toks)), out


def test_planted_weight_change_is_found_first(scaled):
    con = connect(scaled)
    top = run_named(con, "weight-changes", {"what": "neuron", "limit": "1"}).to_pylist()[0]
    assert (top["layer"], top["unit"]) == SCALED_NEURON and top["out_rel"] == 0
    head = run_named(con, "weight-changes", {"what": "head", "limit": "2"}).to_pylist()
    assert (head[0]["layer"], head[0]["unit"]) == SCALED_HEAD and head[1]["change"] == 0
    params = {r["param"]: r["change"] for r in run_named(con, "weight-changes", {"what": "param", "limit": "100"}).to_pylist()}
    assert {p for p, v in params.items() if v > 0} == {"model.layers.0.mlp.up_proj.weight",
                                                        "model.layers.1.self_attn.o_proj.weight"}


def test_activation_diff_matches_brute_force(scaled, pair):
    toks, ((acts_a, _), (acts_b, _)) = _brute(pair["models"][:2], scaled, pair["tokenizer"])
    diff = pq.read_table(scaled / "neuron_diff.parquet").to_pandas()
    for layer in (0, 1):
        a, b = acts_a[layer], acts_b[layer]
        got = diff[diff.layer == layer].sort_values("neuron")
        np.testing.assert_allclose(got.mean_abs_diff, np.abs(b - a).mean(0), rtol=1e-4, atol=1e-6)
        want_corr = [np.corrcoef(a[:, j], b[:, j])[0, 1] for j in range(a.shape[1])]
        np.testing.assert_allclose(got["corr"], want_corr, atol=1e-5)
    first = run_named(connect(scaled), "neuron-diff", {"layer": "0", "limit": "1"}).to_pylist()[0]
    assert first["neuron"] == SCALED_NEURON[1] and first["corr"] == pytest.approx(1.0, abs=1e-5)
    ex = pq.read_table(scaled / "neuron_diff_examples.parquet").to_pandas()
    ex = ex[(ex.layer == 0) & (ex.neuron == SCALED_NEURON[1]) & (ex.sign == "b_above_a")].sort_values("rank")
    delta = acts_b[0][:, SCALED_NEURON[1]] - acts_a[0][:, SCALED_NEURON[1]]
    assert ex.tok.tolist() == toks[np.argsort(-delta, kind="stable")[:4]].tolist()


def test_dla_diff_matches_each_model_alone(scaled, pair, tmp_path):
    """The diff store's mean DLA of A and of B equal single-model DLA jobs' mean_dla."""
    diff = pq.read_table(scaled / "dla_diff.parquet").to_pandas().sort_values(["layer", "neuron"])
    for side, path in (("a", pair["a"]), ("b", pair["b"])):
        job = tmp_path / f"{side}.yaml"
        job.write_text(JOB.replace("models: {a: {id: A}, b: {id: B}}", f"model: {{id: '{path}'}}")
                       .replace("neuron_match: true, ", ""))
        assert main(["run", str(job), "--store", str(tmp_path / side), "--no-progress"]) == 0
        alone = pq.read_table(tmp_path / side / "dla_neurons.parquet").to_pandas().sort_values(["layer", "neuron"])
        np.testing.assert_allclose(diff[f"mean_dla_{side}"], alone.mean_dla, rtol=1e-6, atol=1e-9)
    changed = diff[diff.layer == SCALED_NEURON[0]].set_index("neuron")["diff"].abs()
    assert changed.idxmax() == SCALED_NEURON[1]  # the scaled neuron's logit effect changed most in its layer
    heads = pq.read_table(scaled / "head_dla_diff.parquet").to_pandas()
    assert len(heads) == 2 * 4
    scaled_head = heads[(heads.layer == SCALED_HEAD[0]) & (heads["head"] == SCALED_HEAD[1])].iloc[0]
    # its output slice x2: its attribution roughly doubles; the others move only through the changed neuron
    assert scaled_head["mean_dla_b"] == pytest.approx(2 * scaled_head["mean_dla_a"], rel=0.3)
    assert (heads["count"] == scaled_head["count"]).all() and heads["mean_dla_a"].notna().all()
    top = run_named(connect(scaled), "dla-diff", {"what": "neuron", "limit": "64"}).to_pylist()
    assert [r["unit"] for r in top if r["layer"] == SCALED_NEURON[0]][0] == SCALED_NEURON[1]
    assert len(run_named(connect(scaled), "dla-diff", {"what": "head"}).to_pylist()) == 8
    older = tmp_path / "older"  # a diff store mined before SAE latents had DLA rows: dla_diff has no hook column
    shutil.copytree(scaled, older)
    pq.write_table(pq.read_table(older / "dla_diff.parquet").drop_columns(["hook"]), older / "dla_diff.parquet")
    assert run_named(connect(older), "dla-diff", {"what": "neuron", "limit": "64"}).to_pylist() == top


def test_token_diff_and_queries(scaled, pair):
    toks, ((_, lp_a), (_, lp_b)) = _brute(pair["models"][:2], scaled, pair["tokenizer"])
    con = connect(scaled)
    got = con.sql("SELECT tok, logprob_a, logprob_b, diff FROM token_diff ORDER BY tok").fetchnumpy()
    assert got["tok"].tolist() == toks.tolist()
    inside = ~np.isnan(lp_a)  # the last position of a context predicts the next context's first token
    np.testing.assert_allclose(got["logprob_a"][inside], lp_a[inside], atol=1e-4)
    np.testing.assert_allclose(got["logprob_b"][inside], lp_b[inside], atol=1e-4)
    np.testing.assert_allclose(got["diff"][inside], (lp_b - lp_a)[inside], atol=1e-4)
    gains = run_named(con, "token-gains", {"k": "5"}).to_pylist()
    assert gains[0]["diff"] == np.nanmax(got["diff"].astype(float))
    losses = run_named(con, "token-gains", {"k": "5", "direction": "losses"}).to_pylist()
    assert losses[0]["diff"] == np.nanmin(got["diff"].astype(float))
    docs = run_named(con, "doc-diff", {}).to_pylist()
    assert docs and docs[0]["mean_gain"] >= docs[-1]["mean_gain"]


def test_permuted_copy_is_the_same_function_and_its_neurons_are_matched(pair, tmp_path):
    store = mine_diff(tmp_path, pair["a"], pair["c"])
    con = connect(store)
    worst = con.sql("SELECT max(abs(diff)) FROM token_diff").fetchall()[0][0]
    assert worst < 1e-4  # a permutation of neurons changes nothing the model computes
    match = pq.read_table(store / "neuron_match.parquet").to_pandas().sort_values(["layer_a", "neuron_a"])
    inverse = np.argsort(pair["perm"])  # B neuron j is A neuron perm[j]
    layer0 = match[match.layer_a == 0]
    assert (layer0.neuron_b.to_numpy() == inverse).mean() > 0.95
    assert (layer0["corr"] > 0.999).mean() > 0.95
    layer1 = match[match.layer_a == 1]
    assert (layer1.neuron_b.to_numpy() == layer1.neuron_a.to_numpy()).mean() > 0.95
    weights = run_named(con, "weight-changes", {"what": "neuron", "limit": "1"}).to_pylist()[0]
    assert weights["change"] > 0 and weights["layer"] == 0  # permuted rows do differ by position


def test_diff_job_refusals(pair, tmp_path, capsys):
    job = tmp_path / "job.yaml"
    job.write_text(JOB.replace("{id: A}", f"{{id: '{pair['a']}'}}").replace("{id: B}", "{id: minilm-l6}"))
    assert main(["run", str(job), "--store", str(tmp_path / "s")]) != 0
    assert "tokenize differently" in capsys.readouterr().err
    job.write_text(JOB.replace("{id: A}", f"{{id: '{pair['a']}'}}").replace("{id: B}", f"{{id: '{pair['b']}'}}")
                   .replace("neuron_match: true", "heads: true"))
    assert main(["run", str(job), "--store", str(tmp_path / "s")]) != 0
    assert "stats.heads: not available in a diff job" in capsys.readouterr().err
    job.write_text("name: x\nmodels: {a: smollm2-135m}\ncorpus: {source: 'builtin:python-docs'}\n")
    assert main(["run", str(job), "--store", str(tmp_path / "s")]) != 0
    assert "models: expected exactly the keys a and b" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_sae_latents_are_diffed_through_the_same_sae(pair, tmp_path, capsys):
    """An SAE on layer 0's neurons reads both models: each latent's activation diff matches the SAE applied to each
    model's own neurons, and the latent that reads the scaled neuron hardest changes most. Models of other sizes
    with SAEs are refused in one line."""
    from safetensors.numpy import load_file, save_file
    from sae_files import reference, write_saelens

    d_mlp = pair["models"][0].config.intermediate_size
    w = write_saelens(tmp_path / "sae", d_mlp, 2 * d_mlp, seed=4)
    weights = tmp_path / "sae" / "sae_weights.safetensors"
    tensors = load_file(str(weights))
    tensors["W_enc"][SCALED_NEURON[1], 5] = w["W_enc"][SCALED_NEURON[1], 5] = 4.0  # latent 5 reads B's scaled neuron
    save_file(tensors, str(weights))
    job = tmp_path / "job.yaml"
    text = (JOB.replace("{id: A}", f"{{id: '{pair['a']}'}}").replace("{id: B}", f"{{id: '{pair['b']}'}}")
            .replace('["blocks.*.mlp.hook_post"]', '["blocks.0.mlp.hook_post.hook_sae_acts_post"]')
            .replace("neuron_match: true, dla: true", "").replace("actors: 2", "actors: 1")
            + f"saes: {{blocks.0.mlp.hook_post: '{tmp_path / 'sae'}'}}\n")
    job.write_text(text)
    store = tmp_path / "store"
    assert main(["run", str(job), "--store", str(store), "--no-progress"]) == 0
    _, ((acts_a, _), (acts_b, _)) = _brute(pair["models"][:2], store, pair["tokenizer"])
    a, b = (reference("standard", w, acts[0]) for acts in (acts_a, acts_b))
    diff = pq.read_table(store / "neuron_diff.parquet").to_pandas()
    assert set(diff.hook) == {"mlp.hook_post.hook_sae_acts_post"} and len(diff) == 2 * d_mlp
    diff = diff.sort_values("neuron")
    np.testing.assert_allclose(diff.mean_abs_diff, np.abs(b - a).mean(0), rtol=1e-4, atol=1e-6)
    live = (a.std(0) > 1e-6) & (b.std(0) > 1e-6)
    want_corr = [np.corrcoef(a[:, j], b[:, j])[0, 1] for j in np.nonzero(live)[0]]
    np.testing.assert_allclose(diff["corr"].to_numpy()[live], want_corr, atol=1e-4)
    first = run_named(connect(store), "neuron-diff", {"hook": "mlp.hook_post.hook_sae_acts_post", "layer": "0",
                                                      "limit": "1"}).to_pylist()[0]
    assert first["neuron"] == 5

    big = tiny_model("llama", vocab_size=len(pair["tokenizer"]), seed=5, intermediate_size=160)
    job.write_text(text.replace(str(pair["b"]), str(_save(big, pair["tokenizer"], tmp_path / "wide"))))
    assert main(["run", str(job), "--store", str(tmp_path / "refused"), "--no-progress"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: saes: blocks.0.mlp.hook_post differs between models.a and models.b ({d_mlp} "
                              "vs 160 features); a diff reads both models' activations with the same SAEs")
    assert not (tmp_path / "refused").exists()


def test_sae_latents_dla_in_a_diff_is_each_models_own(pair, tmp_path):
    """B = A with layer 0's down-projection column of neuron 7 x2: the same neurons, so the same latents of an SAE on
    them, but the latents whose decoder rows weigh neuron 7 write something else into B's stream. The diff store's
    mean DLA of each latent in A and in B equals that of a single-model job on A and on B."""
    from sae_files import write_saelens

    a = pair["models"][0]
    d_mlp = a.config.intermediate_size
    b = tiny_model("llama", vocab_size=len(pair["tokenizer"]))  # tiny_model's weights are seeded: b is a copy of A
    with torch.no_grad():
        b.model.layers[0].mlp.down_proj.weight[:, 7] *= 2
    b_path = _save(b, pair["tokenizer"], tmp_path / "model-b")
    write_saelens(tmp_path / "sae", d_mlp, 2 * d_mlp, seed=6)
    hook = "mlp.hook_post.hook_sae_acts_post"
    text = (JOB.replace('["blocks.*.mlp.hook_post"]', f'["blocks.0.{hook}"]').replace("neuron_match: true, ", "")
            + f"saes: {{blocks.0.mlp.hook_post: '{tmp_path / 'sae'}'}}\n")
    job = tmp_path / "diff.yaml"
    job.write_text(text.replace("{id: A}", f"{{id: '{pair['a']}'}}").replace("{id: B}", f"{{id: '{b_path}'}}"))
    assert main(["run", str(job), "--store", str(tmp_path / "diff"), "--no-progress"]) == 0
    diff = pq.read_table(tmp_path / "diff" / "dla_diff.parquet").to_pandas()
    assert set(diff.hook) == {hook} and len(diff) == 2 * d_mlp
    diff = diff.sort_values("neuron")
    same = pq.read_table(tmp_path / "diff" / "neuron_diff.parquet").to_pandas()
    assert same.mean_abs_diff.max() < 1e-5  # the same latents in both models
    for side, path in (("a", pair["a"]), ("b", b_path)):
        alone = tmp_path / f"{side}.yaml"
        alone.write_text(text.replace("models: {a: {id: A}, b: {id: B}}", f"model: {{id: '{path}'}}"))
        assert main(["run", str(alone), "--store", str(tmp_path / side), "--no-progress"]) == 0
        want = pq.read_table(tmp_path / side / "dla_neurons.parquet").to_pandas()
        want = want[want.hook == hook].sort_values("neuron")
        np.testing.assert_allclose(diff[f"mean_dla_{side}"], want.mean_dla, rtol=1e-5, atol=1e-8)
    assert (diff["count"] == want["count"].to_numpy()).all()
    assert np.abs(diff["diff"]).max() > 0.01 * np.abs(diff["mean_dla_a"]).max()  # B's writes moved them
    con = connect(tmp_path / "diff")
    top = run_named(con, "dla-diff", {"hook": hook, "limit": "3"}).to_pylist()
    assert [r["unit"] for r in top] == diff.iloc[np.argsort(-np.abs(diff["diff"].to_numpy()), kind="stable")[:3]]\
        .neuron.tolist()
    assert run_named(con, "dla-diff", {"limit": "3"}).num_rows == 0  # the default hook: neurons, none mined here
    from mining.examples import NeuronId
    from mining.viewer.diffview import neuron_page_data

    latent = int(top[0]["unit"])
    extra = neuron_page_data(con, NeuronId(hook, 0, latent))["extra"]  # the diff viewer's page of that latent
    assert extra["dla_diff"] == pytest.approx(top[0]["diff"]) and extra["mean_dla_b"] == pytest.approx(
        top[0]["mean_dla_b"])
    con.close()


def test_models_of_different_sizes_are_diffed_token_by_token(pair, tmp_path, capsys):
    """A larger B (more layers, wider): with `hooks: []` the job compares the two token by token; with hooks it is
    refused before anything is written, and the error says how to diff them."""
    tok = pair["tokenizer"]
    big = tiny_model("llama", vocab_size=len(tok), seed=5, num_hidden_layers=3, hidden_size=96, intermediate_size=160,
                     num_attention_heads=6)
    b = _save(big, tok, tmp_path / "big")
    job = tmp_path / "job.yaml"
    text = JOB.replace("{id: A}", f"{{id: '{pair['a']}'}}").replace("{id: B}", f"{{id: '{b}'}}")
    job.write_text(text)
    assert main(["run", str(job), "--store", str(tmp_path / "refused"), "--no-progress"]) != 0
    assert "stats.dla: compares the two models neuron by neuron, and models.a and models.b differ in size" in \
        capsys.readouterr().err
    job.write_text(text.replace("neuron_match: true, dla: true", ""))
    assert main(["run", str(job), "--store", str(tmp_path / "refused"), "--no-progress"]) != 0
    err = capsys.readouterr().err
    assert "models.a has 2 layers and models.b 3: a neuron diff needs the same structure" in err
    assert "`hooks: []`" in err and "neuron_match: true" in err and not (tmp_path / "refused").exists()
    job.write_text(text.replace('["blocks.*.mlp.hook_post"]', "[]"))
    assert main(["run", str(job), "--store", str(tmp_path / "refused"), "--no-progress"]) != 0
    assert "stats.dla: compares the two models neuron by neuron" in capsys.readouterr().err

    job.write_text(text.replace('["blocks.*.mlp.hook_post"]', "[]").replace("neuron_match: true, dla: true", ""))
    store = tmp_path / "store"
    assert main(["run", str(job), "--store", str(store), "--no-progress"]) == 0
    toks, ((_, lp_a), (_, lp_b)) = _brute([pair["models"][0], big], store, tok)
    con = connect(store)
    got = con.sql("SELECT tok, logprob_a, logprob_b FROM token_diff ORDER BY tok").fetchnumpy()
    inside = ~np.isnan(lp_a)
    assert got["tok"].tolist() == toks.tolist()
    np.testing.assert_allclose(got["logprob_a"][inside], lp_a[inside], atol=1e-4)
    np.testing.assert_allclose(got["logprob_b"][inside], lp_b[inside], atol=1e-4)
    assert run_named(con, "doc-diff", {})
    assert run_named(con, "token-gains", {"k": "3"}).num_rows == 3
    for named in ("neuron-diff", "weight-changes"):  # nothing neuron by neuron, no weight of the same shape
        with pytest.raises(Exception, match="this store has no"):
            run_named(con, named, {})
    con.close()


def test_neurons_of_a_wider_model_are_matched_to_their_twins(pair, tmp_path, capsys):
    """B = A with its MLPs widened (A's neurons permuted, plus 32 new ones whose output weights are zero): the same
    function. neuron_match alone pairs models of other sizes: every A neuron finds its twin, at correlation 1."""
    tok = pair["tokenizer"]
    a = pair["models"][0]
    wide = tiny_model("llama", vocab_size=len(tok), seed=9, intermediate_size=96)
    perm = torch.randperm(96, generator=torch.Generator().manual_seed(4))  # A's neuron j sits at B's perm[j]
    with torch.no_grad():
        wide.load_state_dict({k: v for k, v in a.state_dict().items() if "mlp" not in k}, strict=False)
        for la, lb in zip(a.model.layers, wide.model.layers):
            for name in ("gate_proj", "up_proj"):
                getattr(lb.mlp, name).weight[perm[:64]] = getattr(la.mlp, name).weight
            lb.mlp.down_proj.weight.zero_()
            lb.mlp.down_proj.weight[:, perm[:64]] = la.mlp.down_proj.weight
    b = _save(wide, tok, tmp_path / "wide")
    job = tmp_path / "job.yaml"
    text = JOB.replace("{id: A}", f"{{id: '{pair['a']}'}}").replace("{id: B}", f"{{id: '{b}'}}")
    job.write_text(text.replace("neuron_match: true, dla: true", "dla: true"))
    assert main(["run", str(job), "--store", str(tmp_path / "store"), "--no-progress"]) != 0
    err = capsys.readouterr().err
    assert "blocks.0.mlp.hook_post differs between models.a and models.b (64 vs 96 features)" in err
    assert "neuron_match: true" in err and not (tmp_path / "store").exists()
    job.write_text(text.replace("neuron_match: true, dla: true", "neuron_match: true"))
    assert main(["run", str(job), "--store", str(tmp_path / "store"), "--no-progress"]) == 0
    con = connect(tmp_path / "store")
    got = con.sql("SELECT max(abs(diff)) FROM token_diff").fetchall()[0][0]
    assert got < 1e-4  # the same function
    rows = run_named(con, "neuron-match", {"order": "worst", "limit": "1000"}).to_pylist()
    assert len(rows) == 2 * 64
    for r in rows:
        assert r["layer_b"] == r["layer_a"] and r["neuron_b"] == int(perm[r["neuron_a"]]), r
        assert r["corr"] == pytest.approx(1, abs=1e-5) and r["self_corr"] is None
    with pytest.raises(Exception, match="this store has no"):
        run_named(con, "neuron-diff", {})
    assert main(["export", str(tmp_path / "store"), "--format", "html", "--out", str(tmp_path / "site")]) == 0
    index = (tmp_path / "site" / "index.html").read_text()
    assert 'id="match-best"' in index and 'id="match-worst"' in index and 'id="neurons"' not in index


def test_a_deeper_model_is_matched_at_the_same_relative_depth(pair, tmp_path, capsys):
    from mining.diff import matched_layer

    assert [matched_layer(la, 30, 32) for la in (0, 14, 15, 29)] == [0, 15, 16, 31]
    assert [matched_layer(la, 4, 2) for la in range(4)] == [0, 0, 1, 1]
    tok = pair["tokenizer"]
    b = _save(tiny_model("llama", vocab_size=len(tok), seed=5, num_hidden_layers=5), tok, tmp_path / "deep")
    job = tmp_path / "job.yaml"
    text = (JOB.replace("{id: A}", f"{{id: '{pair['a']}'}}").replace("{id: B}", f"{{id: '{b}'}}")
            .replace("neuron_match: true, dla: true", "neuron_match: true"))
    job.write_text(text.replace('"blocks.*.mlp.hook_post"', '"blocks.1.mlp.hook_post"'))
    assert main(["run", str(job), "--store", str(tmp_path / "store"), "--no-progress"]) == 0
    con = connect(tmp_path / "store")
    assert con.sql("SELECT DISTINCT layer_a, layer_b FROM neuron_match").fetchall() == [(1, 4)]
    corr = con.sql("SELECT corr FROM neuron_match").fetchnumpy()["corr"]
    assert len(corr) == 64 and np.all(np.abs(corr) <= 1)


def test_weights_are_compared_where_both_models_have_them(pair):
    from mining.diff import weight_diff_tables

    a = pair["models"][0]
    deeper = tiny_model("llama", vocab_size=len(pair["tokenizer"]), seed=7, num_hidden_layers=3)
    with torch.no_grad():  # as on an actor, whose models are loaded for inference
        tables = weight_diff_tables(a, deeper)
    assert set(tables["neuron_weight_diff"].column("layer").to_pylist()) == {0, 1}
    assert set(tables["head_weight_diff"].column("layer").to_pylist()) == {0, 1}
    assert tables["neuron_weight_diff"].num_rows == 2 * a.config.intermediate_size
    wider = tiny_model("llama", vocab_size=len(pair["tokenizer"]), hidden_size=96, num_attention_heads=6)
    with torch.no_grad():
        assert weight_diff_tables(a, wider) == {}


# ---------------------------------------------------------------- the diff store's pages and their queries


def test_doc_tokens_reads_the_document_with_each_tokens_prediction(scaled):
    """doc-tokens: gap + token reads as the document, and each token carries the diff of the row that predicted it."""
    con = connect(scaled)
    diffs = dict(con.sql("SELECT tok, diff FROM token_diff").fetchall())
    for doc_id, text in con.sql("SELECT doc_id, text FROM docs").fetchall():
        rows = run_named(con, "doc-tokens", {"doc": str(doc_id)}).to_pylist()
        end = con.sql(f"SELECT max(char_end) FROM tokens WHERE doc_id = {doc_id}").fetchall()[0][0]
        assert rows and "".join(r["gap"] + r["token"] for r in rows) == text[:end]
        toks = [r["tok"] for r in rows]
        assert rows[0]["diff"] is None
        for prev, r in zip(toks, rows[1:]):
            assert r["diff"] == pytest.approx(diffs[prev], abs=1e-6) if r["tok"] == prev + 1 else r["diff"] is None
    with pytest.raises(Exception, match="doc"):
        run_named(con, "doc-tokens", {})


def test_neuron_diff_examples_reads_each_set_with_its_contexts(scaled):
    con = connect(scaled)
    layer, neuron = SCALED_NEURON
    p = {"layer": str(layer), "neuron": str(neuron), "k": "3"}
    for s, table, col, where in (("b_above_a", "neuron_diff_examples", "diff", "sign = 'b_above_a'"),
                                 ("a_above_b", "neuron_diff_examples", "diff", "sign = 'a_above_b'"),
                                 ("top_a", "diff_top_examples", "value", "model = 'a'"),
                                 ("top_b", "diff_top_examples", "value", "model = 'b'")):
        want = con.sql(f"SELECT rank, {col}, tok FROM {table} WHERE hook = 'mlp.hook_post' AND layer = {layer} AND "
                       f"neuron = {neuron} AND {where} AND rank <= 3 ORDER BY rank").fetchall()
        got = run_named(con, "neuron-diff-examples", {**p, "set": s}).to_pylist()
        assert [(r["rank"], r["value"], r["tok"]) for r in got] == want and want, s
        for r in got:
            token = con.sql(f"SELECT token FROM tokens WHERE tok = {r['tok']}").fetchall()[0][0]
            assert f"«{token}»" in r["context"]
    # B's neuron is A's times 3, so its largest B - A values are at A's largest activations
    top_a = [r["tok"] for r in run_named(con, "neuron-diff-examples", {**p, "set": "top_a"}).to_pylist()]
    assert [r["tok"] for r in run_named(con, "neuron-diff-examples", {**p, "set": "b_above_a"}).to_pylist()] == top_a
    with pytest.raises(Exception, match="set must be b_above_a"):
        run_named(con, "neuron-diff-examples", {**p, "set": "gains"})


def _links_resolve(site):
    """Every relative href of every page names a file of the site (and an anchor on it, where it gives one)."""
    import re

    pages = list(site.rglob("*.html"))
    for page in pages:
        for href in re.findall(r'href="([^"]+)"', page.read_text()):
            target, _, anchor = href.partition("#")
            path = (page.parent / target).resolve()
            assert path.is_file(), (page, href)
            if anchor:
                assert f'id="{anchor}"' in path.read_text(), (page, href)
    return pages


def test_diff_store_viewer(scaled, tmp_path, capsys):
    """`mine export --format html` on a diff store: index, a page per document with every token's B - A, a page per
    chosen neuron; the rest of export refuses a diff store in one line."""
    import html as htmllib
    import re

    out = tmp_path / "site"
    layer, neuron = SCALED_NEURON
    assert main(["export", str(scaled), "--format", "html", "--out", str(out), "--neuron", f"{layer}:{neuron}",
                 "--top", "3", "--by", "corr"]) == 0
    con = connect(scaled)
    pages = _links_resolve(out)
    docs = {r[0] for r in con.sql("SELECT DISTINCT doc_id FROM tokens").fetchall()}
    assert {p.name for p in (out / "docs").iterdir()} == {f"{d}.html" for d in docs}
    least = {(r["layer"], r["neuron"])
             for r in run_named(con, "neuron-diff", {"order": "corr", "limit": "3"}).to_pylist()}
    assert {p.name for p in (out / "neurons").iterdir()} == {f"mlp.hook_post-{la}-{n}.html"
                                                             for la, n in least | {SCALED_NEURON}}
    index = (out / "index.html").read_text()
    assert f"neurons/mlp.hook_post-{layer}-{neuron}.html" in index
    mean = con.sql("SELECT avg(diff) FROM token_diff").fetchall()[0][0]
    assert re.search(r"<p id=summary>.*?<b>([^<]+)</b>", index).group(1) == f"{mean:.4g}"
    diffs = dict(con.sql("SELECT tok + 1, diff FROM token_diff").fetchall())
    shown = 0
    for d in docs:
        text = (out / "docs" / f"{d}.html").read_text()
        for tok, tip in re.findall(r'<span class="t" id="t(\d+)" style="[^"]*" data-v="([^"]+)"', text):
            got = float(re.match(r"B − A ([-+][\d.]+)", htmllib.unescape(tip)).group(1))
            assert got == pytest.approx(diffs[int(tok)], abs=6e-4)
            shown += 1
    assert shown >= con.sql("SELECT count(*) FROM token_diff").fetchall()[0][0] - 2 * len(docs) - 20
    page = (out / "neurons" / f"mlp.hook_post-{layer}-{neuron}.html").read_text()
    assert all(f'id="set-{s}"' in page for s in ("b_above_a", "top_a", "top_b"))
    # the replayed traces: B's neuron is A's times 3, and B - A at the marked token is the mined value
    stored = run_named(con, "neuron-diff-examples", {"layer": str(layer), "neuron": str(neuron), "k": "5"}).to_pylist()
    traces = page.split('id="traces-b_above_a"')[1].split('<p class=note>')[0]
    peaks = re.findall(r'data-model="(a|b)">.*?<span class="t pk" style="[^"]*" data-v="([^"]+)"', traces, re.S)
    assert [m for m, _ in peaks] == ["a", "b"] * len(stored) and stored
    for want, (a, b) in zip(stored, zip(peaks[::2], peaks[1::2])):
        a, b = float(a[1]), float(b[1])
        assert b == pytest.approx(3 * a, rel=2e-3) and b - a == pytest.approx(want["value"], rel=2e-3, abs=1e-3)
    assert len(pages) == 1 + len(docs) + len(list((out / "neurons").iterdir()))
    html_to = ["--format", "html", "--out", str(tmp_path / "y")]
    for argv, says in ((["--format", "jsonl", "--out", str(tmp_path / "x.jsonl"), "--top", "3"], "as --format html"),
                       ([*html_to, "--by", "kurtosis2", "--top", "2"], "by 'kurtosis2'"),
                       ([*html_to, "--query", "neuron-diff"], "--query: not for a diff"),
                       ([*html_to, "--neuron", "9:0"], "neuron 9:0")):
        capsys.readouterr()
        assert main(["export", str(scaled), *argv]) != 0
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x.jsonl").exists() and not (tmp_path / "y").exists()
    # --top 0: no neuron pages (without --top: the 20 that changed most)
    assert main(["export", str(scaled), "--format", "html", "--out", str(tmp_path / "z"), "--top", "0"]) == 0
    assert not (tmp_path / "z" / "neurons").exists() or not list((tmp_path / "z" / "neurons").iterdir())
    assert (tmp_path / "z" / "index.html").exists()


def test_diff_store_served(scaled):
    """`mine serve` on a diff store: the same pages on demand, over HTTP on 127.0.0.1; bad requests get error pages."""
    import threading
    import urllib.error
    import urllib.request

    from mining.viewer.server import DiffViewer, make_server

    server = make_server(DiffViewer(scaled), 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    layer, neuron = SCALED_NEURON
    try:
        index = urllib.request.urlopen(base + "/?by=corr&limit=5").read().decode()
        assert index.count('href="/neuron/mlp.hook_post/') == 5 and 'href="/doc/' in index
        doc = connect(scaled).sql("SELECT min(doc_id) FROM tokens").fetchall()[0][0]
        assert 'id="doc-text"' in urllib.request.urlopen(f"{base}/doc/{doc}").read().decode()
        page = urllib.request.urlopen(f"{base}/neuron/mlp.hook_post/{layer}/{neuron}").read().decode()
        assert f"layer {layer} · neuron {neuron}: A vs B" in page
        for path, code in (("/doc/999999", 400), ("/?by=kurtosis", 400), ("/neuron/mlp.hook_post/0/99999", 400),
                           ("/nothing", 404)):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(base + path)
            assert e.value.code == code and b"<p id=error>" in e.value.read()
    finally:
        server.shutdown()
        server.server_close()


def test_a_neuron_match_too_large_for_the_machine_is_refused(pair, tmp_path, capsys, monkeypatch):
    """Its state (Na x Nb float64 per hooked layer) is estimated before anything is mined."""
    import mining.diff

    job = tmp_path / "job.yaml"
    job.write_text(JOB.replace("{id: A}", f"{{id: '{pair['a']}'}}").replace("{id: B}", f"{{id: '{pair['b']}'}}"))
    width = pair["models"][0].config.intermediate_size
    need = 8 * width * width * pair["models"][0].config.num_hidden_layers
    monkeypatch.setattr(mining.diff, "machine_memory", lambda: 4 * need - 8)
    assert main(["run", str(job), "--store", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert f"({width} x {width} at blocks.0.mlp.hook_post)" in err and "hook fewer layers" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "s").exists()
    monkeypatch.setattr(mining.diff, "machine_memory", lambda: 4 * need)  # exactly a quarter: allowed
    mining.diff.check_cross_memory([(p, p) for p in _points(pair["models"][0])])


def _points(model):
    from mining.hooks import resolve_hooks

    return resolve_hooks(model, ["blocks.*.mlp.hook_post"])


def test_diff_document_served_coloured_by_a_neuron(scaled):
    """A neuron page's example opens its document coloured by the neuron's B − A activation, replayed through both
    models: at the marked token B − A is the mined value, and for the planted neuron B = 3A at every token."""
    import html as htmllib
    import re

    from mining.viewer.server import DiffViewer

    viewer = DiffViewer(scaled)
    layer, neuron = SCALED_NEURON
    status, page = viewer.handle(f"/neuron/mlp.hook_post/{layer}/{neuron}")
    assert status == 200
    stored = run_named(connect(scaled), "neuron-diff-examples",
                       {"layer": str(layer), "neuron": str(neuron), "k": "3", "set": "b_above_a"}).to_pylist()
    for want in stored:
        link = (f"/doc/{want['doc_id']}?hook=mlp.hook_post&amp;layer={layer}&amp;neuron={neuron}&amp;tok={want['tok']}"
                f"#t{want['tok']}")
        assert f'href="{link}"' in page
        status, doc = viewer.handle(htmllib.unescape(link).split("#")[0])
        assert status == 200, doc[-500:]
        tips = {int(t): htmllib.unescape(v) for t, v in re.findall(
            r'<span class="t(?: pk)?" id="t(\d+)"(?: style="[^"]*")? data-v="([^"]*)"', doc)}
        acts = {t: tuple(map(float, re.match(r"neuron B − A \S+ \(A (\S+), B (\S+)\)", tip).groups()))
                for t, tip in tips.items() if tip.startswith("neuron")}
        assert len(acts) >= 64 and want["tok"] in acts and f'class="t pk" id="t{want["tok"]}"' in doc
        a, b = acts[want["tok"]]
        assert b - a == pytest.approx(want["value"], rel=2e-3, abs=2e-3)
        assert all(b == pytest.approx(3 * a, rel=3e-3, abs=3e-4) for a, b in acts.values())
    status, plain = viewer.handle(f"/doc/{stored[0]['doc_id']}")
    assert status == 200 and 'id="colour-by"' in plain and "by B − A log-prob" in plain
    for url, says in ((f"/doc/{stored[0]['doc_id']}?layer={layer}&neuron=99999", "not in this diff store"),
                      (f"/doc/{stored[0]['doc_id']}?layer={layer}&neuron={neuron}&tok=99999999", "is not in document")):
        status, text = viewer.handle(url)
        assert status == 400 and says in htmllib.unescape(text), text[-400:]
