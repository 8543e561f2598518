"""Direct logit attribution (DLA) of MLP neurons (and SAE latents) to the actual next token.

The final norm is linear in the residual stream once its per-token scale s is held fixed:
RMSNorm(x) = γ ⊙ x / s, LayerNorm(x) = γ ⊙ (x − mean x) / s + β. So a neuron that writes
a · w_out into the stream moves the logit of token t by

    dla = a · (w_out · d_t) / s,    d_t = γ ⊙ W_U[:, t]  (centred over d_model for LayerNorm)

and the contributions of every component (embeddings, heads, neurons, biases) sum to the logit
(tests/test_dla.py checks this). The scale s is only known after the forward pass, so each layer
keeps a · (w_out · d_t) for the mined positions until the final norm's input has been seen.

Where the MLP's output passes a norm of its own before the residual stream (Gemma 2/3, OLMo 2), a neuron
writes a · (γ_out ⊙ w_out) / s_out, s_out that norm's per-token scale, held fixed the same way: the gain
takes γ_out and the divisor is s · s_out; a head (diff jobs) likewise through the attention output's norm.
Gemma 2's final soft-cap (tanh) is not linear: the attribution is to the logit before it. Linear factors are
taken: the logits' (Cohere's logit_scale, Granite's 1 / logits_scaling) in d_t, and the blocks' outputs' (Granite's
residual_multiplier) in every neuron's and head's gain.

An SAE latent whose decoder writes the stream is read the same way: a · (w · d_t) / s, w its write into the stream
per unit activation (analyses/logit_lens.py latent_writes: the decoder row, through the output projection and that
part's output norm gain where it passes them), divided by that norm's scale too (DlaBatch.latent_gain).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch import nn

from .architectures import arch_of, text_config
from .batch import Batch, mined_rows
from .hooks import HookPoint, final_norm, mlp_out_weight, n_layers, norm_gain, out_norm, unembedding, write_gain
from .reducers import cuda_layer, kernels, layer_kernel
from .reducers.device import applies as device_path, upload


GAIN_ROWS_MIN = 16
"""The fewest rows a float32 gain matmul runs with on the CPU; fewer are padded with zeros. A GainCache row must be
the bits the batch's own matmul gives it, so a row's bits may not depend on how many rows its matmul had. MKL gives
other bits for one row (a gemv) everywhere, and on AVX-512 for the last M mod 4 rows of an M < 12 matmul; from 12
rows on, every row came out the same bits at any count and offset (tests/test_dla_defer.py checks it on the host)."""

GAIN_CACHE_BYTES = 128 * 2**20
"""What a GainCache may hold. Text repeats its tokens: the 8,192 tokens of `mine bench` (8 x 128 a batch) ask for
2,784 gain rows batch by batch, 1,364 of them distinct, and 128 MiB keeps about 700 targets' rows of all 30 layers of
SmolLM2's 1,536 neurons: the shard's most frequent targets, since those come first."""


class GainCache:
    """The gains w_out · d_t of a shard's first distinct targets, per layer, kept for the rest of the shard (the CPU
    deferred path, where the (U, d) x (d, N) gain matmul was about a quarter of what DLA adds to the forward pass):
    a batch multiplies out only the targets it is the first to ask for, into the table itself where each has a slot.
    Slots go to targets in the order the shard first asks for them (within a batch, by id) until GAIN_CACHE_BYTES is
    full, and restart with each shard, so no value depends on which shards an actor mined before (actor count, shard
    order, restarts). A kept row is the bits a batch's own matmul gives it: with GAIN_ROWS_MIN rows or more, a row's
    bits do not depend on the other rows of its matmul (tests/test_dla_defer.py)."""

    def __init__(self, layers: int, width: int, budget: int = GAIN_CACHE_BYTES):
        self.capacity = budget // max(1, layers * width * 4)
        self.width = width
        self.slot_of: dict[int, int] = {}  # target id -> its row in every layer's table
        self.tables: dict[int, torch.Tensor] = {}  # layer -> (capacity, width) float32, its pages touched as it fills
        self.filled: dict[int, int] = {}  # layer -> rows written this shard: a layer that missed a batch stops using it

    def start_shard(self) -> None:
        self.slot_of.clear()
        self.filled.clear()

    def plan(self, targets: np.ndarray) -> "GainPlan":
        """targets: a batch's distinct target ids, ascending. Takes slots for the new ones while there is room."""
        slots = np.array([self.slot_of.get(t, -1) for t in targets.tolist()], dtype=np.int64)
        miss = np.flatnonzero(slots < 0)
        first = len(self.slot_of)
        n_new = min(len(miss), self.capacity - first)
        self.slot_of.update(zip(targets[miss[:n_new]].tolist(), range(first, first + n_new)))
        slots[miss] = -1 - np.arange(len(miss))
        return GainPlan(slots, miss, first, n_new)

    def table(self, layer: int) -> torch.Tensor:
        if layer not in self.tables:
            self.tables[layer] = torch.empty(self.capacity, self.width)
        return self.tables[layer]


@dataclass
class GainPlan:
    """One batch's use of the GainCache."""

    src: np.ndarray
    """(U,) each distinct target's kept row, or -1 - its index among the misses (layer_kernel.gain_product's
    sources)."""
    miss: np.ndarray
    """Indices (into the batch's distinct targets) of those whose gains this batch multiplies out."""
    first: int
    """The slot of the first new kept row: misses[:n_new] go to slots first, first + 1, ..."""
    n_new: int


LAYER_NORMS = {"OlmoLayerNorm", "CohereLayerNorm", "Cohere2LayerNorm"}
"""Norms that centre their input, as nn.LayerNorm does, without being one (OLMo 1's has no weight; Cohere's no bias)."""
FIXED_EPS = {"OlmoLayerNorm": 1e-5}
"""Norms with no eps attribute -> the eps their forward uses."""


def _norm_kind(norm: nn.Module) -> str:
    return "layer" if isinstance(norm, nn.LayerNorm) or type(norm).__name__ in LAYER_NORMS else "rms"


def _eps(norm: nn.Module) -> float:
    if type(norm).__name__ in FIXED_EPS:
        return FIXED_EPS[type(norm).__name__]
    for name in ("variance_epsilon", "eps", "epsilon"):
        if hasattr(norm, name):
            return float(getattr(norm, name))
    return 1e-6


def norm_scale(norm: nn.Module, resid: torch.Tensor) -> torch.Tensor:
    """A norm's per-token divisor s from its input (…, d), in float32."""
    x, eps = resid.float(), _eps(norm)
    if _norm_kind(norm) == "layer":
        return torch.sqrt(x.var(dim=-1, unbiased=False) + eps)
    return torch.sqrt(x.pow(2).mean(dim=-1) + eps)


class DirectLogitAttribution:
    """Per-model constants for DLA: the target directions and the final norm's scale."""

    def __init__(self, model: nn.Module):
        self.norm = final_norm(model)
        if self.norm is None:
            raise ValueError("direct logit attribution needs a pre-norm causal LM with a final norm")
        self.kind = _norm_kind(self.norm)
        self.model = model
        self.w_u = unembedding(model)  # (d, V) view
        self.gamma = norm_gain(model, self.norm)  # float32
        arch, config = arch_of(model), text_config(model.config)
        self.readout = self.gamma * arch.logit_scale(config)
        """d_t's elementwise factor: the final norm's gain times what the model multiplies its logits by (Cohere,
        Granite)."""
        self.out_norms = {(part, layer): norm for layer in range(n_layers(model)) for part in ("attn", "mlp")
                          if (norm := out_norm(model, layer, part)) is not None}
        """(part, layer) -> the norm the output of layer's "attn" or "mlp" passes before the residual stream (Gemma
        2/3, OLMo 2); empty elsewhere."""
        self.write_gains = {(part, layer): write_gain(model, layer, part) for layer in range(n_layers(model))
                            for part in ("attn", "mlp")}
        """(part, layer) -> hooks.write_gain: that output norm's gain times Granite's block multiplier, or None."""
        self._w_out: dict[int, torch.Tensor] = {}
        # On a GPU a half-precision model's gains are one matmul in its own dtype (the precision its down
        # projection ran in): in float32 the (M, d) x (d, N) gain of every layer would cost as much as the
        # forward pass itself. Elsewhere float32.
        self.gain_dtype = (self.w_u.dtype if self.w_u.is_cuda and self.w_u.dtype in (torch.float16, torch.bfloat16)
                           else torch.float32)
        self._pool: dict[tuple[str, int], torch.Tensor] = {}
        self.cache: GainCache | None = None
        """Set by the miner (CPU): DlaBatch(defer=True) then takes its gains through it."""

    def buffer(self, kind: str, layer: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A reused (shape) tensor for what a deferred layer holds until the batch's end (CPU only). Fresh tensors
        there would be one (M, N) float32 a layer a batch (30 x 6 MiB for SmolLM2 at 8 x 128), freed together:
        the allocator hands such memory back to the system and faults it in again page by page, which measured
        costlier than the DLA itself (up to 560,000 page faults, 4 s of system time, per 4,096 tokens)."""
        n = int(np.prod(shape))
        buf = self._pool.get((kind, layer))
        if buf is None or buf.numel() < n or buf.dtype != dtype:
            buf = self._pool[(kind, layer)] = torch.empty(n, dtype=dtype)
        return buf[:n].view(shape)

    def directions(self, targets: torch.Tensor) -> torch.Tensor:
        """d_t for each target id (U,) -> (U, d), in float32."""
        d = self.w_u[:, targets].T.float() * self.readout
        if self.kind == "layer":
            d = d - d.mean(dim=-1, keepdim=True)
        return d

    def scale(self, resid: torch.Tensor) -> torch.Tensor:
        """The final norm's per-token divisor s from its input (…, d)."""
        return norm_scale(self.norm, resid)

    def head_directions(self, layer: int, directions: torch.Tensor) -> torch.Tensor:
        """d_t as the heads of `layer` see it: times the gain of the norm on the attention's output, if any."""
        gain = self.write_gains["attn", layer]
        return directions if gain is None else directions * gain

    def neuron_gain(self, layer: int, directions: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """w_out · d_t for every neuron: (U, d) @ (d, N) -> (U, N); out: a (U, N) float32 tensor to write it to."""
        if layer not in self._w_out:
            w_out = mlp_out_weight(self.model, layer)  # (N, d)
            if (gain := self.write_gains["mlp", layer]) is not None:  # as the final norm's gain is in d_t
                w_out = w_out.float() * gain
            self._w_out[layer] = w_out.to(self.gain_dtype)
        w = self._w_out[layer].T
        if self.gain_dtype == torch.float32 and not directions.is_cuda and len(directions) < GAIN_ROWS_MIN:
            padded = directions.new_zeros(GAIN_ROWS_MIN, directions.shape[1])
            padded[:len(directions)] = directions
            gain = torch.mm(padded, w)[:len(directions)]
            return gain if out is None else out.copy_(gain)
        if out is not None and self.gain_dtype == torch.float32:
            return torch.mm(directions, w, out=out)
        return (directions.to(self.gain_dtype) @ w).float()


@dataclass
class GainProduct:
    """A layer's DLA values, u / scale, not yet divided: u = gain[target] * a is taken in the hook, while the
    activations are fresh in cache, into a reused buffer; the final norm's scale is known only at the batch's end.
    The CPU kernel then divides a chunk at a time as it reduces the values (fused.update_ranked with a scale)."""

    u: torch.Tensor
    """(M, N) float32 gain[inverse] * x[sel], in DirectLogitAttribution.buffer's memory: valid until the next batch."""
    batch: "DlaBatch"
    layer: int

    def kernel_args(self) -> tuple:
        return self.u, self.batch.toks, self.batch.scale_of("mlp", self.layer).numpy()

    def values(self) -> torch.Tensor:
        """The (M, N) values, as DlaBatch computes them where the kernel does not apply: the same bits."""
        return torch.div(self.u, self.batch.scale_of("mlp", self.layer)[:, None])


@dataclass
class FusedGain:
    """A layer's DLA where the GPU kernel reduces it: the hook's activations as the model left them, reduced at the
    batch's end with each row's gains and the final norm's scale applied as the kernel reads them (cuda_layer.Gain).
    The torch path's (M, N) float32 product and quotient are never written: a bfloat16 model holds half the memory
    a layer until the batch ends, and the device makes one pass over it instead of five."""

    x: torch.Tensor
    """(B * T, N) the hook's activations, not copied."""
    layout: cuda_layer.Layout
    """The batch's contexts, with only the positions that have a next token mined (DlaBatch.fused_layout)."""
    gain: cuda_layer.Gain


class DlaBatch:
    """One batch's DLA: each hooked layer's a·(w_out·d_t), divided by the final norm's scale at the end.
    defer: keep each layer's activations until the end instead, with their gains (GainProduct) where the CPU
    kernels apply, as they are (FusedGain) where the GPU kernel does."""

    def __init__(self, dla: DirectLogitAttribution, batch: Batch, defer: bool = False):
        self.dla = dla
        self.defer = defer
        self.shape = batch.toks_np.shape
        sel = np.flatnonzero((batch.toks_np >= 0) & (batch.targets_np >= 0))  # mined, with a next token
        self.sel = upload(sel, batch.toks.device)
        self.sel_np, self.toks_np = sel, batch.toks_np.reshape(-1)[sel]
        self.toks = upload(self.toks_np, batch.toks.device)
        # Text repeats its tokens, so a batch has far fewer distinct targets than positions (about a third at
        # 8 x 128): the gain matmul runs once per distinct target, and its rows are gathered per position.
        targets, inverse = np.unique(batch.targets_np.reshape(-1)[sel], return_inverse=True)
        self.directions = dla.directions(upload(targets, batch.toks.device))  # (U, d), one per distinct target
        self.inverse_np = inverse.astype(np.int64)
        self.inverse = upload(self.inverse_np, batch.toks.device)  # (M,) position -> its target's row
        cache = dla.cache if defer and batch.toks.device.type == "cpu" else None
        self.plan = cache.plan(targets) if cache is not None else None
        self.src_np = self.plan.src[self.inverse_np] if self.plan is not None else None  # (M,) position -> its gain
        self.urow = None  # defer: mined row (as the statistics kernel walks them) -> its row here, or -1
        if defer:
            mined = np.flatnonzero(batch.toks_np.reshape(-1) >= 0)
            self.urow = np.full(len(mined), -1, np.int64)
            self.urow[np.searchsorted(mined, sel)] = np.arange(len(sel))
        self.raw: dict[str, torch.Tensor] = {}
        self.raw_part: dict[str, tuple[str, int]] = {}  # a raw value's name -> ("mlp" or "attn", its layer)
        self.deferred: dict[str, GainProduct] = {}
        self.fused: dict[str, tuple[torch.Tensor, int]] = {}  # name -> (activations, layer)
        self.scale: torch.Tensor | None = None  # (M,) at the mined positions with a next token
        self.row_scale: torch.Tensor | None = None  # (B * T,) at every position
        self.out_row_scale: dict[tuple[str, int], torch.Tensor] = {}  # (part, layer) -> (B * T,) its out norm's scale
        self._layout: cuda_layer.Layout | None = None
        self._fused: tuple[cuda_layer.Layout, torch.Tensor] | None = None

    def layout(self) -> cuda_layer.Layout | None:
        """The rows of the raw values as the GPU kernel takes them, once per batch (None where it does not run)."""
        if self._layout is None and self.raw and device_path(self.toks) and len(self.toks):
            self._layout = cuda_layer.Layout.of_rows(self.toks)
        return self._layout

    def fused_layout(self) -> tuple[cuda_layer.Layout, torch.Tensor]:
        """The batch's contexts with only the positions that have a next token mined, and each position's row in
        the gain table: what the GPU kernel takes for FusedGain, once per batch."""
        if self._fused is None:
            dev = self.toks.device
            toks = np.full(int(np.prod(self.shape)), -1, np.int64)
            toks[self.sel_np] = self.toks_np
            target = np.zeros(len(toks), np.int32)  # a valid row where none is read
            target[self.sel_np] = self.inverse_np
            grid = toks.reshape(self.shape)
            self._fused = cuda_layer.Layout.of_grid(grid, upload(grid, dev), self.sel), upload(target, dev)
        return self._fused

    def per_position(self, per_target: torch.Tensor) -> torch.Tensor:
        """(U, ...) rows, one per distinct target -> a fresh (M, ...), one per mined position."""
        return per_target.index_select(0, self.inverse)

    def numerator(self, point: HookPoint, x: torch.Tensor) -> layer_kernel.Numerator | None:
        """The deferred path (CPU kernels): this layer's gains (the matmul, through the GainCache) and the buffer its
        numerator u = gain[target] * a goes to, for the statistics kernel to write as it reads x; None elsewhere."""
        if not (self.defer and x.ndim == 3 and kernels.usable(x)):
            return None
        N = x.shape[-1]
        u = self.dla.buffer("u", point.layer, (len(self.sel_np), N), torch.float32)
        cache, plan = self.dla.cache, self.plan
        if plan is not None and N == cache.width and cache.filled.get(point.layer, 0) == plan.first:
            table = cache.table(point.layer)
            fresh = table[:1]  # not read where every target is kept
            if len(plan.miss) and plan.n_new == len(plan.miss):  # every new row has a slot: straight in
                fresh = self.dla.neuron_gain(point.layer, self.directions[plan.miss],
                                             table[plan.first:plan.first + plan.n_new])
            elif len(plan.miss):
                fresh = self.dla.neuron_gain(point.layer, self.directions[plan.miss],
                                             self.dla.buffer("gain", 0, (len(plan.miss), N), torch.float32))
                table[plan.first:plan.first + plan.n_new] = fresh[:plan.n_new]
            cache.filled[point.layer] = plan.first + plan.n_new
            return layer_kernel.Numerator(self.urow, table, fresh, self.src_np, u)
        gain = self.dla.neuron_gain(point.layer, self.directions,
                                    self.dla.buffer("gain", 0, (len(self.directions), N), torch.float32))
        return layer_kernel.Numerator(self.urow, gain, gain[:1], self.inverse_np, u)

    def gain(self, point: HookPoint, x: torch.Tensor, numerator: layer_kernel.Numerator | None = None) -> None:
        """numerator: what numerator(point, x) gave, written or not by the statistics kernel."""
        numerator = numerator or self.numerator(point, x)
        if numerator is not None:
            if not numerator.done:
                layer_kernel.gain_product(x, self.sel_np, numerator.kept, numerator.src, numerator.u, numerator.fresh)
            self.deferred[point.name] = GainProduct(numerator.u, self, point.layer)
            return
        if self.defer and x.ndim == 3 and len(self.sel_np) and cuda_layer.usable(x):
            # reduced at the end as it is, no copy: the model only reads an MLP's activations after its hook (the
            # miner's inference tensors keep no version counter to check that with)
            self.fused[point.name] = (x, point.layer)
            return
        gain = self.dla.neuron_gain(point.layer, self.directions)  # (U, N)
        self.keep_raw(point.name, "mlp", point.layer, self.per_position(gain).mul_(mined_rows(x, self.sel)))

    def latent_gain(self, point: HookPoint, x: torch.Tensor, writes: torch.Tensor, part: str) -> None:
        """An SAE's latents: a · (w · d_t), w each latent's write into the stream (analyses.logit_lens.latent_writes),
        divided in finish() by the final norm's scale and that of the norm on `part`'s output, if any."""
        gain = self.directions @ writes.T  # (U, d_sae) float32
        self.keep_raw(point.name, part, point.layer, self.per_position(gain).mul_(mined_rows(x, self.sel).float()))

    def keep_raw(self, name: str, part: str, layer: int, values: torch.Tensor) -> None:
        """A fresh (M, ...) of undivided values of layer's "mlp" neurons or "attn" heads (or "stream": what writes
        the stream directly, SAE latents), divided in finish()."""
        self.raw[name] = values
        self.raw_part[name] = (part, layer)

    @contextmanager
    def watch_norm(self) -> Iterator[None]:
        def keep(module, args):
            self.row_scale = self.dla.scale(args[0]).reshape(-1)
            self.scale = self.row_scale[self.sel]

        def keep_out(key: tuple[str, int]):
            def hook(module, args):
                self.out_row_scale[key] = norm_scale(module, args[0]).reshape(-1)
            return hook

        handles = [self.dla.norm.register_forward_pre_hook(keep)]
        handles += [norm.register_forward_pre_hook(keep_out(key)) for key, norm in self.dla.out_norms.items()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def row_scale_of(self, part: str, layer: int) -> torch.Tensor:
        """(B * T,) the divisor of layer's MLP neurons (part "mlp") or heads ("attn") at every position: the final
        norm's scale, times the scale of the norm on that part's output where there is one."""
        out = self.out_row_scale.get((part, layer))
        return self.row_scale if out is None else self.row_scale * out

    def scale_of(self, part: str, layer: int) -> torch.Tensor:
        """(M,) row_scale_of(part, layer) at the mined positions with a next token."""
        return self.scale if (part, layer) not in self.out_row_scale else self.row_scale_of(part, layer)[self.sel]

    def finish(self) -> Iterator[tuple[str, torch.Tensor | GainProduct | FusedGain]]:
        for name, raw in self.raw.items():
            yield name, raw.div_(self.scale_of(*self.raw_part[name])[:, None])  # this batch's own tensor: no copy
        yield from self.deferred.items()
        for name, (x, layer) in self.fused.items():
            layout, target = self.fused_layout()
            table = self.dla.neuron_gain(layer, self.directions).contiguous()  # (U, N) float32, as the torch path's
            yield name, FusedGain(x.reshape(-1, x.shape[-1]), layout,
                                  cuda_layer.Gain(table, target, self.row_scale_of("mlp", layer).contiguous()))
