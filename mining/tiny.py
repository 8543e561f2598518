"""Tiny random Hugging Face models for fast offline tests.

Configs are built in code (no downloads). Weights are drawn with a larger initializer_range
than the HF default so activations are O(1) and numeric comparisons in tests mean something.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import UserError

_D = 32  # d_model
_H = 4  # heads
_L = 2  # layers
_MLP = 64  # MLP width
_POS = 128  # max positions


def _llama_like(**extra: Any) -> dict[str, Any]:
    return dict(
        hidden_size=_D,
        intermediate_size=_MLP,
        num_hidden_layers=_L,
        num_attention_heads=_H,
        num_key_value_heads=2,
        max_position_embeddings=_POS,
        initializer_range=0.1,
        **extra,
    )


# arch -> (config class name, causal/masked-LM class name, base class name, config kwargs)
_SPECS: dict[str, tuple[str, str, str, dict[str, Any]]] = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", "GPT2Model",
             dict(n_embd=_D, n_layer=_L, n_head=_H, n_inner=_MLP, n_positions=_POS, initializer_range=0.1)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", "GPTNeoXModel",
                 dict(hidden_size=_D, num_hidden_layers=_L, num_attention_heads=_H, intermediate_size=_MLP,
                      max_position_embeddings=_POS, use_parallel_residual=True, initializer_range=0.1)),
    # GPT-Neo alternates global/local attention; attention_types must expand to num_layers entries.
    "gpt_neo": ("GPTNeoConfig", "GPTNeoForCausalLM", "GPTNeoModel",
                dict(hidden_size=_D, num_layers=_L, num_heads=_H, intermediate_size=_MLP,
                     attention_types=[[["global", "local"], _L // 2]], window_size=8,
                     max_position_embeddings=_POS, initializer_range=0.1)),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", "GPTJModel",
             dict(n_embd=_D, n_layer=_L, n_head=_H, n_inner=_MLP, rotary_dim=4, n_positions=_POS,
                  initializer_range=0.1)),
    "llama": ("LlamaConfig", "LlamaForCausalLM", "LlamaModel", _llama_like()),
    "mistral": ("MistralConfig", "MistralForCausalLM", "MistralModel", _llama_like(sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", "Qwen2Model", _llama_like(use_sliding_window=False)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", "Qwen3Model", _llama_like(head_dim=16, use_sliding_window=False)),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", "SmolLM3Model",
                _llama_like(use_sliding_window=False, pad_token_id=None, bos_token_id=1, eos_token_id=2)),
    # Gemma: GELU-gated, RMSNorm scaling by (1 + weight); 2 and 3 add norms on the attention and MLP outputs and a
    # final logit soft-cap (Gemma 2). OLMo 1: LayerNorms without weights. OLMo 2: only the output norms.
    "gemma": ("GemmaConfig", "GemmaForCausalLM", "GemmaModel", _llama_like(head_dim=8)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", "Gemma2Model",
               _llama_like(head_dim=8, sliding_window=4, final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                           query_pre_attn_scalar=8)),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", "Gemma3TextModel",
                    _llama_like(head_dim=8, sliding_window=4, query_pre_attn_scalar=8)),
    "gemma3": ("Gemma3Config", "Gemma3ForConditionalGeneration", "Gemma3Model",
               _llama_like(head_dim=8, sliding_window=4, query_pre_attn_scalar=8)),
    "olmo": ("OlmoConfig", "OlmoForCausalLM", "OlmoModel",
             _llama_like(pad_token_id=None, bos_token_id=1, eos_token_id=2)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", "Olmo2Model",
              _llama_like(pad_token_id=None, bos_token_id=1, eos_token_id=2)),
    "olmo3": ("Olmo3Config", "Olmo3ForCausalLM", "Olmo3Model",
              _llama_like(sliding_window=4, pad_token_id=None, bos_token_id=1, eos_token_id=2)),
    "exaone4": ("Exaone4Config", "Exaone4ForCausalLM", "Exaone4Model",
                _llama_like(sliding_window=4, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "vaultgemma": ("VaultGemmaConfig", "VaultGemmaForCausalLM", "VaultGemmaModel",
                   _llama_like(head_dim=8, sliding_window=4, final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                               query_pre_attn_scalar=8)),
    # llama's block under other names' configs: Ministral (sliding windows), Seed-OSS, ERNIE 4.5, Helium, Hunyuan
    "ministral": ("MinistralConfig", "MinistralForCausalLM", "MinistralModel",
                  _llama_like(head_dim=8, sliding_window=4,
                              rope_parameters={"rope_type": "default", "rope_theta": 1e4})),
    "seed_oss": ("SeedOssConfig", "SeedOssForCausalLM", "SeedOssModel",
                 _llama_like(head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "ernie4_5": ("Ernie4_5Config", "Ernie4_5ForCausalLM", "Ernie4_5Model",
                 _llama_like(head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "helium": ("HeliumConfig", "HeliumForCausalLM", "HeliumModel",
               _llama_like(head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "hunyuan_v1_dense": ("HunYuanDenseV1Config", "HunYuanDenseV1ForCausalLM", "HunYuanDenseV1Model",
                         _llama_like(head_dim=8, rope_parameters={"rope_type": "default", "rope_theta": 1e4},
                                     pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "phi": ("PhiConfig", "PhiForCausalLM", "PhiModel",
            dict(hidden_size=_D, intermediate_size=_MLP, num_hidden_layers=_L, num_attention_heads=_H,
                 partial_rotary_factor=0.5, max_position_embeddings=_POS, initializer_range=0.1)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", "Phi3Model",
             _llama_like(pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    # GLM: Phi-3's fused gate and up; GLM-4 with norms on the attention's and the MLP's outputs
    "glm": ("GlmConfig", "GlmForCausalLM", "GlmModel", _llama_like(head_dim=8, pad_token_id=0, bos_token_id=1,
                                                                   eos_token_id=2)),
    "glm4": ("Glm4Config", "Glm4ForCausalLM", "Glm4Model", _llama_like(head_dim=8, pad_token_id=0, bos_token_id=1,
                                                                       eos_token_id=2)),
    # plain MLPs (up, then down) on llama's block: relu^2 (Arcee, Nemotron, whose LayerNorms scale by 1 + w), xIELU
    "arcee": ("ArceeConfig", "ArceeForCausalLM", "ArceeModel",
              _llama_like(head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "nemotron": ("NemotronConfig", "NemotronForCausalLM", "NemotronModel",
                 _llama_like(head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "apertus": ("ApertusConfig", "ApertusForCausalLM", "ApertusModel",
                _llama_like(head_dim=8, rope_parameters={"rope_type": "default", "rope_theta": 1e4},
                            pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "gpt_bigcode": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM", "GPTBigCodeModel",
                    dict(n_embd=_D, n_layer=_L, n_head=_H, n_inner=_MLP, n_positions=_POS, initializer_range=0.1)),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", "Starcoder2Model",
                   _llama_like(bos_token_id=1, eos_token_id=2)),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", "StableLmModel", _llama_like(bos_token_id=1, eos_token_id=2)),
    # OPT: GPT-2's block in other names; its MLP sees the stream flattened to (B*T, d); ReLU
    "opt": ("OPTConfig", "OPTForCausalLM", "OPTModel",
            dict(hidden_size=_D, ffn_dim=_MLP, num_hidden_layers=_L, num_attention_heads=_H, word_embed_proj_dim=_D,
                 max_position_embeddings=_POS, init_std=0.1, pad_token_id=1, bos_token_id=2, eos_token_id=2)),
    # BLOOM: ALiBi (no position table), an MLP 4 x d wide
    "bloom": ("BloomConfig", "BloomForCausalLM", "BloomModel",
              dict(hidden_size=_D, n_layer=_L, n_head=_H, initializer_range=0.1, bos_token_id=1, eos_token_id=2)),
    # Falcon-7B's block: attention and MLP in parallel on one norm, one key/value head (multi-query)
    "falcon": ("FalconConfig", "FalconForCausalLM", "FalconModel",
               dict(hidden_size=_D, num_hidden_layers=_L, num_attention_heads=_H, ffn_hidden_size=_MLP,
                    max_position_embeddings=_POS, initializer_range=0.1, bos_token_id=1, eos_token_id=2)),
    # MPT (ALiBi, LayerNorms without biases), CodeGen (GPT-J's block), Persimmon (relu^2), XGLM (OPT's names)
    "mpt": ("MptConfig", "MptForCausalLM", "MptModel",
            dict(d_model=_D, n_heads=_H, n_layers=_L, max_seq_len=_POS, initializer_range=0.1)),  # MLP: 4 x d
    "codegen": ("CodeGenConfig", "CodeGenForCausalLM", "CodeGenModel",
                dict(n_embd=_D, n_layer=_L, n_head=_H, n_inner=_MLP, rotary_dim=4, n_positions=_POS, n_ctx=_POS,
                     initializer_range=0.1, bos_token_id=1, eos_token_id=2)),
    "persimmon": ("PersimmonConfig", "PersimmonForCausalLM", "PersimmonModel",
                  dict(hidden_size=_D, intermediate_size=_MLP, num_hidden_layers=_L, num_attention_heads=_H,
                       max_position_embeddings=_POS, initializer_range=0.1, bos_token_id=1, eos_token_id=2)),
    "xglm": ("XGLMConfig", "XGLMForCausalLM", "XGLMModel",
             dict(d_model=_D, ffn_dim=_MLP, num_layers=_L, attention_heads=_H, max_position_embeddings=_POS,
                  init_std=0.1, pad_token_id=1, bos_token_id=0, eos_token_id=2)),
    # Cohere: parallel attention and MLP on one mean-centred norm, logits scaled; Granite: its blocks' outputs and
    # its logits scaled (factors away from 1, so that a factor left out shows)
    "cohere": ("CohereConfig", "CohereForCausalLM", "CohereModel",
               _llama_like(logit_scale=0.5, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "cohere2": ("Cohere2Config", "Cohere2ForCausalLM", "Cohere2Model",
                _llama_like(logit_scale=0.5, sliding_window=4, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "granite": ("GraniteConfig", "GraniteForCausalLM", "GraniteModel",
                _llama_like(residual_multiplier=0.4, logits_scaling=3.0, embedding_multiplier=2.0,
                            attention_multiplier=0.3)),
    # mixture of experts: 8 experts a layer (the router's width), llama's attention
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", "OlmoeModel",
              _llama_like(num_experts=8, num_experts_per_tok=2, pad_token_id=None, bos_token_id=1, eos_token_id=2)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", "MixtralModel",
                _llama_like(num_local_experts=8, num_experts_per_tok=2, sliding_window=None)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", "Qwen2MoeModel",
                  _llama_like(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                              shared_expert_intermediate_size=32, use_sliding_window=False)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", "Qwen3MoeModel",
                  _llama_like(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8,
                              use_sliding_window=False)),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", "GptOssModel",
                _llama_like(num_local_experts=8, num_experts_per_tok=2, head_dim=8, sliding_window=8,
                            rope_parameters={"rope_type": "default", "rope_theta": 150000.0},
                            pad_token_id=None, bos_token_id=1, eos_token_id=2)),
    "flex_olmo": ("FlexOlmoConfig", "FlexOlmoForCausalLM", "FlexOlmoModel",
                  _llama_like(num_experts=8, num_experts_per_tok=2, pad_token_id=None, bos_token_id=1, eos_token_id=2)),
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM", "GraniteMoeModel",
                   _llama_like(num_local_experts=8, num_experts_per_tok=2, residual_multiplier=0.4, logits_scaling=3.0,
                               embedding_multiplier=2.0, attention_multiplier=0.3)),
    "bert": ("BertConfig", "BertForMaskedLM", "BertModel",
             dict(hidden_size=_D, num_hidden_layers=_L, num_attention_heads=_H, intermediate_size=_MLP,
                  max_position_embeddings=_POS, initializer_range=0.1)),
}

ARCHS = tuple(_SPECS)
_NORM_CENTRE = {"gemma": 0.0, "gemma2": 0.0, "gemma3_text": 0.0, "gemma3": 0.0, "olmo2": 1.0, "opt": 1.0, "bloom": 1.0,
                "cohere": 1.0, "cohere2": 1.0, "granite": 1.0, "olmo3": 1.0, "exaone4": 1.0, "vaultgemma": 0.0,
                "glm4": 1.0, "helium": 1.0, "nemotron": 0.0, "apertus": 1.0, "falcon": 1.0, "flex_olmo": 1.0,
                "mpt": 1.0, "codegen": 1.0, "persimmon": 1.0, "xglm": 1.0, "granitemoe": 1.0}
"""Families whose tiny models get random norm weights around their stored centre (Gemma's RMSNorm scales by 1 + w):
with the default init every gain is 1 (or a Gemma norm's w is 0), and no test could tell a gain left out."""
_GPT_IDS = {"gpt2", "gpt_neo", "gptj", "gpt_bigcode"}


def tiny_model(arch: str, vocab_size: int = 512, seed: int = 0, *, head: bool = True, **overrides: Any):
    """A small random model of family `arch` (see ARCHS), eval mode, float32.

    head=False returns the bare base model (GPT2Model, LlamaModel, BertModel, ...);
    otherwise the *ForCausalLM / BertForMaskedLM wrapper. `overrides` go into the config.
    The same (arch, vocab_size, seed, overrides) always gives the same weights; the global
    torch RNG is left untouched.
    """
    import transformers

    if arch not in _SPECS:
        raise UserError(f"no tiny model for architecture {arch!r}; available: {', '.join(ARCHS)}")
    config_cls, head_cls, base_cls, kwargs = _SPECS[arch]
    # GPT-style configs default to token id 50256 for bos/eos, outside a small vocabulary.
    special = {"bos_token_id": vocab_size - 1, "eos_token_id": vocab_size - 1} if arch in _GPT_IDS else {}
    if arch == "gemma3":  # multimodal: the text model's config inside, a one-layer vision tower beside it
        config = transformers.Gemma3Config(text_config={**kwargs, "vocab_size": vocab_size, **overrides},
                                           vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                              num_attention_heads=2, image_size=28, patch_size=14),
                                           mm_tokens_per_image=4, image_token_index=vocab_size - 1)
    else:
        config = getattr(transformers, config_cls)(**{**kwargs, **special, "vocab_size": vocab_size, **overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, head_cls if head else base_cls)(config)
        if arch in _NORM_CENTRE:
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if "norm" in name and not name.endswith(".bias"):  # a LayerNorm's bias stays 0
                        param.normal_(_NORM_CENTRE[arch], 0.3)
    return model.to(torch.float32).eval()
