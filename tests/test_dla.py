"""Direct logit attribution on SmolLM2's real weights: the decomposition is exact, and the mined
dla_examples / dla_neurons match a brute-force recomputation."""

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch

from mining.cli import main
from mining.dla import DirectLogitAttribution
from mining.hooks import record
from mining.query import connect, run_named

pytestmark = pytest.mark.slow

TEXT = "def add(a, b):\n    return a + b\n\nThe capital of Germany is Berlin, and the capital of France is"


@torch.inference_mode()
def test_components_sum_to_the_logit(smollm2):
    """Embedding + every head + every neuron, each read through the final norm with its scale held
    fixed, add up to the logit of the actual next token (Llama has no biases)."""
    model, tok = smollm2.model, smollm2.tokenizer
    ids = torch.tensor([[0] + tok(TEXT)["input_ids"]])
    n_layers = model.config.num_hidden_layers
    dla = DirectLogitAttribution(model)
    with record(model, ["blocks.0.hook_resid_pre", "blocks.*.attn.hook_z", "blocks.*.mlp.hook_post"]) as acts:
        logits = model(input_ids=ids).logits[0]
    scale_in = {}
    handle = dla.norm.register_forward_pre_hook(lambda m, a: scale_in.__setitem__("x", a[0]))
    model(input_ids=ids)
    handle.remove()
    positions = torch.arange(1, ids.shape[1] - 1)
    targets = ids[0, positions + 1]
    d = dla.directions(targets)  # (P, d_model)
    s = dla.scale(scale_in["x"][0, positions])  # (P,)
    heads = model.config.num_attention_heads
    total = (acts["blocks.0.hook_resid_pre"][0, positions] * d).sum(-1) / s
    per_head, per_neuron = [], []
    for layer in range(n_layers):
        z = acts[f"blocks.{layer}.attn.hook_z"][0, positions]  # (P, heads * d_head)
        w_o = model.model.layers[layer].self_attn.o_proj.weight  # (d_model, heads * d_head)
        dh = z.shape[-1] // heads
        for h in range(heads):
            out = z[:, h * dh:(h + 1) * dh] @ w_o[:, h * dh:(h + 1) * dh].T
            per_head.append((out * d).sum(-1) / s)
        a = acts[f"blocks.{layer}.mlp.hook_post"][0, positions]  # (P, N)
        neuron_dla = a * dla.neuron_gain(layer, d) / s[:, None]  # what the miner computes
        per_neuron.append(neuron_dla)
    total = total + torch.stack(per_head).sum(0) + torch.cat(per_neuron, dim=1).sum(1)
    expected = logits[positions, targets]
    torch.testing.assert_close(total, expected, rtol=1e-3, atol=2e-3)
    assert len(per_head) == n_layers * heads and torch.cat(per_neuron, 1).shape[1] == n_layers * 1536


JOB = """
name: dla
model: {id: smollm2-135m}
corpus: {source: "builtin:python-docs", max_tokens: 400, context_length: 64}
hooks: ["blocks.12.mlp.hook_post", "blocks.29.mlp.hook_post"]
stats: {top_k: 5, dla: true}
compute: {actors: 1, batch_size: 4, shard_tokens: 200}
"""


@pytest.mark.ray
@torch.inference_mode()
def test_mined_dla_matches_brute_force(tmp_path, smollm2):
    (tmp_path / "job.yaml").write_text(JOB)
    store = tmp_path / "store"
    assert main(["run", str(tmp_path / "job.yaml"), "--store", str(store), "--no-progress"]) == 0
    tokens = ds.dataset(store / "tokens").to_table().sort_by("tok").to_pandas()
    model = smollm2.model
    dla = DirectLogitAttribution(model)
    per_layer = {12: [], 29: []}
    texts = pq.read_table(store / "docs.parquet").to_pandas().set_index("doc_id").text
    first_tok = tokens.groupby("doc_id").tok.min()
    cache = {}

    def doc_ids(doc):  # the whole document's ids; the mined ones must be a prefix
        if doc not in cache:
            cache[doc] = smollm2.tokenizer(texts[doc], add_special_tokens=False)["input_ids"]
            mined = tokens[tokens.doc_id == doc].token_id.tolist()
            assert cache[doc][:len(mined)] == mined
        return cache[doc]

    def doc_index(group):
        return (group.tok - first_tok[group.doc_id.iloc[0]]).tolist()

    toks = []
    for _, group in tokens.groupby("ctx", sort=True):
        ids = [0] + group.token_id.tolist()
        grabbed = {}
        hooks = [model.model.layers[L].mlp.down_proj.register_forward_pre_hook(
            lambda m, a, L=L: grabbed.__setitem__(L, a[0][0])) for L in per_layer]
        hooks.append(dla.norm.register_forward_pre_hook(lambda m, a: grabbed.__setitem__("x", a[0][0])))
        model(input_ids=torch.tensor([ids]))
        for h in hooks:
            h.remove()
        # the target of each mined position is the document's next token, mined or not
        doc = int(group.doc_id.iloc[0])
        nxt = np.array([doc_ids(doc)[i + 1] if i + 1 < len(doc_ids(doc)) else -1 for i in doc_index(group)])
        keep = nxt >= 0
        targets = torch.tensor(nxt[keep])
        d = dla.directions(targets)
        s = dla.scale(grabbed["x"][1:][keep])
        for L in per_layer:
            a = grabbed[L][1:][keep]
            per_layer[L].append((a * dla.neuron_gain(L, d) / s[:, None]).numpy())
        toks.append(group.tok.to_numpy()[keep])
    toks = np.concatenate(toks)
    examples = pq.read_table(store / "dla_examples.parquet").to_pandas()
    neurons = pq.read_table(store / "dla_neurons.parquet").to_pandas()
    for L in per_layer:
        values = np.concatenate(per_layer[L])
        for n in (0, 700, int(np.abs(values).max(0).argmax())):
            col = values[:, n]
            row = neurons[(neurons.layer == L) & (neurons.neuron == n)].iloc[0]
            assert row["count"] == len(col)
            np.testing.assert_allclose(row["mean_dla"], col.mean(), rtol=1e-3, atol=1e-5)
            pos = examples[(examples.layer == L) & (examples.neuron == n) & (examples.sign == "positive")]
            neg = examples[(examples.layer == L) & (examples.neuron == n) & (examples.sign == "negative")]
            np.testing.assert_allclose(pos.sort_values("rank").dla, np.sort(col)[::-1][:5], rtol=1e-3, atol=1e-4)
            np.testing.assert_allclose(neg.sort_values("rank").dla, np.sort(col)[:5], rtol=1e-3, atol=1e-4)
            lookup = dict(zip(toks, col))
            np.testing.assert_allclose([lookup[t] for t in pos.tok], pos.dla, rtol=1e-3, atol=1e-4)
    con = connect(store)  # the named query: the mined rows, each with the token it predicts and its context
    pos = examples[(examples.layer == 29) & (examples.neuron == 0) & (examples.sign == "positive")].sort_values("rank")
    shown = run_named(con, "dla-examples", {"layer": "29", "neuron": "0", "k": "5"}).to_pylist()
    con.close()
    by_tok = tokens.set_index("tok")
    assert [r["tok"] for r in shown] == pos.tok.tolist() and [r["dla"] for r in shown] == pos.dla.tolist()
    for r in shown:
        nxt = by_tok.token.get(r["tok"] + 1) if by_tok.doc_id.get(r["tok"] + 1) == by_tok.doc_id[r["tok"]] else None
        assert r["token"] == by_tok.token[r["tok"]] and r["next_token"] == nxt
        assert "«" + r["token"] + "»" in r["context"]
