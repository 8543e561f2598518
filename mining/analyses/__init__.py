"""Model-level analyses: tables computed from the weights or from small probe inputs, not from the corpus.

    logit_lens_table(model, tokenizer)            -> logit_lens(layer, neuron, sign, rank, token_id, token, weight)
    head_scores_table(model, tokenizer)           -> heads(layer, head, kv_head, prev_token, induction, duplicate,
                                                           bos, entropy)
    head_ablation_table(model, input_ids)         -> head_ablation(layer, head, kind, loss_delta)
    ablate_heads_loss(model, heads, input_ids)    -> mean next-token loss with those heads knocked out
"""

from .heads import (
    HEAD_SCORES,
    ablate_heads_loss,
    ablated_heads,
    attention_patterns,
    eager_attention,
    head_ablation_table,
    head_means,
    head_scores_table,
    next_token_loss,
    repeated_random_tokens,
)
from .logit_lens import logit_lens_table, neuron_logits, topk_ids

__all__ = [
    "HEAD_SCORES",
    "ablate_heads_loss",
    "ablated_heads",
    "attention_patterns",
    "eager_attention",
    "head_ablation_table",
    "head_means",
    "head_scores_table",
    "logit_lens_table",
    "neuron_logits",
    "next_token_loss",
    "repeated_random_tokens",
    "topk_ids",
]
