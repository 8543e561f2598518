"""Logit lens on MLP neurons (and SAE latents): which tokens each one's output direction promotes and suppresses.

A neuron n of layer L writes a_n * w_out[n] into the residual stream (w_out = row n of the MLP output
projection, as (width, d_model)). Read straight through the final norm and the unembedding, its direct
effect on the logits is

    logits_n = W_U^T (gamma * w_out[n])            (vocab,)

up to the positive per-token scale the norm divides by (RMS or std of the whole residual), which
rescales every neuron alike and so does not change any ranking. What is left out, on purpose:

- the norm's mean subtraction (LayerNorm: GPT-2, GPT-NeoX) - it only removes the component along
  the all-ones direction; the weight `gamma` is used as an elementwise gain;
- additive biases (the MLP output bias, LayerNorm's beta, an LM-head bias): they are the same vector
  for every neuron, not part of any neuron's effect;
- Gemma 2/3 and OLMo 2 pass the MLP's output through a norm before the residual stream: its gain
  multiplies w_out[n] too (gamma_out * w_out[n]), and its per-token scale is left out like the final one's;
  Gemma's final logit soft-cap (tanh) is monotone, so the ranking is the one before it; Granite's multiplier
  on the blocks' outputs and Cohere's and Granite's on the logits are taken, so the weights are the logits';
- BERT's MLM head transform (dense + GELU + LayerNorm, not a norm): BERT has no final norm, so gamma = 1
  and its table is only a rough lens.

An SAE latent's output direction is its decoder row where that is a residual-stream vector (an SAE on a residual
stream or on hook_attn_out/hook_mlp_out, a transcoder), or the decoder row through the output projection it is read
before (an SAE on mlp.hook_post: the MLP's; on attn.hook_z: the attention's, every head's slice at once); then the
same gains apply (`latent_directions`). SAEs before a nonlinearity or a norm (mlp.hook_pre, lnN.hook_normalized)
get no lens rows.

Cost: (vocab x d_model x width) multiply-adds per layer - 43 GFLOP for SmolLM2-135M - done as a few
matmuls over chunks of neurons, each followed by a top-k along the vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from ..architectures import arch_of, dims, locate, text_config
from ..errors import UserError
from ..hooks import HookPoint, final_norm, mlp_out_weight, norm_gain, out_weight, unembedding, write_gain
from ..sae import CrossLayerTranscoder, split_sae

SCHEMA = pa.schema([
    ("hook", pa.string()), ("layer", pa.int32()), ("neuron", pa.int32()), ("sign", pa.string()), ("rank", pa.int32()),
    ("token_id", pa.int32()), ("token", pa.string()), ("weight", pa.float32()),
])
CHUNK = 512  # neurons per matmul: a (512, vocab) float32 block is 100 MB for a 49k vocabulary


def _gain(model: nn.Module, d_model: int, device: torch.device) -> torch.Tensor:
    """The final norm's elementwise gain (ones where there is no final norm: BERT)."""
    norm = final_norm(model)
    return norm_gain(model, norm) if norm is not None else torch.ones(d_model, device=device)


def neuron_logits(model: nn.Module, layer: int, neurons: slice | Sequence[int] | None = None) -> torch.Tensor:
    """Direct logit effect of each neuron of `layer` (all, or the given ones): (n_neurons, vocab) float32."""
    w_out = mlp_out_weight(model, layer)  # (width, d_model)
    if neurons is not None:
        w_out = w_out[neurons]
    w_u, gain = _readout(model)
    return (w_out.float() * _layer_gain(model, layer, gain)) @ w_u


def _layer_gain(model: nn.Module, layer: int, gain: torch.Tensor) -> torch.Tensor:
    """The final norm's gain, times the gain of the norm on this layer's MLP output where there is one, times the
    factors a family puts on its blocks' outputs and its logits (Granite's, Cohere's)."""
    written = write_gain(model, layer, "mlp")
    gain = gain if written is None else gain * written
    factor = arch_of(model).logit_scale(text_config(model.config))
    return gain if factor == 1.0 else gain * factor


def _readout(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_U as float32 (d_model, vocab) - a transposed view, no copy for float32 weights; the norm gain)."""
    w_u = unembedding(model).float()
    return w_u, _gain(model, w_u.shape[0], w_u.device)


def topk_ids(x: torch.Tensor, k: int, largest: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (or bottom-k) of each row of x (rows, cols), best first, ties broken by the lower column index.

    torch.topk's order among equal values is unspecified. One extra entry tells whether the k-th value
    is tied with one left out; those rows (rare: e.g. an all-zero neuron) are redone exactly, and ties
    inside the k are re-sorted. Returns (values, ids), numpy arrays of shape (rows, k).
    """
    k = min(k, x.shape[1])
    vals, idx = x.topk(min(k + 1, x.shape[1]), dim=1, largest=largest, sorted=True)
    ambiguous = torch.nonzero(vals[:, k - 1] == vals[:, -1]).flatten().tolist() if vals.shape[1] > k else []
    vals, idx = vals[:, :k].float().cpu().numpy(), idx[:, :k].cpu().numpy()
    for r in ambiguous:
        kth = x[r, idx[r, -1]]
        cand = torch.nonzero((x[r] >= kth) if largest else (x[r] <= kth)).flatten()
        vals[r], idx[r] = _ranked(x[r, cand].float().cpu().numpy(), cand.cpu().numpy(), k, largest)
    order = np.lexsort((idx, -vals if largest else vals), axis=1)
    return np.take_along_axis(vals, order, 1), np.take_along_axis(idx, order, 1)


def _ranked(values: np.ndarray, ids: np.ndarray, k: int, largest: bool) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((ids, -values if largest else values))[:k]
    return values[order], ids[order]


def decode_tokens(tokenizer: Any, ids: np.ndarray) -> np.ndarray:
    """Decoded text of each id (object array), decoding each distinct id once; None where the tokenizer
    has no such id (models often pad the vocabulary past the tokenizer's) or there is no tokenizer."""
    flat = np.asarray(ids).ravel()
    uniq, inverse = np.unique(flat, return_inverse=True)
    texts = np.full(len(uniq), None, dtype=object)
    if tokenizer is not None:
        known = uniq < len(tokenizer)
        texts[known] = tokenizer.batch_decode([[int(i)] for i in uniq[known]], skip_special_tokens=False,
                                              clean_up_tokenization_spaces=False)
    return texts[inverse].reshape(np.shape(ids))


def has_lens(point: HookPoint) -> bool:
    """Whether the logit lens reads this point's features: MLP neurons, and SAE latents whose decoder writes the
    residual stream (an SAE on a residual stream, on attention's or the MLP's output, on mlp.hook_post or
    attn.hook_z, or a transcoder: sparsify's, or one whose out_hook is such a site)."""
    base, latents = split_sae(point.site)
    if not latents:
        return point.site == "mlp.hook_post"
    if point.sae.transcoder and not point.sae.out_hook:  # sparsify's: the MLP module's output
        return True
    written = point.sae.out_site or base
    return written in _WRITES or written in _PROJECTED


_WRITES = {"hook_resid_pre": False, "hook_resid_mid": False, "hook_resid_post": False, "hook_attn_out": True,
           "hook_mlp_out": True}
"""Sites that are residual-stream vectors -> whether a block's multiplier (Granite's) still applies to them (what
attention and the MLP add; their output norms, where a family has them, are already applied)."""
_PROJECTED = {"mlp.hook_post": "mlp", "attn.hook_z": "attn"}
"""Sites read before an output projection -> the part whose projection (and output norm) a decoder row passes."""


def latent_writes(model: nn.Module, point: HookPoint) -> tuple[torch.Tensor, str]:
    """What each of an SAE's latents writes into the residual stream per unit activation, (d_sae, d_model) float32 on
    the model's device, and the part whose output norm's per-token scale divides it ("mlp", "attn"; "stream": none).
    A residual-stream (or attention or MLP output) SAE's decoder rows are as they are; an mlp.hook_post (attn.hook_z)
    SAE's pass the MLP's (attention's) output projection; a sparsify transcoder's are the MLP module's output; a
    transcoder with an out_hook (SAELens', Gemma Scope's) is read as an SAE on that hook. Those reaching the stream
    through a module take its output norm's gain and the family's block factor, as neurons do; so do
    hook_attn_out's and hook_mlp_out's (their norms already applied). The final norm and the logits' factor are the
    reader's (the lens's gain, DLA's d_t)."""
    sae = point.sae
    if isinstance(sae, CrossLayerTranscoder):  # each latent writes its out site in this block and the n - 1 after it
        return _cross_layer_writes(model, point, sae), "stream"
    base = sae.out_site or split_sae(point.site)[0]  # the site its decoder writes
    module_output = sae.transcoder and not sae.out_hook  # sparsify's transcoder: the MLP module's output
    device = unembedding(model).device
    w = sae.decoder().to(device)
    part = "mlp" if module_output else _PROJECTED.get(base, "stream")
    if base in _PROJECTED and not module_output:
        w = w @ out_weight(model, point.layer, base).float()
    d_model = dims(model.config)["d_model"]
    if w.shape[1] != d_model:
        raise UserError(f"saes.{sae.hook}: its decoder writes {w.shape[1]} features, the residual stream has "
                        f"{d_model}; its latents' logit effects cannot be read")
    if part != "stream":
        gain = write_gain(model, point.layer, part)
    else:  # hook_attn_out/hook_mlp_out: the block's multiplier, their norm already applied; the stream itself: none
        gain = write_gain(model, point.layer, norm=False) if _WRITES.get(base, False) else None
    return (w if gain is None else w * gain), part


def _cross_layer_writes(model: nn.Module, point: HookPoint, sae: CrossLayerTranscoder) -> torch.Tensor:
    """What a cross-layer transcoder's latents write into blocks L..L+n-1's hook_mlp_out (or hook_attn_out: sae.py
    refuses any other site), which joins the stream as it is, its output norm already applied: summed, each
    block's multiplier on its own, (d_sae, d_model) float32. Its blocks were checked against the model's when its
    hook was resolved."""
    device = unembedding(model).device
    total = torch.zeros(sae.d_sae, sae.d_out, device=device)
    for j, w in enumerate(sae.decoder_blocks()):
        gain = write_gain(model, point.layer + j, norm=False)
        total += w.to(device) if gain is None else w.to(device) * gain
    return total


def latent_directions(model: nn.Module, point: HookPoint, gain: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An SAE's latents' writes into the residual stream (latent_writes), and the gain the lens reads them with: the
    final norm's, times the logits' factor."""
    w, _ = latent_writes(model, point)
    arch, config = arch_of(model), text_config(model.config)
    return w.to(gain.device), gain * arch.logit_scale(config)


@torch.inference_mode()
def logit_lens_table(model: nn.Module, tokenizer: Any, layers: list[int] | None = None, k: int = 10,
                     chunk: int = CHUNK, latents: Sequence[HookPoint] = ()) -> pa.Table:
    """The `logit_lens` table: for every MLP neuron of `layers` (default all) and every latent of the SAE
    points `latents`, the k tokens its output direction boosts most (sign 'boost', weight descending) and
    suppresses most (sign 'suppress', weight ascending), rank 1-based, ties to the lower token id. `weight` is
    the direct logit effect per unit activation, before the norm's per-token scale (see the module docstring)."""
    _, blocks = locate(model, arch_of(model))
    layers = list(range(len(blocks))) if layers is None else [int(layer) for layer in layers]
    for layer in layers:
        if not 0 <= layer < len(blocks):
            raise UserError(f"logit lens: layer {layer} out of range, this model has layers 0..{len(blocks) - 1}")
    if k < 1:
        raise UserError(f"logit lens: k must be at least 1, got {k}")

    parts: dict[str, list[np.ndarray]] = {c: [] for c in ("hook", "layer", "neuron", "sign", "rank", "token_id",
                                                          "weight")}
    w_u, gain = _readout(model)
    sources = [("mlp.hook_post", layer, lambda layer=layer: (mlp_out_weight(model, layer),
                                                             _layer_gain(model, layer, gain))) for layer in layers]
    sources += [(p.site, p.layer, lambda p=p: latent_directions(model, p, gain)) for p in latents]
    for hook, layer, directions in sources:
        w_out, layer_gain = directions()
        for start in range(0, w_out.shape[0], chunk):
            neurons = np.arange(start, min(start + chunk, w_out.shape[0]))
            logits = (w_out[start:start + len(neurons)].float() * layer_gain) @ w_u  # (chunk, vocab)
            for sign, largest in (("boost", True), ("suppress", False)):
                vals, ids = topk_ids(logits, k, largest)
                n, kk = ids.shape
                parts["hook"].append(np.full(n * kk, hook, dtype=object))
                parts["layer"].append(np.full(n * kk, layer, np.int32))
                parts["neuron"].append(np.repeat(neurons, kk).astype(np.int32))
                parts["sign"].append(np.full(n * kk, sign, dtype=object))
                parts["rank"].append(np.tile(np.arange(1, kk + 1, dtype=np.int32), n))
                parts["token_id"].append(ids.ravel().astype(np.int32))
                parts["weight"].append(vals.ravel().astype(np.float32))
    cols = {c: np.concatenate(v) if v else np.array([], dtype=object if c in ("hook", "sign") else np.int32)
            for c, v in parts.items()}
    # rows ordered (hook, layer, neuron, sign, rank): boost before suppress per neuron
    order = np.lexsort((cols["rank"], cols["sign"] == "suppress", cols["neuron"], cols["layer"],
                        cols["hook"].astype(str)))
    cols = {c: v[order] for c, v in cols.items()}
    cols["token"] = decode_tokens(tokenizer, cols["token_id"])
    return pa.table({name: pa.array(cols[name], type=SCHEMA.field(name).type) for name in SCHEMA.names},
                    schema=SCHEMA)
