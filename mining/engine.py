"""Mine one shard: batched forward passes with hooks feeding the reducers.

Activations never leave the device as whole tensors: each hook hands its (B, T, N) output
straight to that hook's reducers, which keep O(K·N + bins·N) state. Only the token table
(two floats a token) and the opt-in dense sample are copied to the host.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from .dla import DirectLogitAttribution, DlaBatch, FusedGain, GainCache, GainProduct
from .hooks import HookPoint, capture, resolve_hooks
from .models import LoadedModel
from .errors import UserError
from .reducers import ContextTopK, Histogram, HistogramBins, Moments, QuantileSamples, TopK
from .batch import OnHost, make_batch, mined_rows, token_scores
from .reducers import cuda_layer
from .reducers.device import applies as device_path, download, upload
from .reducers.fused import update_hook, update_ranked
from .reducers.layer_kernel import Numerator
from .reducers.gate_cases import GateCases
from .reducers.group_variance import GroupVariance, update_both
from .reducers.pair import CrossMoments, PairMoments
from .sae import load_saes
from .shards import Shard
from .spec import JobSpec


def histogram_bins(spec: JobSpec) -> HistogramBins:
    s = spec.stats
    return HistogramBins(s.histogram_mantissa_bits, s.histogram_min_exp, s.histogram_max_exp)


REDUCER_TYPES = {"top": TopK, "bottom": TopK, "contexts": ContextTopK, "histogram": Histogram, "moments": Moments,
                 "dla_top": TopK, "dla_bottom": TopK, "dla_moments": Moments, "samples": QuantileSamples,
                 "gate_cases": GateCases, "by_token": GroupVariance, "by_position": GroupVariance,
                 "top_b": TopK, "pair": PairMoments, "diff_top": TopK, "diff_bottom": TopK, "cross": CrossMoments,
                 "dla_moments_b": Moments}


@dataclass
class HookStats:
    """All reducers of one hook point. Merge and persistence go reducer by reducer."""

    top: TopK | None = None
    bottom: TopK | None = None
    contexts: ContextTopK | None = None
    histogram: Histogram | None = None
    moments: Moments | None = None
    dla_top: TopK | None = None
    """Direct logit attribution to the actual next token: most positive and most negative, and moments."""
    dla_bottom: TopK | None = None
    dla_moments: Moments | None = None
    samples: QuantileSamples | None = None
    """Examples sampled uniformly within quantile bands (three kinds), see reducers/samples.py."""
    gate_cases: GateCases | None = None
    """Gated MLPs: count, mean and top examples of each (gate, up) sign case."""
    by_token: GroupVariance | None = None
    """Variance explained by the current token (its G most frequent ids, the rest pooled) and by position."""
    by_position: GroupVariance | None = None
    # diff jobs (mining/diff.py): `top` is model A's, these pair A with B at the same tokens
    top_b: TopK | None = None
    pair: PairMoments | None = None
    diff_top: TopK | None = None
    """Tokens where B - A is largest (diff_bottom: smallest)."""
    diff_bottom: TopK | None = None
    cross: CrossMoments | None = None
    dla_moments_b: Moments | None = None
    """Diff jobs with dla: B's direct logit attribution moments (A's are dla_moments)."""

    @classmethod
    def empty(cls, spec: JobSpec, dla: bool = False, gated: bool = False) -> "HookStats":
        k = spec.stats.top_k
        poly = spec.stats.polysemanticity
        return cls(
            top=TopK(k, largest=True),
            bottom=TopK(k, largest=False),
            contexts=ContextTopK(k),
            histogram=Histogram(histogram_bins(spec)) if spec.stats.histogram else None,
            moments=Moments() if spec.stats.moments else None,
            dla_top=TopK(k, largest=True) if dla else None,
            dla_bottom=TopK(k, largest=False) if dla else None,
            dla_moments=Moments() if dla else None,
            samples=QuantileSamples(histogram_bins(spec), spec.stats.quantile_samples)
            if spec.stats.quantile_samples else None,
            gate_cases=GateCases(k) if gated else None,
            by_token=GroupVariance(spec.stats.token_groups + 1) if poly else None,
            by_position=GroupVariance(spec.corpus.context_length) if poly else None,
        )

    def update(self, x: torch.Tensor, toks: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor,
               flat_toks: torch.Tensor, groups: dict[str, torch.Tensor] | None = None,
               layout: cuda_layer.Layout | None = None, product: Numerator | None = None) -> None:
        # x: (B, T, N); toks: (B, T) global index, -1 where not mined; mask = toks >= 0
        # product: DLA's numerator for the CPU kernel to write on the way (product.done says whether it did)
        # rows: (M,) the mined positions' flat index into B*T (from the host: no device sync); flat_toks = their toks
        # groups: "by_token" / "by_position" -> (M,) group index of each mined position
        # one pass for the standard set: the GPU kernel, or the CPU kernels (a shard's tok grid rises along each context)
        if layout is not None and x.ndim == 3 and cuda_layer.usable(x):
            cuda_layer.layer_pass(x.view(-1, x.shape[-1]), layout, self.top, self.bottom, self.contexts,
                                  self.histogram, self.moments)
            fused = True
        else:
            fused = update_hook(self.top, self.bottom, self.contexts, self.histogram, self.moments, x, toks, mask,
                                n_mined=len(flat_toks), product=product)
        if fused and self.samples is None and self.by_token is None:
            return
        flat = mined_rows(x, rows)  # (M, N): only the mined positions
        if not fused:
            self.top.update(flat, flat_toks, check=False)  # the miner checks the batch's token range once
            self.bottom.update(flat, flat_toks, check=False)
            self.contexts.update(x, toks, check=False, rising=True)
            if self.histogram is not None:
                self.histogram.update(flat)
            if self.moments is not None:
                self.moments.update(flat)
        flat = flat.float()  # these take float32 (a no-op on the CPU, where mined_rows gave float32)
        if self.samples is not None:
            self.samples.update(flat, flat_toks)
        if self.by_token is not None:
            # groups in range by construction
            update_both(flat, (self.by_token, groups["by_token"]), (self.by_position, groups["by_position"]))

    def update_gate(self, x: torch.Tensor, rows: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                    flat_toks: torch.Tensor) -> None:
        """gate, up: (M, N) booleans (pre-activation > 0) at the mined positions."""
        self.gate_cases.update(mined_rows(x, rows).float(), gate, up, flat_toks)

    def update_dla(self, dla: torch.Tensor | GainProduct | FusedGain, toks: torch.Tensor,
                   layout: cuda_layer.Layout | None = None) -> None:
        """dla (M, N) for the mined positions that have a next token, or those values still to compute; toks (M,);
        layout: their rows as the GPU kernel takes them (Layout.of_rows(toks), shared by every layer of a batch)."""
        if isinstance(dla, FusedGain):
            cuda_layer.layer_pass(dla.x, dla.layout, self.dla_top, self.dla_bottom, None, None, self.dla_moments,
                                  gain=dla.gain)
            return
        if isinstance(dla, GainProduct):
            if update_ranked(self.dla_top, self.dla_bottom, self.dla_moments, *dla.kernel_args()):
                return
            dla = dla.values()
        if dla.shape[0] and cuda_layer.usable(dla):
            cuda_layer.layer_pass(dla, layout or cuda_layer.Layout.of_rows(toks), self.dla_top, self.dla_bottom, None,
                                  None, self.dla_moments)
            return
        if update_ranked(self.dla_top, self.dla_bottom, self.dla_moments, dla, toks):
            return
        self.dla_top.update(dla, toks, check=False)
        self.dla_bottom.update(dla, toks, check=False)
        self.dla_moments.update(dla)

    FLOORED = ("top", "bottom", "contexts", "dla_top", "dla_bottom")

    def ranked_parts(self) -> dict[str, TopK]:
        """The top-k parts (the TopK inside ContextTopK), by name."""
        out = {}
        for name in self.FLOORED:
            r = getattr(self, name)
            if r is not None:
                out[name] = r.top if isinstance(r, ContextTopK) else r
        return out

    def set_floors(self, floors: dict[str, torch.Tensor], rows: int = 0) -> None:
        """rows: the tokens the floors were taken from (sizes the device path's candidate buffers)."""
        for name, floor in floors.items():
            if getattr(self, name) is not None:
                getattr(self, name).set_floor(floor, rows)

    def topks(self) -> list[TopK]:
        """Every TopK inside the parts (ContextTopK's, GateCases' too)."""
        out = []
        for r in self.parts().values():
            out += [r] if isinstance(r, TopK) else [r.top] if isinstance(r, ContextTopK) else getattr(r, "top", [])
        return out

    def dense_only(self) -> None:
        """Rank every batch densely on the device path (the retry of a shard whose buffers overflowed)."""
        for r in self.topks():
            r.sparse = False

    def parts(self) -> dict[str, object]:
        return {name: r for name, r in vars(self).items() if r is not None}

    def merge(self, other: "HookStats") -> "HookStats":
        return HookStats(**{name: r.merge(getattr(other, name)) for name, r in self.parts().items()})

    def merge_(self, other: "HookStats") -> "HookStats":
        """In place, the same bits as merge: reducers with a `merge_` (the histogram, most of a state's bytes)
        add into their own buffers; the rest are replaced by their merge."""
        for name, r in self.parts().items():
            if hasattr(r, "merge_"):
                r.merge_(getattr(other, name))
            else:
                setattr(self, name, r.merge(getattr(other, name)))
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{name}.{key}": t for name, r in self.parts().items() for key, t in r.state_dict().items()}

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor]) -> "HookStats":
        """The parts present in the saved state (each reducer restores its own configuration)."""
        names = sorted({k.split(".", 1)[0] for k in tensors})
        out = {}
        for name in names:
            part = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.split(".", 1)[0] == name}
            out[name] = REDUCER_TYPES[name].from_state_dict(part)
        return cls(**out)


@dataclass
class ShardResult:
    index: int
    stats: dict[str, HookStats]
    """Hook name -> reducer states."""
    tokens: pa.Table | None
    dense: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    """Hook name -> (tok (n,), float16 values (n, N))."""
    n_tokens: int = 0
    seconds: float = 0.0


def state_bytes_per_feature(spec: JobSpec) -> float:
    """Bytes a feature's statistics take in a shard's (and the merged) state with this job's stats: measured on a
    probe of 8 features, not worked out from each reducer's layout (3.8 KB with the default stats, most of it the
    histogram's counts; 9.2 KB with 8 quantile samples)."""
    n, m = 8, 16
    probe = HookStats.empty(spec)
    toks = torch.arange(m).reshape(1, m)
    groups = {"by_token": torch.zeros(m, dtype=torch.long),  # polysemanticity's groups: any in range
              "by_position": torch.arange(m) % spec.corpus.context_length}
    probe.update(torch.randn(1, m, n, generator=torch.Generator().manual_seed(0)), toks, toks >= 0, torch.arange(m),
                 toks.reshape(-1), groups)
    return sum(t.numel() * t.element_size() for t in probe.state_dict().values()) / n


def dense_selected(toks: np.ndarray, fraction: float) -> np.ndarray:
    """Stable pseudo-random choice by token index alone, so it is the same whatever the sharding."""
    h = (toks.astype(np.uint64) + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
    h ^= h >> np.uint64(29)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(32)
    return (h >> np.uint64(40)).astype(np.float64) / float(1 << 24) < fraction


class ShardMiner:
    """Holds the loaded model and resolved hooks; `mine(shard)` is one coarse call per shard."""

    def __init__(self, spec: JobSpec, loaded: LoadedModel, token_groups: list[int] | None = None):
        """token_groups: the corpus' most frequent token ids (stats.polysemanticity), from `frequent_tokens`."""
        self.spec = spec
        self.loaded = loaded
        self.batch_size: int | None = spec.compute.fixed_batch_size
        """Contexts per forward pass: compute.batch_size, or what batch_fit chose for `auto`."""
        n_ctx = spec.corpus.context_length  # an attention pattern's key positions
        self.saes = saes = load_saes(spec.saes)
        """The job's SAEs by the hook they read (a diff job's model B reads its activations with the same ones)."""
        # a diff job may have no hooks
        self.points: list[HookPoint] = resolve_hooks(loaded.model, spec.hooks, n_ctx, saes) if spec.hooks else []
        self.dense_points = resolve_hooks(loaded.model, spec.dense.hooks, n_ctx, saes) if spec.dense.hooks else []
        self.dla = DirectLogitAttribution(loaded.model) if spec.stats.dla and loaded.causal else None
        self.dla_points = {p.name for p in self.points if p.site == "mlp.hook_post"} if self.dla else set()
        self.latent_dla: dict[str, tuple[torch.Tensor, str]] = {}
        """SAE latents whose decoder writes the stream (stats.dla) -> (their writes, (d_sae, d_model) float32; the
        part whose output norm divides them): their DLA is a · (w · d_t), as a neuron's."""
        if self.dla:
            from .analyses.logit_lens import has_lens, latent_writes

            self.latent_dla = {p.name: latent_writes(loaded.model, p) for p in self.points if p.sae and has_lens(p)}
        if self.dla_points and loaded.device.type == "cpu":
            self.dla.cache = GainCache(len(self.dla_points), max(p.width for p in self.points if p.name in self.dla_points))
        self.gate_points = gate_points(loaded.model, self.points) if spec.stats.gate_cases else {}
        self.floors: dict[str, dict[str, torch.Tensor]] = {}
        """hook -> part -> (N,) keys no entry below which can reach the merged top-k (see raise_floors)."""
        self.floor_rows = 0
        """Tokens of the stored shards the floors come from."""
        self.remined = 0
        """Shards mined twice because a batch overflowed the device path's candidate buffers (bench reports it)."""
        self._union: dict[str, dict[str, TopK]] = {}
        self.token_group = None
        if spec.stats.polysemanticity:
            if token_groups is None:
                raise ValueError("stats.polysemanticity needs the corpus' frequent token ids (token_groups)")
            self.token_group = token_group_map(token_groups, spec.stats.token_groups, len(loaded.tokenizer),
                                               loaded.device)

    def mine(self, shard: Shard) -> ShardResult:
        steps = self.steps(shard)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    @torch.inference_mode()  # on a generator torch enters the mode around each step, not across the pauses
    def steps(self, shard: Shard) -> Generator[None, None, ShardResult]:
        """mine(shard) a batch per step, its ShardResult returned at the end: `mine bench` interleaves its variants
        batch by batch. Between steps no hook is registered on the model."""
        result = yield from self._mine(shard, sparse=True)
        flags = [t._overflow for st in result.stats.values() for t in st.topks() if t._overflow is not None]
        if flags and bool(torch.stack(flags).any()):  # one host sync per shard, none per batch
            # a batch had more top-k candidates than the device path's buffer held: mine it again, densely
            self.remined += 1
            result = yield from self._mine(shard, sparse=False)
        return result

    def _mine(self, shard: Shard, sparse: bool) -> Generator[None, None, ShardResult]:
        start = time.perf_counter()
        dev = self.loaded.device
        if self.dla is not None and self.dla.cache is not None:
            self.dla.cache.start_shard()
        stats = {p.name: HookStats.empty(self.spec, dla=p.name in self.dla_points or p.name in self.latent_dla,
                                         gated=p.site == "mlp.hook_post" and p.layer in self.gate_points)
                 for p in self.points}
        for name, st in stats.items():
            st.set_floors(self.floors.get(name, {}), self.floor_rows)
            if not sparse:
                st.dense_only()
        extra = {q.name: (layer, kind) for layer, pair in self.gate_points.items() for kind, q in zip(("gate", "up"), pair)}
        dense: dict[str, list[tuple[np.ndarray, torch.Tensor]]] = {p.name: [] for p in self.dense_points}
        token_parts: list[dict[str, np.ndarray]] = []
        tok_grid = shard.tok_grid()  # (C, L)
        B = self.batch_size or unresolved()
        for lo in range(0, len(shard.ids), B):
            batch = make_batch(shard, slice(lo, lo + B), tok_grid, dev)
            toks_np, targets_np, T = batch.toks_np, batch.targets_np, batch.T
            toks, mask, rows, flat_toks = batch.toks, batch.mask, batch.rows, batch.flat_toks
            pick = {name: dense_selected(toks_np, self.spec.dense.token_fraction) & (toks_np >= 0) for name in dense}
            dla = DlaBatch(self.dla, batch, defer=True) if self.dla else None
            groups = None
            if self.token_group is not None:
                ids = batch.ids
                pos = torch.arange(T, device=dev).expand(len(ids), T)
                groups = {"by_token": self.token_group[ids.clamp(max=len(self.token_group) - 1)].reshape(-1)[rows],
                          "by_position": pos.reshape(-1)[rows]}

            signs: dict[int, dict[str, torch.Tensor]] = {}

            def on_activation(point: HookPoint, x: torch.Tensor) -> None:
                if x.dtype in (torch.bfloat16, torch.float16) and not device_path(x):
                    # the CPU kernels read float32 (the reducers' own image of these values): one conversion, then
                    # the single pass, instead of each reducer on its own copy
                    x = x.float()
                if point.name in extra:  # a gated MLP's gate or up projection: keep only the signs
                    layer, kind = extra[point.name]
                    signs.setdefault(layer, {})[kind] = mined_rows(x, rows) > 0
                numerator = dla.numerator(point, x) if dla is not None and point.name in self.dla_points else None
                if point.name in stats:
                    stats[point.name].update(x, toks, mask, rows, flat_toks, groups, batch.layout, numerator)
                    if stats[point.name].gate_cases is not None:
                        s = signs.pop(point.layer)
                        stats[point.name].update_gate(x, rows, s["gate"], s["up"], flat_toks)
                if dla is not None and point.name in self.dla_points:
                    dla.gain(point, x, numerator)
                if dla is not None and point.name in self.latent_dla:
                    dla.latent_gain(point, x, *self.latent_dla[point.name])
                if point.name in dense and pick[point.name].any():
                    sel = upload(np.flatnonzero(pick[point.name]), x.device)
                    dense[point.name].append((toks_np[pick[point.name]], download(mined_rows(x, sel, torch.float16))))

            points = self.points + [p for p in self.dense_points if p.name not in stats]
            points += [q for pair in self.gate_points.values() for q in pair if q.name not in {p.name for p in points}]
            with capture(self.loaded.model, points, on_activation), (dla.watch_norm() if dla else nullcontext()):
                out = self.loaded.model(input_ids=batch.ids, attention_mask=batch.attention)
            if dla is not None:
                for name, values in dla.finish():
                    stats[name].update_dla(values, dla.toks, dla.layout())
            if self.spec.stats.token_table:
                token_parts.append(self._token_rows(shard, batch.sl, T, out, toks_np, targets_np))
            del out  # the logits (batch x T x vocab) must not live on through the next forward
            yield
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)  # the asynchronous copies to the host (token table, dense) are done
        result = ShardResult(shard.index, stats, _concat(token_parts, shard.index), n_tokens=shard.n_tokens)
        result.dense = {name: (np.concatenate([t for t, _ in parts]), np.concatenate([v.numpy() for _, v in parts]))
                        for name, parts in dense.items() if parts}
        result.seconds = time.perf_counter() - start
        return result

    def raise_floors(self, result: ShardResult) -> None:
        """Call once `result` is stored as complete. The union of the stored shards' top-k is kept, and
        its k-th keys become floors for the next shards this miner mines, which then skip whatever can
        never reach the merged top-k (see reducers/topk.py). Only stored shards count, since only
        they are sure to be in the final merge."""
        for name, st in result.stats.items():
            union = self._union.setdefault(name, {})
            for part, r in st.ranked_parts().items():
                if r.keys is None:
                    continue
                union[part] = r if part not in union else union[part].merge(r)
                self.floors.setdefault(name, {})[part] = union[part].threshold()
        self.floor_rows += result.n_tokens

    def _token_rows(self, shard: Shard, sl: slice, T: int, out, toks_np: np.ndarray,
                    target: np.ndarray) -> dict[str, np.ndarray]:
        C = len(shard.ids[sl])
        valid = toks_np >= 0  # (C, T)
        logits = getattr(out, "logits", None)
        if self.loaded.causal and logits is not None:
            logprob, entropy = token_scores(logits, target)
            logprob, entropy = OnHost(logprob, valid), OnHost(entropy, valid)  # read once the shard is done
        else:
            logprob = np.full(int(valid.sum()), np.nan, dtype=np.float32)
            entropy = logprob.copy()
        ctx = np.broadcast_to(shard.ctx[sl, None], (C, T))
        doc = np.broadcast_to(shard.doc_id[sl, None], (C, T))
        pos = np.broadcast_to(np.arange(T)[None, :], (C, T))
        spans = shard.spans[sl, :T]
        ids = shard.ids[sl, :T]
        return {
            "tok": toks_np[valid], "ctx": ctx[valid], "pos": pos[valid].astype(np.int32), "doc_id": doc[valid],
            "char_start": spans[..., 0][valid], "char_end": spans[..., 1][valid],
            "token_id": ids[valid].astype(np.int32),
            "token": shard.token_text[toks_np[valid] - shard.first_tok], "logprob": logprob, "entropy": entropy,
        }


def unresolved() -> int:
    raise ValueError("compute.batch_size is auto: set the miner's batch_size (batch_fit.fit_batch_size) first")


def frequent_tokens(shards: list[Shard], n: int) -> list[int]:
    """The n most frequent token ids over every mined position of the corpus (ties: smaller id first),
    computed on the driver so every actor groups tokens the same way."""
    counts = np.zeros(0, dtype=np.int64)
    for s in shards:
        grid = s.tok_grid()
        ids = s.ids[:, :grid.shape[1]][grid >= 0]
        c = np.bincount(ids, minlength=len(counts))
        c[:len(counts)] += counts
        counts = c
    order = np.lexsort((np.arange(len(counts)), -counts))
    return [int(i) for i in order[:n] if counts[i] > 0]


def token_group_map(token_groups: list[int], n: int, vocab: int, device: torch.device) -> torch.Tensor:
    """(vocab,) int64: token id -> its rank among the frequent ids, n for every other id."""
    top = max([vocab - 1, *token_groups]) + 1
    m = torch.full((top,), n, dtype=torch.int64)
    m[torch.tensor(token_groups, dtype=torch.int64)] = torch.arange(len(token_groups))
    return m.to(device)


def gate_points(model, points: list[HookPoint]) -> dict[int, tuple[HookPoint, HookPoint]]:
    """layer -> (gate, up) hook points for every hooked mlp.hook_post of a gated MLP."""
    out = {}
    for p in points:
        if p.site != "mlp.hook_post":
            continue
        try:
            gate = resolve_hooks(model, [f"blocks.{p.layer}.mlp.hook_pre"])[0]
            up = resolve_hooks(model, [f"blocks.{p.layer}.mlp.hook_pre_linear"])[0]
        except UserError:
            continue  # not a gated MLP
        out[p.layer] = (gate, up)
    return out


def _concat(parts: list[dict[str, np.ndarray]], shard_index: int) -> pa.Table | None:
    if not parts:
        return None
    cols = {k: np.concatenate([p[k].array() if isinstance(p[k], OnHost) else p[k] for p in parts]) for k in parts[0]}
    n = len(cols["tok"])
    cols["shard"] = np.full(n, shard_index, dtype=np.int32)
    table = pa.table(cols)
    # NaN -> NULL: "unknown" (no next token, or no LM head) reads better in SQL than NaN
    for name in ("logprob", "entropy"):
        arr = table[name].to_numpy()
        table = table.set_column(table.schema.get_field_index(name), name, pa.array(arr, mask=np.isnan(arr)))
    return table
