"""TransformerLens-style hook names on Hugging Face models, captured with plain PyTorch hooks.

    points = resolve_hooks(model, ["blocks.*.mlp.hook_post", "blocks.3.hook_resid_post"])
    with capture(model, points, lambda point, x: ...):   # x: (B, T, point.width), a view (a chunk: a copy)
        model(input_ids)

Sites (per block L): hook_resid_pre, ln1.hook_normalized, attn.hook_pattern, attn.hook_z, hook_attn_out,
hook_resid_mid, ln2.hook_normalized, mlp.hook_pre, mlp.hook_pre_linear (gated MLPs), mlp.hook_post, hook_mlp_out,
hook_resid_post, and mlp.hook_expert_weights (mixture-of-experts routers). lnN.hook_normalized is what attention
(ln1) and the MLP (ln2) read: their norm's output, its weight applied (TransformerLens' name, unfolded). The module
each one maps to, per architecture, is in mining/architectures.py. Hooks read tensors only, so they work under
torch.inference_mode and with any attention implementation; a pattern needs eager attention, which capture()
switches on while one is hooked.

attn.hook_pattern is one query token's attention over the context's key positions, per head: TransformerLens'
pattern[b, h, q, k] at token (b, q) is feature h * context_length + k, keys past the query (or past the context)
are 0. Its width is fixed by the job's context length, so resolve_hooks takes it.

SITE.hook_sae_acts_post is an SAE's latents of SITE's activation (SAELens' name): resolve_hooks takes the job's
SAEs by the hook they read (mining/sae.py), and the point encodes what its base site captures.
"""

from __future__ import annotations

import re
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from .architectures import IN, SITE_ORDER, arch_of, dims, locate, model_type, sites_for, text_config, why_missing
from .errors import UserError
from .sae import SAE, SUFFIX, split_sae

_NAME = re.compile(r"blocks\.(\*|-?\d+)\.([A-Za-z0-9_.]+)")


@dataclass(frozen=True)
class HookPoint:
    name: str
    """Full TransformerLens name, e.g. "blocks.5.mlp.hook_post"."""
    site: str
    """Name without the layer, e.g. "mlp.hook_post"."""
    layer: int
    module_path: str
    """Hugging Face module hooked, e.g. "model.layers.5.mlp.down_proj"."""
    direction: str
    """"input" (forward pre-hook) or "output" (forward hook)."""
    width: int
    """Features per token after flattening heads."""
    n_heads: int | None = None
    """attn.hook_z only: width == n_heads * d_head, head-major."""
    d_head: int | None = None
    chunk: tuple[int, int] | None = None
    """(i, n): the activation is the i-th of n equal slices of the module's last dimension (Phi-3's gate_up_proj
    holds gate, then up); None: all of it."""
    softmax: bool = False
    """The activation is the softmax of the module's output (a MoE router's logits -> routing probabilities)."""
    n_ctx: int | None = None
    """attn.hook_pattern only: key positions per head (the job's context length); width == n_heads * n_ctx."""
    sae: SAE | None = field(default=None, compare=False, repr=False)
    """SITE.hook_sae_acts_post only: the SAE encoding the base site's activation; width == sae.d_sae latents."""

    @property
    def output_index(self) -> int:
        """Which of the hooked module's outputs: an attention module returns (output, pattern)."""
        return 1 if self.n_ctx else 0


def architecture(model: nn.Module) -> str:
    """Normalized family name (architectures.MODEL_TYPES): gpt2, gpt_neo, gpt_neox, gptj, llama (also mistral,
    qwen2, qwen3, smollm3), gemma, gemma2, gemma3 (also gemma3_text), olmo, olmo2, phi, phi3, gpt_bigcode, starcoder2,
    stablelm, opt, bloom, bert; mixture-of-experts olmoe, mixtral, qwen2_moe, qwen3_moe, gpt_oss."""
    return arch_of(model).family


def available_sites(model: nn.Module) -> list[str]:
    """Sites this model has, in block order, e.g. ["hook_resid_pre", "attn.hook_z", ...]."""
    return [s for s in SITE_ORDER if s in sites_for(arch_of(model), model.config)]


def _valid_names(model: nn.Module, n_layers: int) -> str:
    sites = ", ".join(f"blocks.{{L}}.{s}" for s in available_sites(model))
    return f"valid hooks for this {model_type(model)} model: {sites} with L in 0..{n_layers - 1} or *"


def n_layers(model: nn.Module) -> int:
    return len(locate(model, arch_of(model))[1])


def resolve_hooks(model: nn.Module, patterns: Sequence[str] | str, context_length: int | None = None,
                  saes: Mapping[str, SAE] | None = None) -> list[HookPoint]:
    """Hook names (a `*` layer means every layer) -> points sorted by (layer, site order), deduplicated.
    context_length: the longest context the model will see, which attn.hook_pattern needs (its keys).
    saes: base hook name -> SAE, for SITE.hook_sae_acts_post names (a `*` layer: the layers that have one)."""
    saes = saes or {}
    arch = arch_of(model)
    prefix, blocks = locate(model, arch)
    n_layers = len(blocks)
    sites = sites_for(arch, model.config)
    d = dims(model.config)
    if isinstance(patterns, str):
        patterns = [patterns]
    if not patterns:
        raise UserError(f"no hook names given; {_valid_names(model, n_layers)}")

    points: dict[str, HookPoint] = {}
    for pattern in patterns:
        m = _NAME.fullmatch(str(pattern).strip())
        if m is None:
            raise UserError(f"bad hook name {pattern!r}; {_valid_names(model, n_layers)}")
        layer_s, site = m.groups()
        base, latents = split_sae(site)
        if base not in sites:
            reason = why_missing(arch, model.config, base) or f"unknown site {base!r}"
            raise UserError(f"{pattern!r}: {reason}; {_valid_names(model, n_layers)}")
        if latents and base in ("attn.hook_pattern", "mlp.hook_expert_weights"):
            raise UserError(f"{pattern!r}: an SAE reads a residual stream, attn.hook_z or an MLP site, not {base}")
        if layer_s == "*":
            layers = [L for L in range(n_layers) if f"blocks.{L}.{base}" in saes] if latents else range(n_layers)
            if latents and not layers:
                raise UserError(f"{pattern!r}: no SAE reads blocks.*.{base}; give them under saes:, e.g. "
                                f"saes: {{blocks.0.{base}: DIR}}")
        else:
            layers = [int(layer_s)]
            if not 0 <= layers[0] < n_layers:
                raise UserError(f"{pattern!r}: layer {layer_s} out of range, this model has layers 0..{n_layers - 1}")
        rel, direction = sites[base]
        for layer in layers:
            path = f"{prefix}{arch.layers}.{layer}" + (f".{rel}" if rel else "")
            name = f"blocks.{layer}.{site}"
            if latents:
                points[name] = _sae_point(name, site, layer, path, direction, saes.get(f"blocks.{layer}.{base}"),
                                          d, arch.chunks.get(base), sites, n_layers)
                continue
            if site == "attn.hook_z":
                extra = {"width": _base_width(site, d), "n_heads": d["n_heads"], "d_head": d["d_head"]}
            elif site == "attn.hook_pattern":
                if not context_length:
                    raise UserError(f"{pattern!r}: an attention pattern's width is heads x key positions; "
                                    "give the context length (corpus.context_length)")
                extra = {"width": d["n_heads"] * context_length, "n_heads": d["n_heads"], "n_ctx": context_length}
            elif site == "mlp.hook_expert_weights":  # TransformerLens': the softmax of the router's logits
                extra = {"width": d["n_experts"], "softmax": True}
            else:
                extra = {"width": _base_width(site, d)}
            points[name] = HookPoint(name, site, layer, path, direction, chunk=arch.chunks.get(site), **extra)
    return sorted(points.values(), key=lambda p: (p.layer, SITE_ORDER.index(split_sae(p.site)[0]), p.site))


def _base_width(site: str, d: Mapping[str, int]) -> int:
    """Features a token of a site that is one tensor per block (heads flattened)."""
    return d["n_heads"] * d["d_head"] if site == "attn.hook_z" else d["d_mlp"] if site.startswith("mlp.") \
        else d["d_model"]


def _sae_point(name: str, site: str, layer: int, path: str, direction: str, sae: SAE | None, d: Mapping[str, int],
               chunk: tuple[int, int] | None, sites: Mapping[str, object], n_layers: int) -> HookPoint:
    base = name.removesuffix(SUFFIX)
    if sae is None:
        raise UserError(f"{name!r}: no SAE reads {base}; give one under saes:, e.g. saes: {{{base}: DIR}}")
    width = _base_width(split_sae(site)[0], d)
    if sae.d_in != width:
        raise UserError(f"saes.{base}: the SAE reads {sae.d_in} features, {base} has {width}; is it this model's "
                        "SAE, for this hook?")
    if sae.out_hook:  # a transcoder told what it writes: a hook of the same block, of its width
        out_site = sae.out_site
        if not sae.out_hook.startswith(f"blocks.{layer}.") or out_site not in sites:
            raise UserError(f"saes.{base}: the transcoder writes {sae.out_hook}; only a hook of the block it reads "
                            f"(blocks.{layer}) that this model has is supported")
        if sae.d_out != _base_width(out_site, d):
            raise UserError(f"saes.{base}: the transcoder writes {sae.d_out} features, {sae.out_hook} has "
                            f"{_base_width(out_site, d)}; is it this model's transcoder?")
        n_out = getattr(sae, "n_out", 1)  # a cross-layer transcoder writes out_site of later blocks too
        if layer + n_out > n_layers:
            raise UserError(f"saes.{base}: the cross-layer transcoder writes {out_site} of blocks {layer}.."
                            f"{layer + n_out - 1}, this model has blocks 0..{n_layers - 1}; is it this model's?")
    return HookPoint(name, site, layer, path, direction, sae.d_sae, chunk=chunk, sae=sae)


def take(point: HookPoint, x: torch.Tensor) -> torch.Tensor:
    """The point's activation from its module's tensor (..., features): all of it, its chunk as a contiguous copy
    (the kernels read contiguous rows; the fused projection's output is dropped after the MLP anyway), or its
    softmax (a router's logits); an SAE's latents of that (a new tensor)."""
    width = (point.sae.d_in if point.sae else point.width) * (point.chunk[1] if point.chunk else 1)
    if x.shape[-1] != width:
        raise UserError(
            f"{point.name} ({point.module_path} {point.direction}) has {x.shape[-1]} features but the model "
            f"config implies {width}; config and weights disagree"
        )
    if point.softmax:  # float32 at least, as the routers take it
        return torch.softmax(x, dim=-1, dtype=torch.promote_types(x.dtype, torch.float32))
    if point.chunk is not None:
        i, w = point.chunk[0], width // point.chunk[1]
        x = x[..., i * w:(i + 1) * w].contiguous()
    return point.sae.encode(x) if point.sae else x


def pattern_rows(point: HookPoint, x: torch.Tensor | None) -> torch.Tensor:
    """Attention weights (B, heads, T, K) -> (B, T, heads * n_ctx): each query token's row over the keys, per head,
    the keys zero-padded to n_ctx (a copy)."""
    if x is None:
        raise UserError(f"{point.name}: the model returned no attention pattern; it runs an attention "
                        "implementation that never materializes one and cannot switch to eager: load it with "
                        "attn_implementation='eager'")
    B, H, T, K = x.shape
    if H != point.n_heads or K > point.n_ctx:
        raise UserError(f"{point.name}: the attention pattern has {H} heads and {K} key positions, the hook expects "
                        f"{point.n_heads} heads and at most {point.n_ctx} (the context length)")
    rows = x.new_zeros(B, T, H, point.n_ctx)
    rows[..., :K] = x.transpose(1, 2)
    return rows.flatten(2)


def as_btw(point: HookPoint, x: torch.Tensor, batch_shape: Sequence[int] = ()) -> torch.Tensor:
    """A hooked module's tensor as the point's (B, T, width) activation: heads flattened, a (B*T, ...) tensor given
    back its batch_shape (B, T), then take(); an attention pattern laid out by pattern_rows."""
    if point.n_ctx:
        return pattern_rows(point, x)
    if x.dim() == 2 and batch_shape:
        x = x.unflatten(0, tuple(batch_shape))
    return take(point, x.flatten(2) if x.dim() > 3 else x)


def _output(point: HookPoint, value):
    return value[point.output_index] if isinstance(value, (tuple, list)) else value


@contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Run the model with eager attention inside the block (patterns exist only there), then switch back
    (`set_attn_implementation`, transformers 5.x; a model that cannot switch must be loaded with
    attn_implementation="eager")."""
    before = getattr(model.config, "_attn_implementation", None)
    switch = before not in (None, "eager") and hasattr(model, "set_attn_implementation")
    if switch:
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(before)


@contextmanager
def capture(model: nn.Module, points: Sequence[HookPoint], fn: Callable[[HookPoint, torch.Tensor], None]):
    """Registers hooks; fn receives each activation as (B, T, width) (a view, no copy; a chunk of a fused
    projection and a pattern are copied) during the forward; hooks removed in finally. With a pattern among the
    points the model runs eager attention inside the block."""
    handles = []
    batch_shape: list[int] = []  # (B, T) of the forward under way, where a module sees the stream as (B*T, ...)

    def pre_hook(point: HookPoint):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            fn(point, as_btw(point, x, batch_shape))

        return hook

    def post_hook(point: HookPoint):
        def hook(module, args, output):
            fn(point, as_btw(point, _output(point, output), batch_shape))

        return hook

    def keep_batch_shape(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        ids = kwargs.get("inputs_embeds") if ids is None else ids
        batch_shape[:] = ids.shape[:2]

    patterns = eager_attention(model) if any(p.n_ctx for p in points) else nullcontext()
    try:
        if points and arch_of(model).flat_tokens:  # OPT's MLP, a MoE router: the model's input gives (B, T)
            handles.append(model.register_forward_pre_hook(keep_batch_shape, with_kwargs=True))
        for point in points:
            try:
                module = model.get_submodule(point.module_path)
            except AttributeError:
                raise UserError(f"hook {point.name}: this model has no module {point.module_path}") from None
            if point.direction == IN:
                handles.append(module.register_forward_pre_hook(pre_hook(point), with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(post_hook(point)))
        with patterns:
            yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def record(model: nn.Module, points: Sequence[HookPoint | str],
           context_length: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Yields a dict name -> detached clone of the activation (B, T, width) from the last forward.

    `points` may be HookPoints or hook names/patterns (context_length as resolve_hooks takes it). For tests and
    small jobs only: it copies.
    """
    names = [p for p in points if isinstance(p, str)]
    resolved = [p for p in points if not isinstance(p, str)]
    resolved += resolve_hooks(model, names, context_length) if names else []
    out: dict[str, torch.Tensor] = {}

    def keep(point: HookPoint, x: torch.Tensor) -> None:
        out[point.name] = x.detach().clone()

    with capture(model, resolved, keep):
        yield out


# ---- helpers for direct logit attribution -------------------------------------------------------


def final_norm(model: nn.Module) -> nn.Module | None:
    """The norm applied to the last residual stream before the unembedding; None for BERT (post-norm:
    the last block's output is already normalized; BertForMaskedLM's head transform is not a norm)."""
    arch = arch_of(model)
    if arch.final_norm is None:
        return None
    prefix, _ = locate(model, arch)
    return model.get_submodule(prefix + arch.final_norm)


def out_norm(model: nn.Module, layer: int, part: str = "mlp") -> nn.Module | None:
    """The norm the output of layer `layer`'s `part` ("mlp" or "attn") passes before the residual stream (Gemma 2/3,
    OLMo 2), or None."""
    arch = arch_of(model)
    if part not in arch.out_norms:
        return None
    _, blocks = locate(model, arch)
    return blocks[layer].get_submodule(arch.out_norms[part])


def norm_gain(model: nn.Module, norm: nn.Module) -> torch.Tensor:
    """A norm's elementwise gain gamma as float32: its weight, plus one for Gemma's RMSNorm; ones for a norm without
    a weight (OLMo 1's)."""
    weight = getattr(norm, "weight", None)
    if weight is None:
        return torch.ones(dims(model.config)["d_model"], device=unembedding(model).device)
    offset = arch_of(model).norm_offset
    return weight.detach().float() + offset if offset else weight.detach().float()


def write_gain(model: nn.Module, layer: int, part: str = "mlp", norm: bool = True) -> torch.Tensor | None:
    """What the output of layer `layer`'s `part` ("mlp" or "attn") is multiplied by, feature by feature, on its way
    into the residual stream: its output norm's gain (Gemma 2/3, OLMo 2, GLM-4; that norm's per-token scale is the
    caller's) times the family's block multiplier (Granite's), as (d_model,) float32; norm=False: the multiplier
    alone (what hook_attn_out and hook_mlp_out, read after the norm, still pass). None where both are 1. The one
    place DLA (neurons, heads, latents) and the logit lens take this from."""
    arch = arch_of(model)
    scale = arch.residual_scale(text_config(model.config))
    out = out_norm(model, layer, part) if norm else None
    if out is None:
        return None if scale == 1.0 else torch.full((dims(model.config)["d_model"],), float(scale),
                                                     device=unembedding(model).device)
    gain = norm_gain(model, out)
    return gain if scale == 1.0 else gain * scale


def unembedding(model: nn.Module) -> torch.Tensor:
    """W_U as (d_model, vocab), a view of the weight (no copy). Bare base models fall back to the
    input embedding when the config ties the two."""
    arch_of(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        if not getattr(model.config, "tie_word_embeddings", False):
            raise UserError(
                f"{type(model).__name__} has no unembedding (and untied embeddings); load the model with its LM head"
            )
        head = model.get_input_embeddings()
    return head.weight.T


def mlp_out_weight(model: nn.Module, layer: int) -> torch.Tensor:
    """The MLP output projection as (width, d_model) so that hook_post @ W (+ bias) = MLP output."""
    return out_weight(model, layer, "mlp.hook_post")


def out_weight(model: nn.Module, layer: int, site: str) -> torch.Tensor:
    """The output projection a site is the input of (mlp.hook_post: the MLP's; attn.hook_z: the attention's) as
    (width, d_model), so that activation @ W (+ bias) = its output. GPT-2's Conv1D already stores (in, out);
    nn.Linear stores (out, in) and is transposed (a view)."""
    point = resolve_hooks(model, [f"blocks.{layer}.{site}"])[0]
    module = model.get_submodule(point.module_path)
    w = module.weight.T if isinstance(module, nn.Linear) else module.weight
    d_model = dims(model.config)["d_model"]
    if tuple(w.shape) != (point.width, d_model):
        raise UserError(f"{point.module_path} weight has shape {tuple(module.weight.shape)}, "
                        f"expected ({point.width}, {d_model}) or its transpose")
    return w
