"""Per-architecture table: TransformerLens hook sites -> Hugging Face module paths.

Each site names a module inside one block and whether the activation is that module's
input (forward pre-hook) or output (forward hook). "" is the block itself.

| site                | gpt2 / gpt_neo          | gpt_neox (Pythia)         | gptj          | llama-like              | bert                        |
|---------------------|-------------------------|---------------------------|---------------|-------------------------|-----------------------------|
| hook_resid_pre      | block in                | block in                  | block in      | block in                | layer in                    |
| ln1.hook_normalized | ln_1 out                | input_layernorm out       | ln_1 out      | input_layernorm out     | -                           |
| attn.hook_pattern   | attn out[1]             | attention out[1]          | attn out[1]   | self_attn out[1]        | attention.self out[1]       |
|                     | (neo: attn.attention)   |                           |               |                         |                             |
| attn.hook_z         | attn.c_proj in          | attention.dense in        | attn.out_proj | self_attn.o_proj in     | attention.output.dense in   |
|                     | (neo: attn.attention.out_proj)                      | in            |                         |                             |
| hook_resid_mid      | ln_2 in                 | post_attention_layernorm  | -             | post_attention_layernorm| attention.output.LayerNorm  |
|                     |                         | in (only if not parallel) |               | in                      | out                         |
| ln2.hook_normalized | ln_2 out                | post_attention_layernorm  | ln_1 out      | post_attention_layernorm| -                           |
|                     |                         | out                       |               | out                     |                             |
| mlp.hook_pre        | mlp.c_fc out            | mlp.dense_h_to_4h out     | mlp.fc_in out | mlp.gate_proj out       | intermediate.dense out      |
| mlp.hook_pre_linear | -                       | -                         | -             | mlp.up_proj out         | -                           |
| mlp.hook_post       | mlp.c_proj in           | mlp.dense_4h_to_h in      | mlp.fc_out in | mlp.down_proj in        | output.dense in             |
| hook_mlp_out        | mlp out                 | mlp out                   | mlp out       | mlp out                 | output.dense out            |
| hook_resid_post     | block out               | block out                 | block out     | block out               | layer out                   |

hook_attn_out is the attention module's output[0] (bert: attention.output.dense out) - attn.hook_pattern's module -
and hook_mlp_out the MLP module's output, mlp.hook_post's module's parent (opt, xglm: fc2; bloom, mpt, whose modules
add the residual themselves: their output projections). Where a family has output norms (out_norms), both are those
norms' outputs: what joins the residual stream (Granite's multiplier aside).

ln1/ln2.hook_normalized are the outputs of the norms attention and the MLP read (TransformerLens' names, without
folding: the norm's weight applied); a parallel block's MLP reads the attention's norm (GPT-J, Phi, Cohere, Falcon-7B)
or its own (GPT-NeoX, Falcon-40B's ln_mlp). Families without a norm before attention and the MLP (OLMo 2/3, EXAONE
4.0, FlexOlmo) and the post-norm BERT have neither.

attn.hook_pattern is the attention weights (B, heads, query, key) the attention module returns beside its output.
They exist only with eager attention, so hooks.capture switches the model to eager while a pattern is hooked. The
module is attn.hook_z's module's parent in every family but BERT.

llama-like = llama, mistral, ministral, qwen2, qwen3, smollm3, seed_oss, ernie4_5, helium, hunyuan_v1_dense (same
module names, pre-norm, gated MLP); gemma too, whose RMSNorms scale by (1 + weight). vaultgemma is gemma's block
with gemma2's names. gemma2 and gemma3_text are llama-like with "sandwich" norms: the attention and MLP outputs each
pass a norm before they join the residual stream, so hook_resid_mid is the input of pre_feedforward_layernorm. olmo
(OLMo 1) is llama-like with LayerNorms that have no weight or bias; olmo2 (and olmo3, exaone4) has only the output
norms (the MLP reads the residual stream itself: hook_resid_mid is the mlp's input). Where an MLP output norm
exists, a neuron's effect on the residual stream is its write a * w_out through that norm (scale held fixed per
token), and a head's likewise through the attention's: direct logit attribution and the logit lens read them so. phi
(Phi-1/1.5/2) runs attention and MLP in parallel (fc1/fc2, self_attn.dense); phi3 is llama-like but fuses gate and
up into one matmul (mlp.gate_up_proj): hook_pre is the first half of its output, hook_pre_linear the second; glm
likewise, and glm4 with norms on the attention's and the MLP's outputs. gpt_bigcode (StarCoder) has GPT-2's names;
starcoder2 llama's attention around GPT-2's MLP (mlp.c_fc, mlp.c_proj); stablelm llama's names, parallel where its
config says so. arcee, nemotron and apertus are llama's block with a plain MLP (up_proj, then down_proj), apertus's
norms named attention_layernorm and feedforward_layernorm, nemotron's LayerNorms scaling by (1 + weight). opt (OPT,
but OPT-350m) is pre-norm like gpt2: self_attn.out_proj, final_layer_norm (the MLP's pre-norm), fc1 and fc2, whose
inputs are (B*T, d). bloom is pre-norm with gpt_neox's MLP names (self_attention.dense, mlp.dense_h_to_4h,
mlp.dense_4h_to_h); falcon too, parallel where its config says so. cohere and cohere2 are llama-like with attention
and MLP in parallel and logits scaled; granite is llama with its blocks' outputs and its logits scaled (DLA and the
logit lens take both factors). gemma3 (4B and up) wraps gemma3_text's decoder in a multimodal model, under
model.language_model: its text is mined. mpt has its own names (blocks.*.attn.out_proj, norm_2, ffn.up_proj,
ffn.down_proj); codegen is gptj's block; persimmon has gpt_neox's MLP names in a llama-style block; xglm opt's
names, its MLP on (B, T, d).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Mapping

from torch import nn

from .errors import UserError

IN, OUT = "input", "output"

LN1, LN2 = "ln1.hook_normalized", "ln2.hook_normalized"

SITE_ORDER = (
    "hook_resid_pre",
    LN1,
    "attn.hook_pattern",
    "attn.hook_z",
    "hook_attn_out",
    "hook_resid_mid",
    LN2,
    "mlp.hook_expert_weights",
    "mlp.hook_pre",
    "mlp.hook_pre_linear",
    "mlp.hook_post",
    "hook_mlp_out",
    "hook_resid_post",
)
"""Every site any architecture can have, in the order they happen inside a block."""

@dataclass(frozen=True)
class Arch:
    family: str
    base: str
    """Attribute holding the base model inside task wrappers (LlamaForCausalLM.model, GPT2LMHeadModel.transformer)."""
    layers: str
    """Path of the nn.ModuleList of blocks inside the base model."""
    sites: Mapping[str, tuple[str, str]]
    """site -> (module path inside the block, IN or OUT)."""
    final_norm: str | None
    """Path of the norm applied before the unembedding, inside the base model."""
    parallel: Callable[[object], bool] = field(default=lambda config: False)
    """True when attention and MLP both read the block input (no residual stream between them)."""
    out_norms: Mapping[str, str] = field(default_factory=dict)
    """"attn" / "mlp" -> path inside the block of a norm that part's output passes before it joins the residual
    stream (Gemma 2/3, OLMo 2); empty where both write to the stream directly."""
    norm_offset: float = 0.0
    """RMSNorm multiplies by (norm_offset + weight): 1.0 for Gemma's, whose weights are stored around zero."""
    flat_tokens: bool = False
    """Some hooked modules see the stream flattened to (B*T, d) (OPT's MLP, a MoE router): hooks.capture gives their
    activations back as (B, T, ...)."""
    missing: Mapping[str, str] = field(default_factory=dict)
    """Sites this family lacks that others have -> why."""
    unsupported: Callable[[object], str | None] = field(default=lambda config: None)
    """Why a model of this family cannot be mined (a variant the table does not describe), or None."""
    logit_scale: Callable[[object], float] = field(default=lambda config: 1.0)
    """The model multiplies its logits by this (Cohere's logit_scale, Granite's 1 / logits_scaling)."""
    residual_scale: Callable[[object], float] = field(default=lambda config: 1.0)
    """Each block multiplies the attention's and the MLP's outputs by this before the residual stream (Granite's
    residual_multiplier)."""
    chunks: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    """site -> (i, n): the activation is the i-th of n equal slices of its module's last dimension (Phi-3's
    gate_up_proj output holds the gate, then up)."""
    norms: Callable[[object], tuple[str, str]] | None = None
    """(ln1, ln2): the norms attention and the MLP read, where they depend on the config (a parallel block's MLP
    reads the attention's norm); None: the sites' own."""

    @property
    def gated(self) -> bool:
        return "mlp.hook_pre_linear" in self.sites


def _sites(z: str, mid: str | None, pre: str | None, post: str, pre_linear: str | None = None, mid_dir: str = IN,
           attention: str | None = None, attn_out: str | None = None, mlp_out: str | None = None,
           ln1: str | None = "input_layernorm", ln2: str | None = ""):
    """attention: the module whose output is (attn_output, pattern), z's parent unless given. attn_out, mlp_out: the
    modules whose outputs are what attention and the MLP add to the residual stream: the attention module and
    post's parent (or post itself where it has none) unless given (where those modules add the residual themselves,
    or normalize it). ln1, ln2: the norms whose outputs attention and the MLP read; ln2 "" is mid's module (the
    MLP's pre-norm, whose input is the stream after attention); None: the block has no such norm."""
    attention = attention or z.rsplit(".", 1)[0]
    s = {"hook_resid_pre": ("", IN), "attn.hook_pattern": (attention, OUT), "attn.hook_z": (z, IN),
         "hook_attn_out": (attn_out or attention, OUT)}
    if ln1 is not None:
        s[LN1] = (ln1, OUT)
    if mid is not None:
        s["hook_resid_mid"] = (mid, mid_dir)
    ln2 = mid if ln2 == "" and mid_dir == IN else ln2 or None
    if ln2 is not None:
        s[LN2] = (ln2, OUT)
    if pre is not None:
        s["mlp.hook_pre"] = (pre, OUT)
    if pre_linear is not None:
        s["mlp.hook_pre_linear"] = (pre_linear, OUT)
    s["mlp.hook_post"] = (post, IN)
    s["hook_mlp_out"] = (mlp_out or post.rpartition(".")[0] or post, OUT)
    s["hook_resid_post"] = ("", OUT)
    return s


GPT2 = Arch("gpt2", "transformer", "h", _sites("attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj", ln1="ln_1"), "ln_f")
GPT_NEO = Arch(
    "gpt_neo", "transformer", "h", _sites("attn.attention.out_proj", "ln_2", "mlp.c_fc", "mlp.c_proj", ln1="ln_1"),
    "ln_f"
)
GPT_NEOX = Arch(
    "gpt_neox",
    "gpt_neox",
    "layers",
    _sites("attention.dense", "post_attention_layernorm", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    "final_layer_norm",
    parallel=lambda config: bool(getattr(config, "use_parallel_residual", True)),
)
GPTJ = Arch(
    "gptj", "transformer", "h", _sites("attn.out_proj", None, "mlp.fc_in", "mlp.fc_out", ln1="ln_1", ln2="ln_1"),
    "ln_f",
    parallel=lambda config: True,
)
LLAMA = Arch(
    "llama",
    "model",
    "layers",
    _sites("self_attn.o_proj", "post_attention_layernorm", "mlp.gate_proj", "mlp.down_proj", "mlp.up_proj"),
    "norm",
)
GEMMA = replace(LLAMA, family="gemma", norm_offset=1.0)
_GEMMA2_SITES = _sites("self_attn.o_proj", "pre_feedforward_layernorm", "mlp.gate_proj", "mlp.down_proj",
                       "mlp.up_proj")
_SANDWICH = {"attn": "post_attention_layernorm", "mlp": "post_feedforward_layernorm"}
GEMMA2 = Arch("gemma2", "model", "layers", _GEMMA2_SITES, "norm", out_norms=_SANDWICH, norm_offset=1.0)
OLMO2 = Arch("olmo2", "model", "layers",
             _sites("self_attn.o_proj", "mlp", "mlp.gate_proj", "mlp.down_proj", "mlp.up_proj", ln1=None, ln2=None),
             "norm",
             out_norms=_SANDWICH)
# StarCoder2: llama's attention names around GPT-2's MLP names, LayerNorms. StableLM: llama's names, LayerNorms,
# attention and MLP in parallel where the config says so (then there is no post-attention norm).
STARCODER2 = Arch("starcoder2", "model", "layers",
                  _sites("self_attn.o_proj", "post_attention_layernorm", "mlp.c_fc", "mlp.c_proj"), "norm")
STABLELM = replace(LLAMA, family="stablelm",
                   parallel=lambda config: bool(getattr(config, "use_parallel_residual", False)),
                   norms=lambda c: ("input_layernorm", "input_layernorm" if getattr(c, "use_parallel_residual", False)
                                    else "post_attention_layernorm"))
# Phi-1/1.5/2: attention and MLP in parallel on one LayerNorm's output, a final LayerNorm, an LM head with a bias.
PHI = Arch("phi", "model", "layers", _sites("self_attn.dense", None, "mlp.fc1", "mlp.fc2", ln2="input_layernorm"),
           "final_layernorm",
           parallel=lambda config: True)
# Phi-3 (and Phi-4): llama-like, but gate and up are one matmul whose output is chunk(2): gate, then up.
PHI3 = Arch("phi3", "model", "layers",
            _sites("self_attn.o_proj", "post_attention_layernorm", "mlp.gate_up_proj", "mlp.down_proj",
                   "mlp.gate_up_proj"), "norm",
            chunks={"mlp.hook_pre": (0, 2), "mlp.hook_pre_linear": (1, 2)})
# GLM (glm-4-9b-chat-hf): Phi-3's fused gate and up in llama's block. GLM-4 (glm4) adds norms on the attention's and
# the MLP's outputs; its post_attention_layernorm is the MLP's pre-norm (hook_resid_mid), as in llama.
GLM = replace(PHI3, family="glm")
GLM4 = replace(PHI3, family="glm4", out_norms={"attn": "post_self_attn_layernorm", "mlp": "post_mlp_layernorm"})
# Non-gated MLPs on llama's block (up_proj, its activation, down_proj): Arcee (AFM) and Nemotron with relu^2, Apertus
# with xIELU (its norms named attention_layernorm and feedforward_layernorm). Nemotron's LayerNorms scale by 1 + weight.
_UP_DOWN = _sites("self_attn.o_proj", "post_attention_layernorm", "mlp.up_proj", "mlp.down_proj")
ARCEE = Arch("arcee", "model", "layers", _UP_DOWN, "norm")
NEMOTRON = Arch("nemotron", "model", "layers", _UP_DOWN, "norm", norm_offset=1.0)
APERTUS = Arch("apertus", "model", "layers",
               _sites("self_attn.o_proj", "feedforward_layernorm", "mlp.up_proj", "mlp.down_proj",
                      ln1="attention_layernorm"), "norm")
# OPT: pre-norm like GPT-2 (self_attn_layer_norm, then final_layer_norm before fc1 in each block). OPT-350m alone
# normalizes after each sublayer and projects the stream in and out of a smaller embedding.
_OPT_350M = ("OPT-350m normalizes after attention and MLP (post-norm) and projects the residual stream in and out "
             "of a smaller embedding (word_embed_proj_dim); the other OPT sizes are pre-norm and supported")
OPT = Arch("opt", "model.decoder", "layers",
           _sites("self_attn.out_proj", "final_layer_norm", "fc1", "fc2", ln1="self_attn_layer_norm"),
           "final_layer_norm", flat_tokens=True,
           unsupported=lambda c: None if c.do_layer_norm_before and c.word_embed_proj_dim == c.hidden_size
           else _OPT_350M)
# BLOOM: pre-norm, GPT-NeoX's MLP names; its attention and MLP modules add the residual themselves (so the sites are
# the projections inside them). Tensor-parallel "slow but exact" checkpoints skip those projections' modules.
_BLOOM_TP = ("this BLOOM config sets slow_but_exact with pretraining_tp > 1: its projections run as slices of their "
             "weights, not through the modules the hooks sit on; load it with slow_but_exact=False")
_BLOOM_POST = "this BLOOM config sets apply_residual_connection_post_layernorm: its residual stream is normalized"
BLOOM = Arch("bloom", "transformer", "h",
             _sites("self_attention.dense", "post_attention_layernorm", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h",
                    attn_out="self_attention.dense", mlp_out="mlp.dense_4h_to_h"),
             "ln_f",
             unsupported=lambda c: (_BLOOM_TP if c.slow_but_exact and c.pretraining_tp > 1 else
                                    _BLOOM_POST if c.apply_residual_connection_post_layernorm else None))
# MPT: its own names (blocks, norm_1/norm_2, attn.out_proj, ffn.up_proj/down_proj), LayerNorms without biases, ALiBi;
# its MLP module adds the residual itself (the sites are the projections inside it).
MPT = Arch("mpt", "transformer", "blocks",
           _sites("attn.out_proj", "norm_2", "ffn.up_proj", "ffn.down_proj", mlp_out="ffn.down_proj", ln1="norm_1"),
           "norm_f")
# Persimmon: GPT-NeoX's MLP names (relu^2) in a llama-style block of LayerNorms. XGLM: OPT's names, unflattened.
PERSIMMON = Arch("persimmon", "model", "layers", _sites("self_attn.dense", "post_attention_layernorm",
                                                        "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"), "final_layernorm")
XGLM = Arch("xglm", "model", "layers",
            _sites("self_attn.out_proj", "final_layer_norm", "fc1", "fc2", ln1="self_attn_layer_norm"), "layer_norm")
# Falcon: GPT-NeoX's MLP names, attention and MLP in parallel (Falcon-7B: one input norm; 40B/180B, the "new decoder
# architecture": one norm each, ln_attn and ln_mlp), or in sequence where parallel_attn is off (falcon-rw).
_FALCON_BOTH = ("this Falcon config sets new_decoder_architecture without parallel_attn: its MLP output adds the "
                "attention output a second time, a block the table does not describe")
FALCON = Arch("falcon", "transformer", "h",
              _sites("self_attention.dense", "post_attention_layernorm", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
              "ln_f", parallel=lambda config: bool(config.parallel_attn),
              unsupported=lambda c: _FALCON_BOTH if c.new_decoder_architecture and not c.parallel_attn else None,
              norms=lambda c: (("ln_attn", "ln_mlp") if c.new_decoder_architecture and
                               (c.num_ln_in_parallel_attn or 2) == 2 else
                               ("input_layernorm", "input_layernorm" if c.parallel_attn or c.new_decoder_architecture
                                else "post_attention_layernorm")))
# Cohere (Command R, Aya): llama's names, attention and MLP in parallel on one mean-centred norm (CohereLayerNorm, no
# bias), logits times logit_scale. Granite: llama with multipliers on the blocks' outputs and on the logits.
COHERE = replace(LLAMA, family="cohere", parallel=lambda config: True, norms=lambda c: ("input_layernorm",) * 2,
                 logit_scale=lambda config: float(config.logit_scale))
GRANITE = replace(LLAMA, family="granite", logit_scale=lambda config: 1.0 / float(config.logits_scaling),
                  residual_scale=lambda config: float(config.residual_multiplier))
# Mixture-of-experts decoders: llama's attention and norms; the experts are one batched module (no module per expert
# whose input or output a hook could take), the router mlp.gate returns its logits over (B*T, d).
_EXPERTS = ("{family}'s experts run as one batched module, so their neurons have no module of their own to hook; "
            "mine blocks.{{L}}.mlp.hook_expert_weights (each expert's routing probability) and the residual stream")
_DENSE_LAYERS = ("this {family} config mixes dense and expert MLPs across layers (mlp_only_layers, "
                 "decoder_sparse_step); only models whose every layer routes to experts are supported")


def _moe(family: str, router: str = "mlp.gate", mid: str = "post_attention_layernorm", **extra) -> Arch:
    """mid: the module whose input is the stream after attention (the MLP's pre-norm, or the MLP itself where it has
    none); extra: the Arch's other fields (FlexOlmo's output norms, GraniteMoE's factors)."""
    why = _EXPERTS.format(family=family)
    sites = {"hook_resid_pre": ("", IN), "attn.hook_pattern": ("self_attn", OUT),
             "attn.hook_z": ("self_attn.o_proj", IN), "hook_attn_out": ("self_attn", OUT),
             "hook_resid_mid": (mid, IN), "mlp.hook_expert_weights": (router, OUT),
             **({LN1: ("input_layernorm", OUT), LN2: (mid, OUT)} if mid != "mlp" else {}),
             "hook_mlp_out": (router.rpartition(".")[0], OUT), "hook_resid_post": ("", OUT)}
    mixed = _DENSE_LAYERS.format(family=family)
    return Arch(family, "model", "layers", sites, "norm", flat_tokens=True,
                missing={s: why for s in ("mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_post")},
                unsupported=lambda c: mixed if (getattr(c, "mlp_only_layers", None) or
                                                getattr(c, "decoder_sparse_step", 1) not in (None, 1)) else None,
                **extra)


# BERT is post-norm: the residual stream between attention and MLP is the attention LayerNorm's output.
BERT = Arch(
    "bert",
    "bert",
    "encoder.layer",
    _sites("attention.output.dense", "attention.output.LayerNorm", "intermediate.dense", "output.dense",
           mid_dir=OUT, attention="attention.self", attn_out="attention.output.dense", mlp_out="output.dense",
           ln1=None),
    None,
)

MODEL_TYPES: dict[str, Arch] = {
    "gpt2": GPT2,
    "gpt_neo": GPT_NEO,
    "gpt_neox": GPT_NEOX,
    "gptj": GPTJ,
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
    "qwen3": LLAMA,
    "smollm3": LLAMA,
    "ministral": LLAMA,
    "seed_oss": LLAMA,
    "ernie4_5": LLAMA,
    "helium": LLAMA,
    "hunyuan_v1_dense": LLAMA,
    "gemma": GEMMA,
    "gemma2": GEMMA2,
    "gemma3_text": replace(GEMMA2, family="gemma3"),
    # Gemma 3 4B and up: the multimodal wrapper (Gemma3ForConditionalGeneration); text only is mined, its decoder
    # under model.language_model
    "gemma3": replace(GEMMA2, family="gemma3", base="model.language_model"),
    # VaultGemma: Gemma 2's block without the output norms (input_layernorm, then pre_feedforward_layernorm)
    "vaultgemma": replace(GEMMA2, family="vaultgemma", out_norms={}),
    "olmo": replace(LLAMA, family="olmo"),  # OLMo 1: llama's names; its norms are LayerNorms without weights
    "olmo2": OLMO2,
    "olmo3": replace(OLMO2, family="olmo3"),  # OLMo 3: OLMo 2's block, sliding-window layers besides
    "exaone4": replace(OLMO2, family="exaone4"),  # EXAONE 4.0: OLMo 2's output norms
    "phi": PHI,
    "gpt_bigcode": replace(GPT2, family="gpt_bigcode"),  # SantaCoder, StarCoder: GPT-2's names, nn.Linear weights
    "starcoder2": STARCODER2,
    "stablelm": STABLELM,
    "phi3": PHI3,
    "glm": GLM,
    "glm4": GLM4,
    "arcee": ARCEE,
    "nemotron": NEMOTRON,
    "apertus": APERTUS,
    "opt": OPT,
    "bloom": BLOOM,
    "falcon": FALCON,
    "mpt": MPT,
    "codegen": replace(GPTJ, family="codegen"),  # CodeGen: GPT-J's block and names
    "persimmon": PERSIMMON,
    "xglm": XGLM,
    "cohere": COHERE,
    "cohere2": replace(COHERE, family="cohere2"),  # Command R7B, Aya Expanse: sliding-window layers besides
    "granite": GRANITE,
    "olmoe": _moe("olmoe"),
    "mixtral": _moe("mixtral"),
    "qwen2_moe": _moe("qwen2_moe"),
    "qwen3_moe": _moe("qwen3_moe"),
    "gpt_oss": _moe("gpt_oss", router="mlp.router"),  # its own mixing weights: a softmax over the top k only
    "flex_olmo": _moe("flex_olmo", mid="mlp", out_norms=_SANDWICH),  # FlexOlmo: OLMoE's router, OLMo 2's norms
    "granitemoe": _moe("granitemoe", router="block_sparse_moe.router", logit_scale=GRANITE.logit_scale,
                       residual_scale=GRANITE.residual_scale),  # Granite 3 MoE: Granite's factors
    "bert": BERT,
}


def module_outline(model: nn.Module, depth: int = 3, limit: int = 40) -> str:
    """Module names up to `depth` named levels, layer indices collapsed to '*'."""
    seen: dict[str, None] = {}
    for name, _ in model.named_modules():
        parts = ["*" if p.isdigit() else p for p in name.split(".")] if name else []
        if parts and sum(p != "*" for p in parts) <= depth:
            seen[".".join(parts)] = None
    names = list(seen)
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more if names else "(no submodules)"


def model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def arch_of(model: nn.Module) -> Arch:
    mt = model_type(model)
    if mt in MODEL_TYPES:
        why = MODEL_TYPES[mt].unsupported(text_config(model.config))
        if why:
            raise UserError(f"unsupported {mt} model: {why}")
        return MODEL_TYPES[mt]
    what = f"model_type {mt!r}" if mt else f"a model without a Hugging Face config ({type(model).__name__})"
    raise UserError(
        f"unsupported architecture: {what}; supported model types: {', '.join(sorted(MODEL_TYPES))}; "
        f"this model's modules: {module_outline(model)}"
    )


def locate(model: nn.Module, arch: Arch) -> tuple[str, nn.ModuleList]:
    """(prefix of the base model, e.g. "model." or "" for a bare base model; its block list)."""
    parts = arch.base.split(".")  # a wrapper's bare model holds the rest of the path (Gemma3Model: language_model)
    for prefix in [".".join(parts[i:]) + "." for i in range(len(parts))] + [""]:
        try:
            blocks = model.get_submodule(prefix + arch.layers)
        except AttributeError:
            continue
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return prefix, blocks
    raise UserError(
        f"{model_type(model)} model {type(model).__name__} has no block list at {arch.base}.{arch.layers} "
        f"or {arch.layers}; its modules: {module_outline(model)}"
    )


def sites_for(arch: Arch, config: object) -> dict[str, tuple[str, str]]:
    sites = dict(arch.sites)
    if arch.parallel(config):
        sites.pop("hook_resid_mid", None)
    for part in arch.out_norms:  # attention's and the MLP's outputs as they join the stream: after their norms
        sites[f"hook_{part}_out"] = (arch.out_norms[part], OUT)
    if arch.norms:
        sites[LN1], sites[LN2] = ((path, OUT) for path in arch.norms(config))
    return sites


def why_missing(arch: Arch, config: object, site: str) -> str | None:
    """Why a known TransformerLens site does not exist for this model; None for an unknown site."""
    if site in arch.missing:
        return arch.missing[site]
    if site == "mlp.hook_expert_weights":
        return f"mlp.hook_expert_weights only exists for mixture-of-experts models; {arch.family} has one MLP a layer"
    if site in (LN1, LN2):
        return (f"{site} does not exist for {arch.family}: " +
                ("it is post-norm, its norms act on the residual stream itself (hook_resid_mid, hook_resid_post)"
                 if arch.family == "bert" else "attention and the MLP read the residual stream without a norm "
                 "before them (hook_resid_pre, hook_resid_mid); its norms are on their outputs"))
    if site == "hook_resid_mid" and arch.parallel(config):
        return (f"hook_resid_mid does not exist for {arch.family} with parallel residual: attention and MLP "
                "both read the block input, so there is no residual stream between them")
    if site == "mlp.hook_pre_linear" and not arch.gated:
        return f"mlp.hook_pre_linear only exists for gated MLPs (llama-like); {arch.family} has a plain MLP"
    return None


def text_config(config: object) -> object:
    """The language model's config: itself, or a multimodal model's text_config (Gemma 3 4B and up)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def dims(config: object) -> dict[str, int]:
    """d_model, d_mlp, n_heads, d_head from a Hugging Face config (attribute maps cover gpt2's n_embd etc.)."""
    config = text_config(config)
    d_model = int(config.hidden_size)
    n_heads = int(config.num_attention_heads)
    d_head = getattr(config, "head_dim", None) or d_model // n_heads
    d_mlp = (getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
             or getattr(config, "ffn_dim", None) or getattr(config, "ffn_hidden_size", None)
             or 4 * d_model)  # ffn_dim: OPT, XGLM; ffn_hidden_size: Falcon; MPT's is 4 x d whatever its config says
    n_experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None) or 0
    return {"d_model": d_model, "d_mlp": int(d_mlp), "n_heads": n_heads, "d_head": int(d_head),
            "n_experts": int(n_experts)}
