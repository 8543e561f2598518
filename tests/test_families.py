"""Families whose modules do not map one site to one plain tensor: Phi-3's gate and up are halves of one matmul,
OPT's MLP sees the stream flattened to (B*T, d); and every such family's miner on the emulated GPU path. Jobs are
mined without Ray (the Ray path is the one every family takes) against brute force from plain PyTorch hooks."""

import numpy as np
import pytest
import torch

from mining.diff import _feature_rows
from mining.hooks import resolve_hooks
from mining.tiny import tiny_model

def mine_merged(spec) -> tuple:
    """A job mined without Ray, its shards in order by one miner as an actor mines them, their states merged:
    (the loaded model, the shards, hook name -> merged HookStats)."""
    from mining.models import load_model
    from mining.runner import plan
    from test_device import mine_all

    loaded = load_model(spec.model)
    shards, _ = plan(spec, loaded.tokenizer)
    results = mine_all(spec, loaded, shards)
    stats = results[0].stats
    for r in results[1:]:
        stats = {name: st.merge(r.stats[name]) for name, st in stats.items()}
    return loaded, shards, stats


@pytest.mark.parametrize("arch, hooks, dla", [("gemma2", ["blocks.*.mlp.hook_post"], True),
                                             ("opt", ["blocks.*.mlp.hook_post"], False),
                                             ("olmoe", ["blocks.*.mlp.hook_expert_weights"], False),
                                             ("llama", ["blocks.*.attn.hook_pattern"], False),
                                             ("llama", ["blocks.*.hook_resid_post.hook_sae_acts_post",
                                                        "blocks.*.hook_mlp_out"], False)])
def test_the_gpu_kernels_emulated_miner_mines_what_the_cpu_miner_mines(arch, hooks, dla, tmp_path, smol_tokenizer,
                                                                       monkeypatch):
    """The device path (the CUDA kernel, emulated on the CPU) on a tiny Gemma 2, whose DLA it divides by each layer's
    own scale as it reads the activations (FusedGain); on OPT, whose MLP activations come back from (B*T, N); on
    OLMoE's routing probabilities (a softmax the hook computes); on a Llama's attention patterns (heads x keys, most
    of them exactly 0); on an SAE's top-k latents (most of them 0) and the MLP's output: it mines what the CPU miner
    mines, bit for bit.
    (OPT's DLA is left out: for the LayerNorm families, GPT-2's too, the two paths' gains differ in the last bit.)"""
    from mining.models import load_model
    from mining.reducers import cuda_layer
    from mining.runner import plan
    from mining.spec import spec_from_dict
    from test_device import mine_all, same_results

    from sae_files import write_saelens

    tiny_model(arch, vocab_size=len(smol_tokenizer), seed=2).save_pretrained(tmp_path)
    smol_tokenizer.save_pretrained(tmp_path)
    saes = {}
    if any(h.endswith(".hook_sae_acts_post") for h in hooks):
        write_saelens(tmp_path / "sae", 32, 128, "topk", k=8)
        saes = {"blocks.1.hook_resid_post": str(tmp_path / "sae")}
    spec = spec_from_dict({"saes": saes,
        "name": f"{arch}-device", "model": {"id": str(tmp_path)},
        "corpus": {"source": "builtin:python-docs", "max_tokens": 600, "context_length": 64},
        "hooks": hooks, "stats": {"top_k": 6, "dla": dla},
        "compute": {"batch_size": 4, "shard_tokens": 300},
    })
    loaded = load_model(spec.model)
    shards, _ = plan(spec, loaded.tokenizer)
    ref = mine_all(spec, loaded, shards[:2])
    monkeypatch.setenv("MINING_DEVICE_PATH", "1")
    monkeypatch.setenv("MINING_CUDA_EMULATE", "1")
    calls = []  # whether each call reduced DLA fused into the read
    original = cuda_layer.layer_pass
    monkeypatch.setattr(cuda_layer, "layer_pass", lambda *a, **kw: calls.append("gain" in kw) or original(*a, **kw))
    same_results(mine_all(spec, loaded, shards[:2]), ref)
    assert calls and (True in calls) == dla



@pytest.mark.parametrize("arch, says", [("gpt2", "no hooked blocks.*.mlp.hook_post of a gated MLP")])
def test_gate_cases_are_refused_in_one_line_where_there_is_no_gate_to_hook(arch, says, tmp_path, smol_tokenizer):
    from mining.errors import UserError
    from mining.runner import validate
    from mining.spec import spec_from_dict

    tiny_model(arch, vocab_size=len(smol_tokenizer)).save_pretrained(tmp_path)
    smol_tokenizer.save_pretrained(tmp_path)
    job = {"name": "gates", "model": {"id": str(tmp_path)}, "hooks": ["blocks.*.mlp.hook_post"],
           "corpus": {"source": "builtin:python-docs", "max_tokens": 300, "context_length": 64},
           "stats": {"gate_cases": True}}
    with pytest.raises(UserError, match=says) as caught:
        validate(spec_from_dict(job))
    assert str(caught.value).startswith("stats.gate_cases: ") and "\n" not in str(caught.value)
    job["stats"] = {}
    validate(spec_from_dict(job))


def test_phi3_gate_and_up_are_the_halves_of_its_fused_projection_and_mine(tmp_path, smol_tokenizer):
    """Phi-3 computes gate and up in one matmul (gate_up_proj, then chunk(2)). Its hook_pre and hook_pre_linear are
    the two halves: a job mines the gate itself and the gate-sign cases of its neurons, each context recomputed here
    alone with plain hooks on the model's modules. A sign within 1e-4 of zero may differ between the batched and
    the single forward: each neuron's count may move by at most its number of such values."""
    from mining.runner import validate
    from mining.spec import spec_from_dict

    tiny_model("phi3", vocab_size=len(smol_tokenizer)).save_pretrained(tmp_path)
    smol_tokenizer.save_pretrained(tmp_path)
    spec = spec_from_dict({
        "name": "phi3-gates", "model": {"id": str(tmp_path)},
        "hooks": ["blocks.*.mlp.hook_post", "blocks.1.mlp.hook_pre"],
        "corpus": {"source": "builtin:python-docs", "max_tokens": 600, "context_length": 64},
        "stats": {"top_k": 4, "gate_cases": True}, "compute": {"batch_size": 4, "shard_tokens": 256}})
    validate(spec)
    loaded, shards, stats = mine_merged(spec)

    model, grabbed = loaded.model, {}
    handles = []
    for layer, blk in enumerate(model.model.layers):
        handles.append(blk.mlp.gate_up_proj.register_forward_hook(
            lambda m, a, o, layer=layer: grabbed.__setitem__(("fused", layer), o[0])))
        handles.append(blk.mlp.down_proj.register_forward_pre_hook(
            lambda m, a, layer=layer: grabbed.__setitem__(("post", layer), a[0][0])))
    acts: dict = {}
    try:
        with torch.inference_mode():
            for shard in shards:
                for c in range(len(shard.ids)):
                    model(torch.from_numpy(shard.ids[c, :shard.length[c]])[None])
                    keep = slice(shard.first[c], shard.first[c] + shard.mined[c])
                    for (kind, layer), x in grabbed.items():
                        acts.setdefault((kind, layer), []).append(x[keep].float())
    finally:
        for h in handles:
            h.remove()
    acts = {key: torch.cat(parts) for key, parts in acts.items()}

    n = sum(s.n_tokens for s in shards)
    gate1 = acts[("fused", 1)].chunk(2, dim=-1)[0]
    values, _ = stats["blocks.1.mlp.hook_pre"].top.finalize()
    torch.testing.assert_close(values, gate1.topk(4, dim=0).values, rtol=1e-4, atol=1e-4)
    for layer in range(len(model.model.layers)):
        gate, up = acts[("fused", layer)].chunk(2, dim=-1)
        post = acts[("post", layer)]
        torch.testing.assert_close(post, torch.nn.functional.silu(gate) * up)  # the model's own split
        got = stats[f"blocks.{layer}.mlp.hook_post"].gate_cases.finalize()
        assert (got["count"].sum(0) == n).all()
        case = (gate > 0).long() * 2 + (up > 0).long()
        near = ((gate.abs() < 1e-4) | (up.abs() < 1e-4)).sum(0).numpy()
        for c in range(4):
            want = (case == c).sum(0).numpy()
            assert (np.abs(got["count"][c] - want) <= near).all(), (layer, c)
        both = (case == 3) & ~((gate.abs() < 1e-4) | (up.abs() < 1e-4))
        best = torch.where(both, post, torch.tensor(float("-inf"))).max(0).values
        has = torch.isfinite(best) & (near == 0)
        assert has.any()
        torch.testing.assert_close(got["top"][3][0][0][has], best[has], rtol=1e-4, atol=1e-4)


def test_phi3_weight_diff_finds_a_neuron_changed_in_its_fused_projection():
    """neuron_weight_diff reads a neuron's gate and up rows out of gate_up_proj: changing one neuron's up row there
    shows as that neuron's in_norm, and nowhere else."""
    from mining.diff import _neuron_weights

    a, b = tiny_model("phi3"), tiny_model("phi3")
    n = a.config.intermediate_size
    with torch.no_grad():
        b.model.layers[1].mlp.gate_up_proj.weight[n + 5] *= 3  # the up row of neuron 5 (the gate rows come first)
    for site, rows in (("mlp.hook_pre", slice(0, n)), ("mlp.hook_pre_linear", slice(n, 2 * n))):
        point = resolve_hooks(a, [f"blocks.1.{site}"])[0]
        torch.testing.assert_close(_feature_rows(a, point), a.model.layers[1].mlp.gate_up_proj.weight[rows].double())
    table = _neuron_weights(a, b).to_pandas()
    changed = table[table.in_norm > 0]
    assert list(zip(changed.layer, changed.neuron)) == [(1, 5)]
    up = a.model.layers[1].mlp.gate_up_proj.weight[n + 5].double()
    assert changed.in_norm.iloc[0] == pytest.approx(float(2 * up.norm()), rel=1e-6)  # 3w rounded to float32


@torch.inference_mode()
def test_a_mined_opt_matches_brute_force(tmp_path, smol_tokenizer):
    """OPT's MLP sees the stream as (B*T, d): a job's miner still takes each neuron's activations and DLA by token.
    Against each context recomputed alone with plain hooks: top activations, and DLA's count, mean and top values
    from the raw weights (d_t = gamma * W_U[:, t] centred, s the final stream's standard deviation)."""
    from mining.spec import spec_from_dict

    tiny_model("opt", vocab_size=len(smol_tokenizer), max_position_embeddings=256).save_pretrained(tmp_path)
    smol_tokenizer.save_pretrained(tmp_path)
    spec = spec_from_dict({
        "name": "opt", "model": {"id": str(tmp_path)}, "hooks": ["blocks.*.mlp.hook_post"],
        "corpus": {"source": "builtin:python-docs", "max_tokens": 600, "context_length": 64},
        "stats": {"top_k": 4, "dla": True}, "compute": {"batch_size": 4, "shard_tokens": 256}})
    loaded, shards, stats = mine_merged(spec)

    model, grabbed = loaded.model, {}
    decoder = model.model.decoder
    handles = [blk.fc2.register_forward_pre_hook(lambda m, a, layer=layer: grabbed.__setitem__(layer, a[0]))
               for layer, blk in enumerate(decoder.layers)]
    handles.append(decoder.final_layer_norm.register_forward_pre_hook(lambda m, a: grabbed.__setitem__("final", a[0])))
    acts, dla = {0: [], 1: []}, {0: [], 1: []}
    norm = decoder.final_layer_norm
    try:
        for shard in shards:
            for c in range(len(shard.ids)):
                n = int(shard.length[c])
                ids = torch.from_numpy(shard.ids[c, :n])
                model(ids[None])
                p = torch.arange(int(shard.first[c]), int(shard.first[c] + shard.mined[c]))
                target = torch.cat([ids[1:], torch.tensor([int(shard.next_id[c])])])[p]
                final = grabbed["final"][0, p].double()
                s = torch.sqrt(final.var(-1, unbiased=False) + norm.eps)
                d = model.lm_head.weight[target.clamp(min=0)].double() * norm.weight.double()
                d = d - d.mean(-1, keepdim=True)
                for layer in acts:
                    a = grabbed[layer].reshape(1, n, -1)[0, p].double()  # (B*T, N) as the module saw it
                    acts[layer].append(a)
                    w_out = decoder.layers[layer].fc2.weight.double()  # (d, N)
                    dla[layer].append((a * (d @ w_out) / s[:, None])[target >= 0])
    finally:
        for h in handles:
            h.remove()
    for layer in acts:
        a, values = torch.cat(acts[layer]), torch.cat(dla[layer])
        st = stats[f"blocks.{layer}.mlp.hook_post"]
        top, _ = st.top.finalize()
        torch.testing.assert_close(top.double(), a.topk(4, dim=0).values, rtol=1e-4, atol=1e-5)
        m = st.dla_moments.finalize()
        assert (m["count"] == len(values)).all() and len(values) > 500
        np.testing.assert_allclose(m["mean"], values.mean(0).numpy(), rtol=1e-3, atol=1e-6)
        best, _ = st.dla_top.finalize()
        torch.testing.assert_close(best.double(), values.topk(4, dim=0).values, rtol=1e-4, atol=1e-5)
