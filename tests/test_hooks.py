"""Hook names -> HF modules, checked against recomputation from each layer's own weights."""

from __future__ import annotations

import pytest
import torch
from config_factors import logit_factor, residual_factor
from torch import nn

from mining.architectures import text_config
from mining.errors import UserError
from mining.hooks import (
    HookPoint,
    architecture,
    available_sites,
    capture,
    final_norm,
    mlp_out_weight,
    record,
    resolve_hooks,
    unembedding,
)
from mining.tiny import ARCHS, tiny_model

B, T = 2, 7
# llama attention; experts in one module; a router
MOE = {"olmoe", "mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss", "flex_olmo", "granitemoe"}
LLAMA_LIKE = {"llama", "mistral", "qwen2", "qwen3", "smollm3", "gemma", "gemma2", "gemma3", "olmo", "olmo2",
              "stablelm", "cohere", "cohere2", "granite", "olmo3", "exaone4", "vaultgemma"} | MOE
# the attention output passes this norm before the stream
OUT_NORMS = {"gemma2": "post_attention_layernorm", "gemma3": "post_attention_layernorm",
             "olmo2": "post_attention_layernorm", "olmo3": "post_attention_layernorm",
             "exaone4": "post_attention_layernorm", "glm4": "post_self_attn_layernorm",
             "flex_olmo": "post_attention_layernorm"}
FUSED = {"phi3", "glm", "glm4"}  # gate and up in one matmul, its output chunk(2)
# tiny gpt_neox uses Pythia's parallel residual
PARALLEL = {"gpt_neox", "gptj", "phi", "cohere", "cohere2", "falcon", "codegen"}
# family -> (block list inside the base model, MLP module, input projection, up projection, activation,
#            attention module whose output[0] is z @ W_O + b)
LAYOUT = {
    "gpt2": ("h", "mlp", "mlp.c_fc", None, "mlp.act", "attn"),
    "gpt_neo": ("h", "mlp", "mlp.c_fc", None, "mlp.act", "attn"),
    "gptj": ("h", "mlp", "mlp.fc_in", None, "mlp.act", "attn"),
    "gpt_neox": ("layers", "mlp", "mlp.dense_h_to_4h", None, "mlp.act", "attention"),
    "llama": ("layers", "mlp", "mlp.gate_proj", "mlp.up_proj", "mlp.act_fn", "self_attn"),
    "phi": ("layers", "mlp", "mlp.fc1", None, "mlp.activation_fn", "self_attn"),
    "gpt_bigcode": ("h", "mlp", "mlp.c_fc", None, "mlp.act", "attn"),
    "starcoder2": ("layers", "mlp", "mlp.c_fc", None, "mlp.act", "self_attn"),
    "phi3": ("layers", "mlp", "mlp.gate_up_proj", None, "mlp.activation_fn", "self_attn"),  # gate and up: one matmul
    "glm": ("layers", "mlp", "mlp.gate_up_proj", None, "mlp.activation_fn", "self_attn"),
    "arcee": ("layers", "mlp", "mlp.up_proj", None, "mlp.act_fn", "self_attn"),  # plain MLPs: up, then down
    "nemotron": ("layers", "mlp", "mlp.up_proj", None, "mlp.act_fn", "self_attn"),
    "apertus": ("layers", "mlp", "mlp.up_proj", None, "mlp.act_fn", "self_attn"),
    "glm4": ("layers", "mlp", "mlp.gate_up_proj", None, "mlp.activation_fn", "self_attn"),
    "opt": ("decoder.layers", None, "fc1", None, "activation_fn", "self_attn"),  # no MLP module: fc1 in, fc2 out
    "falcon": ("h", "mlp", "mlp.dense_h_to_4h", None, "mlp.act", "self_attention"),
    "mpt": ("blocks", "ffn", "ffn.up_proj", None, "ffn.act", "attn"),
    "codegen": ("h", "mlp", "mlp.fc_in", None, "mlp.act", "attn"),
    "persimmon": ("layers", "mlp", "mlp.dense_h_to_4h", None, "mlp.act", "self_attn"),
    "xglm": ("layers", None, "fc1", None, "activation_fn", "self_attn"),
    "bloom": ("h", "mlp", "mlp.dense_h_to_4h", None, "mlp.gelu_impl", "self_attention.dense"),  # modules add residuals
    "bert": ("encoder.layer", "intermediate", "intermediate.dense", None, "intermediate.intermediate_act_fn",
             "attention.output.dense"),
}


@pytest.fixture(scope="module", autouse=True)
def no_grad():
    with torch.no_grad():
        yield


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 512, (B, T), generator=torch.Generator().manual_seed(seed))


def layout(arch: str):
    return LAYOUT["llama" if arch in LLAMA_LIKE else arch]


def block(model, layer: int) -> nn.Module:
    blocks, *_ = layout(architecture(model))
    base = getattr(model, model.base_model_prefix, model)
    base = getattr(base, "language_model", base)  # Gemma 3's multimodal wrapper: the text decoder inside
    return base.get_submodule(blocks)[layer]


def linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Recompute a projection from its raw weights (GPT-2's Conv1D stores (in, out))."""
    if isinstance(module, nn.Linear):
        y = x @ module.weight.T
    else:
        y = x @ module.weight
    return y if module.bias is None else y + module.bias


def plain_capture(module: nn.Module, out: dict, key: str, direction: str):
    """An independent plain PyTorch hook, for reference values."""
    if direction == "input":
        return module.register_forward_pre_hook(lambda m, a: out.__setitem__(key, a[0].clone()))
    return module.register_forward_hook(
        lambda m, a, o: out.__setitem__(key, (o[0] if isinstance(o, tuple) else o).clone())
    )


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert b.abs().max() > 1e-3, "reference is ~0; the comparison would be vacuous"
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def hook_counts(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("head", [True, False], ids=["wrapper", "base"])
@pytest.mark.parametrize("arch", [a for a in ARCHS if a not in MOE])
def test_mlp_hooks_match_recomputation(arch, head):
    model = tiny_model(arch, head=head)
    family = architecture(model)
    _, mlp_path, in_path, up_path, act_path, _ = layout(family)
    layer = 1
    blk = block(model, layer)
    ref: dict = {}
    mlp_in = blk.get_submodule(mlp_path or in_path)
    mlp_out = blk.get_submodule({"bert": "output.dense", "opt": "fc2", "bloom": "mlp.dense_4h_to_h", "xglm": "fc2",
                                 "mpt": "ffn.down_proj"}.get(family, mlp_path))
    handles = [plain_capture(mlp_in, ref, "x", "input"), plain_capture(mlp_out, ref, "out", "output")]
    names = [f"blocks.{layer}.mlp.hook_pre", f"blocks.{layer}.mlp.hook_post"]
    if up_path or family in FUSED:
        names.append(f"blocks.{layer}.mlp.hook_pre_linear")
    try:
        with record(model, names) as got:
            model(ids())
    finally:
        for h in handles:
            h.remove()

    if family == "opt":  # its MLP sees the stream as (B*T, d)
        ref = {key: x.unflatten(0, (B, T)) for key, x in ref.items()}
    x = ref["x"]
    act = blk.get_submodule(act_path)
    pre = linear(blk.get_submodule(in_path), x)
    if family in FUSED:  # one matmul: gate, then up (the model's own chunk(2))
        pre, up = pre.chunk(2, dim=-1)
        close(got[f"blocks.{layer}.mlp.hook_pre_linear"], up)
        close(got[f"blocks.{layer}.mlp.hook_post"], act(pre) * up)
    elif up_path:
        up = linear(blk.get_submodule(up_path), x)
        close(got[f"blocks.{layer}.mlp.hook_pre_linear"], up)
        close(got[f"blocks.{layer}.mlp.hook_post"], act(pre) * up)
    else:
        close(got[f"blocks.{layer}.mlp.hook_post"], act(pre))
    close(got[f"blocks.{layer}.mlp.hook_pre"], pre)

    # DLA helper: hook_post @ W_out + b is the MLP's output projection.
    point = resolve_hooks(model, f"blocks.{layer}.mlp.hook_post")[0]
    out_proj = model.get_submodule(point.module_path)
    w = mlp_out_weight(model, layer)
    assert w.shape == (point.width, text_config(model.config).hidden_size)
    bias = out_proj.bias if out_proj.bias is not None else 0
    close(got[point.name] @ w + bias, ref["out"])


@pytest.mark.parametrize("head", [True, False], ids=["wrapper", "base"])
@pytest.mark.parametrize("arch", sorted(MOE))
def test_expert_weights_are_the_routers_softmax_and_expert_neurons_are_refused(arch, head):
    """A mixture-of-experts MLP's router sees the stream as (B*T, d): mlp.hook_expert_weights is softmax(x W_gate^T)
    by token, recomputed from the MLP's input and the router's raw weight, and each token's top experts are the ones
    the model sends it to. Its experts' neurons have no module to hook: one line says so and what to mine instead."""
    model = tiny_model(arch, head=head)
    layer, blk = 1, block(model, 1)
    moe = blk.block_sparse_moe if arch == "granitemoe" else blk.mlp
    router = moe.router if arch in ("gpt_oss", "granitemoe") else moe.gate
    ref: dict = {}
    handles = [plain_capture(moe, ref, "x", "input"),
               router.register_forward_hook(lambda m, a, o: ref.__setitem__("top", o[2].clone()))]
    try:
        with record(model, [f"blocks.{layer}.mlp.hook_expert_weights"]) as got:
            model(ids())
    finally:
        for h in handles:
            h.remove()
    probs = got[f"blocks.{layer}.mlp.hook_expert_weights"]
    bias = getattr(router, "bias", None)  # gpt-oss's router has one
    want = torch.softmax(ref["x"] @ router.weight.T + (0 if bias is None else bias), dim=-1)
    assert probs.shape == (B, T, 8) and probs.dtype == torch.float32
    close(probs, want)
    k = text_config(model.config).num_experts_per_tok
    chosen = ref["top"].reshape(B, T, k).sort(-1).values
    assert torch.equal(probs.topk(k, dim=-1).indices.sort(-1).values, chosen)
    for site in ("mlp.hook_post", "mlp.hook_pre"):
        with pytest.raises(UserError, match=f"{arch}'s experts run as one batched module.*hook_expert_weights") as e:
            resolve_hooks(model, f"blocks.*.{site}")
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("arch", ARCHS)
def test_residual_stream_matches_hidden_states(arch):
    model = tiny_model(arch)
    n = text_config(model.config).num_hidden_layers
    with record(model, ["blocks.*.hook_resid_pre", "blocks.*.hook_resid_post"]) as got:
        hs = model(ids(), output_hidden_states=True).hidden_states
    assert len(hs) == n + 1
    for layer in range(n):
        close(got[f"blocks.{layer}.hook_resid_pre"], hs[layer])
        if layer + 1 < n:
            close(got[f"blocks.{layer}.hook_resid_post"], hs[layer + 1])
            close(got[f"blocks.{layer}.hook_resid_post"], got[f"blocks.{layer + 1}.hook_resid_pre"])
    # The last hidden state is after the final norm (decoders); BERT has none.
    norm = final_norm(model)
    last = got[f"blocks.{n - 1}.hook_resid_post"]
    close(norm(last) if norm is not None else last, hs[n])


@pytest.mark.parametrize("arch", ARCHS)
def test_hook_z_and_resid_mid(arch):
    model = tiny_model(arch)
    family = architecture(model)
    *_, attn_path = layout(family)
    layer = 1
    blk = block(model, layer)
    ref: dict = {}
    h = plain_capture(blk.get_submodule(attn_path), ref, "attn", "output")
    names = [f"blocks.{layer}.{s}" for s in ("attn.hook_z", "hook_resid_pre", "hook_resid_post")]
    if arch not in PARALLEL:
        names.append(f"blocks.{layer}.hook_resid_mid")
    points = resolve_hooks(model, names)
    try:
        with record(model, points) as got:
            model(ids())
    finally:
        h.remove()

    z_point = next(p for p in points if p.site == "attn.hook_z")
    cfg = text_config(model.config)
    assert z_point.n_heads == cfg.num_attention_heads
    assert z_point.width == z_point.n_heads * z_point.d_head
    z = got[z_point.name]
    assert z.shape == (B, T, z_point.width)
    attn_out = linear(model.get_submodule(z_point.module_path), z)
    close(attn_out, ref["attn"])

    if arch in PARALLEL:
        return
    resid_pre, resid_mid = got[f"blocks.{layer}.hook_resid_pre"], got[f"blocks.{layer}.hook_resid_mid"]
    if family == "bert":  # post-norm: LayerNorm(attn_out + resid_pre)
        close(blk.attention.output.LayerNorm(attn_out + resid_pre), resid_mid)
    elif family in OUT_NORMS:  # the attention output's own norm, then the residual stream
        close(resid_pre + blk.get_submodule(OUT_NORMS[family])(attn_out), resid_mid)
    else:  # pre-norm: the residual stream after attention (Granite scales what a block adds)
        close(resid_pre + attn_out * residual_factor(cfg), resid_mid)


@pytest.mark.parametrize("arch", ARCHS)
def test_attn_out_and_mlp_out_are_what_each_adds_to_the_stream(arch):
    """hook_attn_out and hook_mlp_out (TransformerLens' names): the stream after attention is the stream before it
    plus attn_out, the block's output that plus mlp_out (both, on a parallel block; times Granite's multiplier);
    BERT normalizes each sum. attn_out is also the attention's projection of z, through its output norm where
    the family has one."""
    model = tiny_model(arch)
    layer, cfg = 1, text_config(model.config)
    names = [f"blocks.{layer}.{s}" for s in ("hook_resid_pre", "attn.hook_z", "hook_attn_out", "hook_mlp_out",
                                             "hook_resid_post")]
    names += [f"blocks.{layer}.hook_resid_mid"] if arch not in PARALLEL else []
    points = {p.site: p for p in resolve_hooks(model, names)}
    assert points["hook_attn_out"].width == points["hook_mlp_out"].width == points["hook_resid_pre"].width
    with torch.inference_mode(), record(model, list(points.values())) as got:
        model(ids())
    got = {site: got[p.name] for site, p in points.items()}
    blk, scale = block(model, layer), residual_factor(cfg)
    projected = linear(model.get_submodule(points["attn.hook_z"].module_path), got["attn.hook_z"])
    family = architecture(model)
    close(blk.get_submodule(OUT_NORMS[family])(projected) if family in OUT_NORMS else projected,
          got["hook_attn_out"])
    if family == "bert":  # post-norm
        close(blk.attention.output.LayerNorm(got["hook_resid_pre"] + got["hook_attn_out"]), got["hook_resid_mid"])
        close(blk.output.LayerNorm(got["hook_resid_mid"] + got["hook_mlp_out"]), got["hook_resid_post"])
    elif arch in PARALLEL:
        close(got["hook_resid_pre"] + (got["hook_attn_out"] + got["hook_mlp_out"]) * scale, got["hook_resid_post"])
    else:
        close(got["hook_resid_pre"] + got["hook_attn_out"] * scale, got["hook_resid_mid"])
        close(got["hook_resid_mid"] + got["hook_mlp_out"] * scale, got["hook_resid_post"])


NO_INPUT_NORMS = {"olmo2", "olmo3", "exaone4", "flex_olmo", "bert"}  # no norm before attention and the MLP


def _first_input(module: nn.Module, out: dict, key: str):
    """A module's input hidden states (positional or keyword), as (B, T, d) (OPT's MLP and routers see B*T rows)."""
    def hook(m, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        out[key] = x.reshape(B, T, -1).clone()
    return module.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("arch, overrides", [(a, {}) for a in ARCHS if a not in NO_INPUT_NORMS] + [
    ("falcon", {"new_decoder_architecture": True, "num_ln_in_parallel_attn": 2}),  # Falcon-40B: ln_attn, ln_mlp
    ("falcon", {"new_decoder_architecture": True, "num_ln_in_parallel_attn": 1}),
    ("falcon", {"parallel_attn": False}), ("stablelm", {"use_parallel_residual": True}),
    ("gpt_neox", {"use_parallel_residual": False})])
def test_ln_normalized_is_what_attention_and_the_mlp_read(arch, overrides):
    """ln1.hook_normalized is the attention module's input, ln2.hook_normalized the MLP's (its first projection's,
    or a router's): each norm's output with its weight, what a transcoder reads."""
    model = tiny_model(arch, **overrides)
    layer = 1
    mlp_site = "mlp.hook_expert_weights" if arch in MOE else "mlp.hook_pre"
    points = {p.site: p for p in resolve_hooks(model, [f"blocks.{layer}.{s}" for s in (
        "ln1.hook_normalized", "ln2.hook_normalized", "attn.hook_pattern", mlp_site, "hook_resid_pre")], 8)}
    assert points["ln1.hook_normalized"].width == points["ln2.hook_normalized"].width == points["hook_resid_pre"].width
    ref: dict = {}
    handles = [_first_input(model.get_submodule(points["attn.hook_pattern"].module_path), ref, "attn"),
               _first_input(model.get_submodule(points[mlp_site].module_path), ref, "mlp")]
    try:
        with record(model, [points["ln1.hook_normalized"], points["ln2.hook_normalized"],
                            points["hook_resid_pre"]]) as got:
            model(ids())
    finally:
        for h in handles:
            h.remove()
    close(got[points["ln1.hook_normalized"].name], ref["attn"])
    close(got[points["ln2.hook_normalized"].name], ref["mlp"])
    assert not torch.allclose(ref["attn"], got[points["hook_resid_pre"].name], atol=1e-3)  # a norm, not the stream


@pytest.mark.parametrize("arch", sorted(NO_INPUT_NORMS))
def test_families_without_input_norms_refuse_ln_normalized_in_one_line(arch):
    model = tiny_model(arch)
    assert not {"ln1.hook_normalized", "ln2.hook_normalized"} & set(available_sites(model))
    with pytest.raises(UserError, match="ln2.hook_normalized does not exist for .*(post-norm|without a norm)"):
        resolve_hooks(model, ["blocks.0.ln2.hook_normalized"])


@pytest.mark.parametrize("arch, sequential", [("gpt_neox", {"use_parallel_residual": False}),
                                            ("falcon", {"parallel_attn": False})])  # falcon-rw
def test_sequential_variants_of_parallel_families_have_resid_mid(arch, sequential):
    model = tiny_model(arch, **sequential)
    assert "hook_resid_mid" in available_sites(model)
    with record(model, ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid"]) as got:
        model(ids())
    attn = block(model, 0).get_submodule(layout(arch)[-1])
    ref: dict = {}
    h = plain_capture(attn, ref, "attn", "output")
    model(ids())
    h.remove()
    close(got["blocks.0.hook_resid_pre"] + ref["attn"], got["blocks.0.hook_resid_mid"])


@pytest.mark.parametrize("arch", ARCHS)
def test_all_sites_shapes_under_inference_mode(arch):
    model = tiny_model(arch)
    points = resolve_hooks(model, [f"blocks.*.{s}" for s in available_sites(model)], context_length=T + 3)
    seen: dict[str, tuple] = {}

    def fn(point: HookPoint, x: torch.Tensor) -> None:
        seen[point.name] = tuple(x.shape)

    with torch.inference_mode(), capture(model, points, fn):
        model(ids())
    assert seen == {p.name: (B, T, p.width) for p in points}


@pytest.mark.parametrize("arch", ARCHS)
def test_unembedding_and_final_norm(arch):
    model = tiny_model(arch)
    w_u = unembedding(model)
    assert w_u.shape == (text_config(model.config).hidden_size, text_config(model.config).vocab_size)
    if architecture(model) == "bert":
        assert final_norm(model) is None
        assert unembedding(tiny_model(arch, head=False)).shape == w_u.shape  # tied embeddings
        return
    n = text_config(model.config).num_hidden_layers
    with record(model, [f"blocks.{n - 1}.hook_resid_post"]) as got:
        logits = model(ids()).logits
    bias = model.get_output_embeddings().bias
    pre_cap = final_norm(model)(got[f"blocks.{n - 1}.hook_resid_post"]) @ w_u + (0 if bias is None else bias)
    cap = getattr(model.config, "final_logit_softcapping", None)  # Gemma 2: cap * tanh(logits / cap)
    pre_cap = pre_cap * logit_factor(model.config)
    close(pre_cap if cap is None else cap * torch.tanh(pre_cap / cap), logits)


@pytest.mark.parametrize("arch", ARCHS)
def test_pattern_is_the_models_own_attention(arch):
    """attn.hook_pattern at token (b, q) is TransformerLens' pattern[b, :, q, :], heads flattened, each head's keys
    zero-padded to the context length: here against the attentions the model itself returns (eager attention,
    output_attentions=True). A model on SDPA runs it before and after: capture switched it to eager only inside."""
    model = tiny_model(arch)
    before = model.config._attn_implementation
    n_ctx = T + 3
    points = resolve_hooks(model, "blocks.*.attn.hook_pattern", context_length=n_ctx)
    assert [(p.width, p.n_heads, p.n_ctx) for p in points] == [(4 * n_ctx, 4, n_ctx)] * len(points)
    with record(model, points) as got:
        model(ids())
    assert model.config._attn_implementation == before
    model.set_attn_implementation("eager")
    want = model(ids(), output_attentions=True).attentions
    model.set_attn_implementation(before)
    assert len(want) == len(points)
    for p, a in zip(points, want):
        rows = got[p.name].view(B, T, 4, n_ctx)
        assert torch.equal(rows[..., :T], a.transpose(1, 2)) and not rows[..., T:].any()
    if arch != "bert":  # causal: a query sees no later key
        assert not torch.triu(got[points[0].name].view(B, T, 4, n_ctx)[..., :T].transpose(1, 2), 1).any()


def test_a_pattern_longer_than_the_context_length_is_refused_in_one_line():
    model = tiny_model("llama")
    with pytest.raises(UserError, match="7 key positions.*at most 5") as caught:
        with record(model, ["blocks.0.attn.hook_pattern"], context_length=5):
            model(ids())
    assert "\n" not in str(caught.value)


def test_glob_sort_dedup_and_paths():
    model = tiny_model("llama")
    points = resolve_hooks(
        model, ["blocks.1.hook_resid_post", "blocks.*.mlp.hook_post", "blocks.0.hook_resid_pre", "blocks.1.mlp.hook_post"]
    )
    assert [p.name for p in points] == [
        "blocks.0.hook_resid_pre", "blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post", "blocks.1.hook_resid_post",
    ]
    post = points[1]
    assert (post.site, post.layer, post.module_path, post.direction, post.width) == (
        "mlp.hook_post", 0, "model.layers.0.mlp.down_proj", "input", 64,
    )
    assert points[0].module_path == "model.layers.0" and points[0].direction == "input"
    assert resolve_hooks(tiny_model("llama", head=False), "blocks.0.mlp.hook_post")[0].module_path == "layers.0.mlp.down_proj"
    assert [p.module_path for p in resolve_hooks(tiny_model("gpt2"), "blocks.*.mlp.hook_post")] == [
        "transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj",
    ]
    assert resolve_hooks(tiny_model("bert"), "blocks.1.hook_resid_mid")[0].module_path == (
        "bert.encoder.layer.1.attention.output.LayerNorm"
    )
    for arch in ARCHS:
        m = tiny_model(arch)
        layers = text_config(m.config).num_hidden_layers
        site = "mlp.hook_expert_weights" if arch in MOE else "mlp.hook_post"
        assert [p.layer for p in resolve_hooks(m, f"blocks.*.{site}")] == list(range(layers))


def test_capture_gives_views_not_copies():
    model = tiny_model("gpt2")
    point = resolve_hooks(model, "blocks.0.mlp.hook_post")[0]
    ptrs: dict = {}
    h = model.get_submodule(point.module_path).register_forward_pre_hook(
        lambda m, a: ptrs.__setitem__("ref", a[0].data_ptr())
    )
    with capture(model, [point], lambda p, x: ptrs.__setitem__("got", x.data_ptr())):
        model(ids())
    h.remove()
    assert ptrs["got"] == ptrs["ref"]


@pytest.mark.parametrize(
    "arch, name, expect",
    [
        ("llama", "blocks.0.mlp.hook_postt", "blocks.{L}.mlp.hook_post"),
        ("llama", "mlp.hook_post", "blocks.{L}.hook_resid_pre"),
        ("llama", "blocks.x.mlp.hook_post", "0..1"),
        ("llama", "blocks.2.mlp.hook_post", "layers 0..1"),
        ("gpt2", "blocks.-1.hook_resid_post", "layers 0..1"),
        ("gpt2", "blocks.0.mlp.hook_pre_linear", "gated"),
        ("gpt_neox", "blocks.0.hook_resid_mid", "parallel residual"),
        ("gptj", "blocks.*.hook_resid_mid", "parallel residual"),
        ("bert", "blocks.0.attn.hook_pattern", "give the context length"),
    ],
)
def test_bad_names(arch, name, expect):
    model = tiny_model(arch)
    with pytest.raises(UserError) as e:
        resolve_hooks(model, [name])
    assert expect in str(e.value)
    assert "\n" not in str(e.value)


def test_empty_patterns():
    with pytest.raises(UserError, match="no hook names"):
        resolve_hooks(tiny_model("gpt2"), [])


def test_unknown_architecture_lists_modules():
    from transformers import T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(
        T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    ).eval()
    with pytest.raises(UserError) as e:
        resolve_hooks(t5, ["blocks.0.mlp.hook_post"])
    msg = str(e.value)
    assert "'t5'" in msg and "encoder.block.*.layer" in msg and "llama" in msg

    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = nn.ModuleList([nn.Sequential(nn.Linear(4, 4), nn.ReLU())])

    for fn in (architecture, available_sites, final_norm):
        with pytest.raises(UserError) as e:
            fn(Custom())
        assert "Custom" in str(e.value) and "trunk.*" in str(e.value)


def test_hooks_removed_even_on_exception():
    model = tiny_model("qwen2")
    before = hook_counts(model)
    points = resolve_hooks(model, [f"blocks.*.{s}" for s in available_sites(model)], context_length=T)
    with pytest.raises(RuntimeError, match="boom"):
        with capture(model, points, lambda p, x: None):
            assert hook_counts(model) == before + len(points) and model.config._attn_implementation == "eager"
            model(ids())
            raise RuntimeError("boom")
    assert hook_counts(model) == before and model.config._attn_implementation == "sdpa"  # a pattern's eager undone

    def explode(point, x):
        raise ValueError("from fn")

    with pytest.raises(ValueError, match="from fn"):
        with capture(model, points, explode):
            model(ids())
    assert hook_counts(model) == before
    with record(model, points) as got:
        model(ids())
    assert len(got) == len(points) and hook_counts(model) == before


@pytest.mark.parametrize("arch, overrides, says", [
    ("opt", {"do_layer_norm_before": False}, "unsupported opt model: OPT-350m normalizes after"),
    ("opt", {"word_embed_proj_dim": 16}, "unsupported opt model: OPT-350m normalizes after"),
    ("bloom", {"pretraining_tp": 2, "slow_but_exact": True}, "unsupported bloom model: .* slow_but_exact"),
    ("bloom", {"apply_residual_connection_post_layernorm": True}, "unsupported bloom model: .* is normalized"),
    ("falcon", {"new_decoder_architecture": True, "parallel_attn": False, "num_kv_heads": 2},
     "unsupported falcon model: .* a second time"),
])
def test_variants_the_table_does_not_describe_are_refused_in_one_line(arch, overrides, says):
    """OPT-350m alone is post-norm and projects the stream in and out of a smaller embedding; a BLOOM run as slices of
    its weights never calls the modules hooked: no hook, DLA or logit lens of the table's would read them right."""
    model = tiny_model(arch, **overrides)
    with pytest.raises(UserError, match=says) as caught:
        resolve_hooks(model, "blocks.*.mlp.hook_post")
    assert "\n" not in str(caught.value)
