"""Mixture-of-experts models (OLMoE, Mixtral, Qwen-MoE): the router's view of each token is mined as a neuron per
expert (mlp.hook_expert_weights, each expert's routing probability), next to the residual stream and the heads.
Tiny random models with SmolLM2's tokenizer, mined without Ray (the Ray path is the one every family takes)."""

import numpy as np
import pytest
import torch

from mining.errors import UserError
from mining.tiny import tiny_model


def _job(folder, **stats) -> dict:
    return {"name": "moe", "model": {"id": str(folder)},
            "hooks": ["blocks.*.mlp.hook_expert_weights", "blocks.1.hook_resid_post"],
            "corpus": {"source": "builtin:python-docs", "max_tokens": 600, "context_length": 64},
            "stats": {"top_k": 4, **stats}, "compute": {"batch_size": 4, "shard_tokens": 256}}


@pytest.fixture(scope="module")
def olmoe(tmp_path_factory, smol_tokenizer):
    folder = tmp_path_factory.mktemp("tiny-olmoe")
    tiny_model("olmoe", vocab_size=len(smol_tokenizer)).save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    return folder


@torch.inference_mode()
def test_mined_routing_probabilities_match_each_context_alone(olmoe):
    """Top contexts' values and moments of each expert's routing probability, against softmax(router logits)
    recomputed context by context with a plain hook on the router; a token's probabilities sum to 1."""
    from mining.runner import validate
    from mining.spec import spec_from_dict
    from test_families import mine_merged

    spec = spec_from_dict(_job(olmoe))
    validate(spec)
    loaded, shards, stats = mine_merged(spec)

    layers = loaded.model.model.layers
    logits: dict = {}
    handles = [blk.mlp.gate.register_forward_hook(lambda m, a, o, layer=layer: logits.__setitem__(layer, o[0]))
               for layer, blk in enumerate(layers)]
    probs: dict = {0: [], 1: []}
    try:
        for shard in shards:
            for c in range(len(shard.ids)):
                loaded.model(torch.from_numpy(shard.ids[c, :shard.length[c]])[None])
                keep = slice(int(shard.first[c]), int(shard.first[c] + shard.mined[c]))
                for layer in probs:
                    probs[layer].append(torch.softmax(logits[layer].double(), -1)[keep])  # (T, experts): one context
    finally:
        for h in handles:
            h.remove()
    for layer, parts in probs.items():
        p = torch.cat(parts)
        torch.testing.assert_close(p.sum(-1), torch.ones(len(p), dtype=torch.float64))
        st = stats[f"blocks.{layer}.mlp.hook_expert_weights"]
        top, _ = st.top.finalize()
        assert top.shape == (4, 8)
        torch.testing.assert_close(top.double(), p.topk(4, dim=0).values, rtol=1e-5, atol=1e-6)
        m = st.moments.finalize()
        assert (m["count"] == len(p)).all()
        np.testing.assert_allclose(m["mean"], p.mean(0).numpy(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("arch", ["olmoe", "mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss", "flex_olmo", "granitemoe"])
def test_a_job_on_a_moe_model_is_checked_before_the_weights_load(arch, tmp_path, smol_tokenizer):
    """The default hooks (blocks.*.mlp.hook_post) get one line saying why and what to mine instead; DLA and the
    logit lens without neurons to read get theirs; the routing and residual sites validate."""
    from mining.runner import validate
    from mining.spec import spec_from_dict

    tiny_model(arch, vocab_size=len(smol_tokenizer)).save_pretrained(tmp_path)
    smol_tokenizer.save_pretrained(tmp_path)
    job = _job(tmp_path)
    validate(spec_from_dict(job))
    for hooks, stats, says in ((["blocks.*.mlp.hook_post"], {}, f"{arch}'s experts run as one batched module"),
                               (job["hooks"], {"dla": True}, "stats.dla: it reads blocks.*.mlp.hook_post neurons"),
                               (job["hooks"], {"logit_lens": True}, "stats.logit_lens: it reads")):
        with pytest.raises(UserError, match=says) as caught:
            validate(spec_from_dict({**job, "hooks": hooks, "stats": {"top_k": 4, **stats}}))
        assert "\n" not in str(caught.value)


@torch.inference_mode()
def test_the_weight_diff_of_two_moe_models_names_the_changed_expert_tensor():
    """No MLP neurons to compare (the experts are one tensor a layer), but the parameter table finds the change."""
    from mining.diff import weight_diff_tables

    a, b = tiny_model("olmoe"), tiny_model("olmoe")
    b.model.layers[1].mlp.experts.down_proj[3] *= 2  # expert 3's output projection
    tables = weight_diff_tables(a, b)
    assert tables["neuron_weight_diff"].num_rows == 0
    changed = tables["weight_diff"].to_pandas().query("rel_norm > 0")
    assert list(changed.param) == ["model.layers.1.mlp.experts.down_proj"] and list(changed.layer) == [1]


def test_exports_default_to_the_routing_where_a_store_has_no_mlp_neurons():
    """`mine export --top N` without --hook takes mlp.hook_post, or, in a mixture of experts' store, its first hook."""
    import duckdb

    from mining.export import select_neurons

    con = duckdb.connect()
    rows = [(hook, layer, n, float(n + 10 * layer), 1.0, 0.0, 0.0, 1.0)
            for hook in ("hook_resid_post", "mlp.hook_expert_weights") for layer in (0, 1) for n in range(3)]
    con.execute("CREATE TABLE neurons (hook VARCHAR, layer INT, neuron INT, kurtosis DOUBLE, mean DOUBLE, std DOUBLE, "
                "skew DOUBLE, frac_active DOUBLE, min DOUBLE, max DOUBLE)")
    con.executemany("INSERT INTO neurons VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, 1)", rows)
    chosen = select_neurons(con, None, top=2)
    assert [(n.hook, n.layer, n.neuron) for n in chosen] == [("hook_resid_post", 1, 2), ("hook_resid_post", 1, 1)]
    con.execute("DELETE FROM neurons WHERE hook = 'hook_resid_post'")
    assert {n.hook for n in select_neurons(con, None, top=2)} == {"mlp.hook_expert_weights"}
    con.execute("INSERT INTO neurons VALUES ('mlp.hook_post', 0, 0, 1, 0, 1, 0, 1, 0, 1)")
    assert [n.hook for n in select_neurons(con, None, top=5)] == ["mlp.hook_post"]
