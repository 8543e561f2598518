"""Logit lens of MLP neurons, checked against brute force from each model's raw weights."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from config_factors import logit_factor, residual_factor
from synthetic_store import make_synthetic_store

from mining.analyses import logit_lens_table, topk_ids
from mining.analyses.logit_lens import SCHEMA
from mining.architectures import dims
from mining.errors import UserError
from mining.query import connect, run_named
from mining.tiny import tiny_model

K = 5


# family -> (base model, block list, MLP output projection, final norm) where they are not llama's
LAYER_NORM_PATHS = {
    "phi": ("model", "layers", "mlp.fc2", "final_layernorm"),
    "opt": ("model.decoder", "layers", "fc2", "final_layer_norm"),
    "xglm": ("model", "layers", "fc2", "layer_norm"),
    "mpt": ("transformer", "blocks", "ffn.down_proj", "norm_f"),
    "codegen": ("transformer", "h", "mlp.fc_out", "ln_f"),
    "persimmon": ("model", "layers", "mlp.dense_4h_to_h", "final_layernorm"),
    "bloom": ("transformer", "h", "mlp.dense_4h_to_h", "ln_f"),
    "falcon": ("transformer", "h", "mlp.dense_4h_to_h", "ln_f"),
    "gpt_neox": ("gpt_neox", "layers", "mlp.dense_4h_to_h", "final_layer_norm"),
}


def raw_weights(model, arch: str, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W_out as (neurons, d_model), final norm gain (d_model,), W_U as (vocab, d_model)) straight from the
    modules, independently of mining.hooks."""
    if arch == "gpt2":  # Conv1D stores (in, out)
        t = model.transformer
        return t.h[layer].mlp.c_proj.weight, t.ln_f.weight, model.lm_head.weight
    if arch in LAYER_NORM_PATHS:  # nn.Linear stores (out, in)
        base, blocks, out_proj, norm = LAYER_NORM_PATHS[arch]
        t = model.get_submodule(base)
        w_out = t.get_submodule(blocks)[layer].get_submodule(out_proj).weight.T
        return w_out, t.get_submodule(norm).weight, model.lm_head.weight
    t, blk = model.model, model.model.layers[layer]
    one = 1.0 if "gemma" in arch or arch == "nemotron" else 0.0  # Gemma's RMSNorm, Nemotron's LayerNorm: 1 + weight
    w_out = blk.mlp.down_proj.weight.T
    out_norm = getattr(blk, "post_feedforward_layernorm", None) or getattr(blk, "post_mlp_layernorm", None)
    if out_norm is not None:  # Gemma 2/3, OLMo 2/3, GLM-4: the MLP's output norm's gain too
        w_out = w_out * (out_norm.weight + one)
    gain = t.norm.weight + one if arch != "olmo" else torch.ones(w_out.shape[1])  # OLMo 1's norms: no weight
    gain = gain * residual_factor(model.config) * logit_factor(model.config)  # Granite's, Cohere's factors
    return w_out, gain, model.lm_head.weight


def brute_force(w_out, gain, w_u, neuron: int, k: int, largest: bool) -> tuple[np.ndarray, np.ndarray]:
    """The k+1 best ids by a float64 matrix-vector product and a full lexsort (value, then lower id),
    and all the logits."""
    with torch.no_grad():
        logits = (w_u.double() @ (gain.double() * w_out[neuron].double())).numpy()
    order = np.lexsort((np.arange(len(logits)), -logits if largest else logits))[:k + 1]
    return order, logits


def check_neuron(table: dict, layer: int, neuron: int, raw, k: int) -> None:
    for sign, largest in (("boost", True), ("suppress", False)):
        rows = [i for i in range(len(table["layer"]))
                if table["layer"][i] == layer and table["neuron"][i] == neuron and table["sign"][i] == sign]
        assert [table["rank"][i] for i in rows] == list(range(1, k + 1))
        ids = np.array([table["token_id"][i] for i in rows])
        weights = np.array([table["weight"][i] for i in rows])
        order, logits = brute_force(*raw, neuron, k, largest)
        np.testing.assert_allclose(weights, logits[order[:k]], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(weights, logits[ids], rtol=1e-4, atol=1e-5)  # each weight is its token's
        # ids match exactly, except inside a float32-rounding near-tie of the float64 values
        close = np.abs(np.diff(logits[order])) < 1e-5  # close[j]: ranks j and j+1 (0-based) nearly tie
        near = close | np.r_[False, close[:-1]]
        assert ((ids == order[:k]) | near).all(), (layer, neuron, sign, ids, order[:k])


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "llama", "qwen3", "gemma", "gemma2", "olmo", "olmo2", "phi",
                                  "phi3", "opt", "bloom", "cohere", "granite", "olmo3", "exaone4", "vaultgemma", "glm4",
                                  "helium", "arcee", "nemotron", "apertus", "falcon", "mpt", "codegen", "persimmon",
                                  "xglm"])
def test_tiny_models_match_brute_force(arch):
    model = tiny_model(arch, seed=3)
    family = "llama" if arch in {"qwen3", "olmo2", "phi3", "olmo3", "exaone4", "glm4", "helium", "arcee",
                                 "apertus"} else arch
    table = logit_lens_table(model, None, k=K)
    assert table.schema == SCHEMA
    n_layers, width = model.config.num_hidden_layers, dims(model.config)["d_mlp"]  # BLOOM's: 4 x d
    assert table.num_rows == n_layers * width * 2 * K
    assert table.column("token").null_count == table.num_rows  # no tokenizer: no text
    cols = table.to_pydict()
    for layer in range(n_layers):
        raw = raw_weights(model, family, layer)
        for neuron in (0, 17, width - 1):
            check_neuron(cols, layer, neuron, raw, K)


def test_rows_are_ordered_and_layers_selectable():
    model = tiny_model("llama", seed=1)
    table = logit_lens_table(model, None, layers=[1], k=3).to_pydict()
    assert set(table["layer"]) == {1}
    keys = list(zip(table["layer"], table["neuron"], [s == "suppress" for s in table["sign"]], table["rank"]))
    assert keys == sorted(keys)
    with pytest.raises(UserError, match="out of range"):
        logit_lens_table(model, None, layers=[2])
    with pytest.raises(UserError, match="k must be"):
        logit_lens_table(model, None, k=0)


def test_ties_go_to_the_lower_token_id():
    x = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0], [5.0, 4.0, 4.0, 4.0, 0.0]])
    vals, ids = topk_ids(x, 2, largest=True)
    assert ids.tolist() == [[1, 2], [0, 1], [0, 1]]
    assert vals.tolist() == [[3.0, 3.0], [0.0, 0.0], [5.0, 4.0]]
    _, ids = topk_ids(x, 2, largest=False)
    assert ids.tolist() == [[0, 3], [0, 1], [4, 1]]
    _, ids = topk_ids(x, 9, largest=True)  # k past the width: everything, ranked
    assert ids[0].tolist() == [1, 2, 4, 3, 0]

    # a dead neuron (zero output weights) ties every token at 0: ids 0..k-1 on both sides
    model = tiny_model("llama", seed=2)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[:, 5] = 0
    t = logit_lens_table(model, None, layers=[0], k=4).to_pandas()
    dead = t[t.neuron == 5]
    assert dead.token_id.tolist() == [0, 1, 2, 3] * 2 and (dead.weight == 0).all()


def test_logit_lens_sql(tmp_path):
    store = make_synthetic_store(tmp_path)
    pq.write_table(logit_lens_table(tiny_model("gpt2", seed=0), None, k=4), store / "logit_lens.parquet")
    con = connect(store)
    boost = run_named(con, "logit-lens", {"layer": "1", "neuron": "7"}).to_pydict()
    assert boost["sign"] == ["boost"] * 4 and boost["rank"] == [1, 2, 3, 4]
    assert boost["weight"] == sorted(boost["weight"], reverse=True)
    both = run_named(con, "logit-lens", {"layer": "1", "neuron": "7", "sign": "both", "k": "2"}).to_pydict()
    assert both["sign"] == ["boost", "boost", "suppress", "suppress"]
    direct = con.sql("SELECT token_id FROM logit_lens WHERE layer = 1 AND neuron = 7 AND sign = 'suppress' "
                     "AND rank <= 2 ORDER BY rank").fetchall()
    assert both["token_id"][2:] == [r[0] for r in direct]
    with pytest.raises(UserError, match="sign must be"):
        run_named(con, "logit-lens", {"layer": "1", "neuron": "7", "sign": "up"})
    con.close()
    older = pq.read_table(store / "logit_lens.parquet").drop_columns(["hook"])  # a store mined before SAE latents
    pq.write_table(older, store / "logit_lens.parquet")
    con = connect(store)
    assert run_named(con, "logit-lens", {"layer": "1", "neuron": "7"}).to_pydict() == boost
    assert run_named(con, "logit-lens", {"layer": "1", "neuron": "7", "hook": "hook_resid_post.hook_sae_acts_post"}
                     ).num_rows == 0
    con.close()


@pytest.mark.slow
def test_smollm2_matches_brute_force(smollm2):
    model, tokenizer = smollm2.model, smollm2.tokenizer
    layers = [0, 29]
    table = logit_lens_table(model, tokenizer, layers=layers, k=10)
    assert table.num_rows == len(layers) * 1536 * 2 * 10
    cols = table.to_pydict()
    for layer in layers:
        raw = (model.model.layers[layer].mlp.down_proj.weight.T, model.model.norm.weight, model.lm_head.weight)
        for neuron in (0, 812, 1535):
            check_neuron(cols, layer, neuron, raw, 10)
    first = [i for i in range(20)]
    assert [cols["token"][i] for i in first] == [tokenizer.decode([cols["token_id"][i]]) for i in first]
