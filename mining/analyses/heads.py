"""Attention-head scores (previous-token, duplicate, induction, BOS-sink, entropy) and head ablation.

Scores follow TransformerLens' head detectors, measured on repeated random tokens

    [BOS, r_1 .. r_n, r_1 .. r_n]          (positions 0, 1..n, n+1..2n; the r_i distinct, seed-fixed)

so that every token in the second half has exactly one earlier occurrence:

    prev_token  mean over query positions i >= 1 of A[i, i-1]
    duplicate   mean over the second half of A[i, i-n]      (the token's previous occurrence)
    induction   mean over the second half of A[i, i-n+1]    (the token AFTER its previous occurrence)
    bos         mean over query positions i >= 1 of A[i, 0] (the attention sink)
    entropy     mean over query positions i >= 1 of -sum_j A[i, j] log A[i, j], in nats

bos and entropy are measured on `corpus_ids` when given (real text), else on the same random sequences.
Patterns come from the model's own forward with eager attention (`output_attentions=True`): SDPA and
flash kernels never materialize them. The model is switched to eager for the call and switched back
(`set_attn_implementation`, transformers 5.x); a model that cannot switch must be loaded with
attn_implementation="eager". With grouped-query attention (Llama/SmolLM2) every query head gets its
own row; `kv_head` says which key/value head it shares.

Ablation knocks heads out at `attn.hook_z` (the input of the attention output projection, heads
concatenated): a forward pre-hook replaces a head's slice by zeros, or by its mean over every position
of the input - the head's contribution becomes a constant, its information is gone.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from ..architectures import arch_of, dims, locate, text_config
from ..errors import UserError
from ..hooks import capture, eager_attention, resolve_hooks

HEAD_SCORES = ("prev_token", "induction", "duplicate", "bos", "entropy")
SCHEMA = pa.schema([("layer", pa.int32()), ("head", pa.int32()), ("kv_head", pa.int32())]
                   + [(name, pa.float32()) for name in HEAD_SCORES])
ABLATION_SCHEMA = pa.schema([("layer", pa.int32()), ("head", pa.int32()), ("kind", pa.string()),
                             ("loss_delta", pa.float32())])
KINDS = ("zero", "mean")
BATCH = 8


# ---------------------------------------------------------------- probe inputs


def _special_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    ids = {getattr(model.config, f"{t}_token_id", None) for t in ("bos", "eos", "pad")}
    if tokenizer is not None:
        ids |= set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    return {int(i) for i in ids if isinstance(i, int)}


def _default_bos(model: nn.Module, tokenizer: Any) -> int:
    for source in (tokenizer, model.config):
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(source, name, None) if source is not None else None
            if isinstance(value, int):
                return value
    return 0


SEQ_LEN = 64
"""Each random half's length n for the heads table: sequences of 2n + 1 tokens."""


def repeated_random_tokens(model: nn.Module, tokenizer: Any, seq_len: int = SEQ_LEN, n_seqs: int = 16, seed: int = 0,
                           bos_id: int | None = None) -> torch.Tensor:
    """(n_seqs, 2 * seq_len + 1) int64: [BOS, r_1..r_n, r_1..r_n] with n = seq_len distinct ordinary tokens
    per sequence (special and added tokens excluded), drawn with a seeded generator."""
    vocab = int(text_config(model.config).vocab_size)
    if tokenizer is not None:
        vocab = min(vocab, len(tokenizer))  # ids past the tokenizer are padding rows of the embedding
    special = _special_ids(model, tokenizer)
    pool = torch.tensor([i for i in range(vocab) if i not in special], dtype=torch.long)
    if seq_len < 2 or seq_len > len(pool):
        raise UserError(f"heads: seq_len must be between 2 and {len(pool)} (ordinary tokens), got {seq_len}")
    max_pos = getattr(text_config(model.config), "max_position_embeddings", None)
    if isinstance(max_pos, int) and 2 * seq_len + 1 > max_pos:
        raise UserError(f"heads: seq_len {seq_len} gives {2 * seq_len + 1} positions, this model has {max_pos}; "
                        f"use seq_len <= {(max_pos - 1) // 2}")
    g = torch.Generator().manual_seed(seed)
    halves = torch.stack([pool[torch.randperm(len(pool), generator=g)[:seq_len]] for _ in range(n_seqs)])
    bos = torch.full((n_seqs, 1), _default_bos(model, tokenizer) if bos_id is None else bos_id, dtype=torch.long)
    return torch.cat([bos, halves, halves], dim=1)


# ---------------------------------------------------------------- attention patterns


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def attention_patterns(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Attention patterns of one batch: (layers, batch, heads, query, key) float32 on the model's device."""
    with eager_attention(model):
        out = model(input_ids=input_ids.to(_device(model)), output_attentions=True, use_cache=False)
    attentions = getattr(out, "attentions", None)
    if not attentions or any(a is None for a in attentions):
        raise UserError(f"{type(model).__name__} returned no attention patterns; load it with "
                        "attn_implementation='eager' (SDPA/flash attention never materialize them)")
    return torch.stack([a.float() for a in attentions])


def _sink_entropy_sums(a: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per (layer, head) sums over the batch of the per-sequence bos and entropy means."""
    rows = a[..., 1:, :]  # query position 0 can only attend to itself
    entropy = -torch.special.xlogy(rows, rows).sum(-1)
    return {"bos": rows[..., 0].mean(-1).sum(1), "entropy": entropy.mean(-1).sum(1)}


def _repeat_sums(a: torch.Tensor, n: int) -> dict[str, torch.Tensor]:
    """Per (layer, head) batch sums of prev_token, duplicate and induction on [BOS, r, r] patterns."""
    # diagonal(-d) holds A[i, i-d] for i = d..T-1; the second half is i = n+1..2n
    return {
        "prev_token": a.diagonal(-1, -2, -1).mean(-1).sum(1),
        "duplicate": a.diagonal(-n, -2, -1)[..., 1:].mean(-1).sum(1),
        "induction": a.diagonal(-(n - 1), -2, -1)[..., 2:].mean(-1).sum(1),
    }


def _mean_scores(model: nn.Module, ids: torch.Tensor, reduce, batch_size: int) -> dict[str, torch.Tensor]:
    sums: dict[str, torch.Tensor] = {}
    for start in range(0, len(ids), batch_size):
        for name, s in reduce(attention_patterns(model, ids[start:start + batch_size])).items():
            sums[name] = sums.get(name, 0) + s.double().cpu()
    return {name: s / len(ids) for name, s in sums.items()}


@torch.inference_mode()
def head_scores_table(model: nn.Module, tokenizer: Any, *, seq_len: int | None = None, n_seqs: int = 16,
                      seed: int = 0, corpus_ids: torch.Tensor | None = None, bos_id: int | None = None,
                      batch_size: int = BATCH) -> pa.Table:
    """The `heads` table: one row per (layer, query head) with the scores of the module docstring.

    seq_len is the length n of each random half (sequences are 2n + 1 tokens; default SEQ_LEN, or what fits a
    model with fewer positions); bos_id is the first token
    (default: the tokenizer's BOS, else EOS). corpus_ids (B, T), if given, are real contexts for bos and
    entropy; they should start the way mined contexts do (with the BOS/separator token)."""
    if seq_len is None:
        max_pos = getattr(text_config(model.config), "max_position_embeddings", None)
        seq_len = min(SEQ_LEN, (max_pos - 1) // 2) if isinstance(max_pos, int) else SEQ_LEN
    ids = repeated_random_tokens(model, tokenizer, seq_len, n_seqs, seed, bos_id)
    if corpus_ids is None:  # one pass over the random sequences gives every score
        scores = _mean_scores(model, ids, lambda a: _repeat_sums(a, seq_len) | _sink_entropy_sums(a), batch_size)
    else:
        corpus_ids = torch.as_tensor(corpus_ids, dtype=torch.long)
        if corpus_ids.dim() != 2 or corpus_ids.shape[1] < 2:
            raise UserError(f"heads: corpus_ids must be (contexts, positions) with at least 2 positions, "
                            f"got shape {tuple(corpus_ids.shape)}")
        scores = _mean_scores(model, ids, lambda a: _repeat_sums(a, seq_len), batch_size)
        scores |= _mean_scores(model, corpus_ids, _sink_entropy_sums, batch_size)

    n_layers, n_heads = scores["induction"].shape
    n_kv = int(getattr(text_config(model.config), "num_key_value_heads", None) or n_heads)
    layer, head = np.divmod(np.arange(n_layers * n_heads), n_heads)
    cols = {"layer": layer, "head": head, "kv_head": head // (n_heads // n_kv)}
    cols |= {name: scores[name].numpy().ravel() for name in HEAD_SCORES}
    return pa.table({f.name: pa.array(cols[f.name], f.type) for f in SCHEMA}, schema=SCHEMA)


# ---------------------------------------------------------------- ablation


def _z_points(model: nn.Module, layers: Sequence[int]):
    return resolve_hooks(model, [f"blocks.{layer}.attn.hook_z" for layer in sorted(set(layers))])


def _check_heads(model: nn.Module, heads: Sequence[tuple[int, int]]) -> dict[int, list[int]]:
    _, blocks = locate(model, arch_of(model))
    n_heads = dims(model.config)["n_heads"]
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        if not (0 <= layer < len(blocks) and 0 <= head < n_heads):
            raise UserError(f"head ({layer}, {head}) does not exist: layers 0..{len(blocks) - 1}, "
                            f"heads 0..{n_heads - 1}")
        by_layer.setdefault(int(layer), []).append(int(head))
    return by_layer


@torch.inference_mode()
def head_means(model: nn.Module, input_ids: torch.Tensor, layers: Sequence[int],
               batch_size: int = BATCH) -> dict[int, torch.Tensor]:
    """Mean of each head's output z over every position of input_ids: layer -> (n_heads, d_head)."""
    points = _z_points(model, layers)
    sums: dict[int, torch.Tensor] = {}

    def add(point, x: torch.Tensor) -> None:
        s = x.double().sum((0, 1)).unflatten(0, (point.n_heads, point.d_head))
        sums[point.layer] = sums.get(point.layer, 0) + s

    with capture(model, points, add):
        for start in range(0, len(input_ids), batch_size):
            model(input_ids=input_ids[start:start + batch_size].to(_device(model)), use_cache=False)
    return {layer: s / input_ids.numel() for layer, s in sums.items()}


@contextmanager
def ablated_heads(model: nn.Module, heads: Sequence[tuple[int, int]], kind: str = "zero",
                  means: dict[int, torch.Tensor] | None = None) -> Iterator[None]:
    """Inside the block, the given (layer, head)s' outputs are zeroed (kind="zero") or set to `means`
    (kind="mean", from head_means), by forward pre-hooks on the attention output projections."""
    if kind not in KINDS:
        raise UserError(f"unknown ablation kind {kind!r}; use one of {', '.join(KINDS)}")
    by_layer = _check_heads(model, heads)
    if kind == "mean" and (means is None or not set(by_layer) <= set(means)):
        raise UserError("mean ablation needs the heads' means (head_means) for every ablated layer")
    handles = []

    def pre_hook(point, sel: list[int]):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            z = x.unflatten(-1, (point.n_heads, point.d_head)).clone()  # inputs are inference tensors: copy
            z[..., sel, :] = 0 if kind == "zero" else means[point.layer][sel].to(z.dtype).to(z.device)
            x = z.flatten(-2)
            return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})

        return hook

    try:
        for point in _z_points(model, list(by_layer)):
            module = model.get_submodule(point.module_path)
            handles.append(module.register_forward_pre_hook(pre_hook(point, by_layer[point.layer]),
                                                            with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


@torch.inference_mode()
def next_token_loss(model: nn.Module, input_ids: torch.Tensor, loss_from: int = 1,
                    batch_size: int = BATCH) -> float:
    """Mean cross-entropy (nats) of predicting input_ids[:, t] for t >= loss_from, from logits at t - 1."""
    if not 1 <= loss_from < input_ids.shape[1]:
        raise UserError(f"loss_from must be in 1..{input_ids.shape[1] - 1}, got {loss_from}")
    total, count = 0.0, 0
    for start in range(0, len(input_ids), batch_size):
        ids = input_ids[start:start + batch_size].to(_device(model))
        logits = _logits(model, ids, keep=ids.shape[1] - loss_from + 1)[:, :-1].float()
        targets = ids[:, loss_from:]
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
        count += targets.numel()
    return total / count


def _logits(model: nn.Module, ids: torch.Tensor, keep: int) -> torch.Tensor:
    """Logits of the last `keep` positions; the unembedding of the others is skipped where the model
    supports `logits_to_keep` (most causal LMs in transformers 5.x)."""
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits
    else:
        logits = model(input_ids=ids, use_cache=False).logits
    return logits[:, -keep:]


def ablate_heads_loss(model: nn.Module, heads: Sequence[tuple[int, int]], input_ids: torch.Tensor,
                      kind: str = "zero", *, loss_from: int = 1, batch_size: int = BATCH) -> float:
    """Mean next-token loss on input_ids (targets from position loss_from on) with `heads` ablated.
    kind="mean" replaces each head's output by its mean over all positions of input_ids."""
    means = head_means(model, input_ids, [layer for layer, _ in heads], batch_size) if kind == "mean" else None
    with ablated_heads(model, heads, kind, means):
        return next_token_loss(model, input_ids, loss_from, batch_size)


def head_ablation_table(model: nn.Module, input_ids: torch.Tensor, heads: Sequence[tuple[int, int]] | None = None,
                        kinds: Sequence[str] = ("zero",), *, loss_from: int = 1,
                        batch_size: int = BATCH) -> pa.Table:
    """The `head_ablation` table: loss_delta = loss with one head ablated - clean loss, per head and kind.
    One forward pass over input_ids per (head, kind): keep input_ids small."""
    _, blocks = locate(model, arch_of(model))
    n_heads = dims(model.config)["n_heads"]
    heads = [(layer, h) for layer in range(len(blocks)) for h in range(n_heads)] if heads is None else list(heads)
    _check_heads(model, heads)
    clean = next_token_loss(model, input_ids, loss_from, batch_size)
    rows = []
    for kind in kinds:
        means = head_means(model, input_ids, [layer for layer, _ in heads], batch_size) if kind == "mean" else None
        for layer, head in heads:
            with ablated_heads(model, [(layer, head)], kind, means):
                loss = next_token_loss(model, input_ids, loss_from, batch_size)
            rows.append({"layer": layer, "head": head, "kind": kind, "loss_delta": loss - clean})
    return pa.Table.from_pylist(rows, schema=ABLATION_SCHEMA)
