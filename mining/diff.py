"""Two models over the same tokens in one pass (`models: {a: ..., b: ...}`): what changed, and where.

Per batch model A runs with its hooks keeping the mined positions' activations, then model B runs
and each hook's (A, B) pair feeds the paired reducers:

    pair         correlation of A's and B's activations, mean |B - A|        -> neuron_diff
    diff_top/bottom  tokens where B - A is largest / smallest                -> neuron_diff_examples
    top, top_b   each model's top-k (changed max-activating examples)        -> diff_top_examples
    cross        A x B cross-correlation of a layer (stats.neuron_match)     -> neuron_match
    dla_moments(_b)  each model's mean direct logit attribution (stats.dla)  -> dla_diff (neurons, and
                 SAE latents whose decoder writes the stream: through each model's own output projections and
                 norms), and per head (attn.hook_z through each head's W_O slice) -> head_dla_diff

The token rows carry both models' log-prob of the actual next token (`token_diff` view). The
weights are compared on an actor after mining (`weight_diff_tables`).

Models of different sizes (other widths or depths) have no neuron-by-neuron pairs; with
`stats.neuron_match` alone, each hooked layer of A is matched against B's layer at the same relative
depth (`matched_layer`) and only the cross-correlation is kept -> neuron_match (layer_b: B's layer).
"""

from __future__ import annotations

import functools
import os
import re
import time

import numpy as np
import pyarrow as pa
import torch

from contextlib import nullcontext
from typing import Mapping

from .dla import DirectLogitAttribution, DlaBatch
from .batch import OnHost, make_batch, mined_rows, token_scores
from .engine import HookStats, ShardMiner, ShardResult, _concat, unresolved
from .errors import UserError
from .hooks import available_sites, capture, mlp_out_weight, n_layers, resolve_hooks
from .models import LoadedModel
from .reducers import Moments, TopK
from .reducers.pair import CrossMoments, PairMoments
from .sae import SAE, SUFFIX
from .shards import Shard
from .spec import JobSpec, ModelSpec


def same_tokenizer(a, b) -> bool:
    return a.get_vocab() == b.get_vocab() and a.all_special_ids == b.all_special_ids


def diff_stats(spec: JobSpec, dla: bool) -> HookStats:
    k = spec.stats.top_k
    return HookStats(top=TopK(k), top_b=TopK(k), pair=PairMoments(), diff_top=TopK(k, largest=True),
                     diff_bottom=TopK(k, largest=False),
                     cross=CrossMoments() if spec.stats.neuron_match else None,
                     dla_moments=Moments() if dla else None, dla_moments_b=Moments() if dla else None)


class DiffMiner(ShardMiner):
    """ShardMiner's batching and token rows for model A, plus model B through the same hooks."""

    def __init__(self, spec: JobSpec, loaded_a: LoadedModel, loaded_b: LoadedModel):
        super().__init__(spec, loaded_a)
        self.loaded_b = loaded_b
        self.dla_b = DirectLogitAttribution(loaded_b.model) if self.dla else None
        if not same_tokenizer(loaded_a.tokenizer, loaded_b.tokenizer):
            raise UserError("models.a and models.b tokenize differently; a diff compares the same tokens, "
                            "so both need the same tokenizer")
        # B's point for each of A's: the same name, or for models of other sizes the same site at the same depth
        self.cross_size = bool(spec.hooks) and structure_difference(self.points, n_layers(loaded_a.model),
                                                                    loaded_b.model, spec.hooks) is not None
        pairs = paired_points(self.points, n_layers(loaded_a.model), loaded_b.model, self.cross_size, self.saes)
        self.partners: dict[str, list[str]] = {}
        for pa_, pb in pairs:
            self.partners.setdefault(pb.name, []).append(pa_.name)
        self.points_b = {pb.name: pb for _, pb in pairs}
        self.latent_dla_b: dict[str, tuple[torch.Tensor, str]] = {}
        """latent_dla's for B: the same decoder rows, through B's output projections and norms."""
        if self.latent_dla:
            from .analyses.logit_lens import latent_writes

            self.latent_dla_b = {pb.name: latent_writes(loaded_b.model, pb) for pa_, pb in pairs
                                 if pa_.name in self.latent_dla}
        # with dla: each head's direct logit attribution too, read at attn.hook_z through its W_O slice
        self.heads_a = resolve_hooks(loaded_a.model, ["blocks.*.attn.hook_z"]) if self.dla else []
        self.heads_b = resolve_hooks(loaded_b.model, ["blocks.*.attn.hook_z"]) if self.dla else []
        self.w_o = {(side, p.name): _feature_rows(m.model, p).float()
                    for side, m, pts in (("a", loaded_a, self.heads_a), ("b", loaded_b, self.heads_b)) for p in pts}
        if self.cross_size and (self.dla or not spec.stats.neuron_match):
            raise UserError("hooks: models.a and models.b differ in size; only stats.neuron_match pairs their "
                            "neurons (by correlation, at the same relative depth)")

    @torch.inference_mode()
    def mine(self, shard: Shard) -> ShardResult:
        start = time.perf_counter()
        dev = self.loaded.device
        stats = {p.name: HookStats(cross=CrossMoments()) if self.cross_size else
                 diff_stats(self.spec, p.name in self.dla_points or p.name in self.latent_dla) for p in self.points}
        stats.update({p.name: HookStats(dla_moments=Moments(), dla_moments_b=Moments()) for p in self.heads_a})
        paired = {p.name for p in self.points}
        token_parts = []
        tok_grid = shard.tok_grid()
        B = self.batch_size or unresolved()
        for lo in range(0, len(shard.ids), B):
            batch = make_batch(shard, slice(lo, lo + B), tok_grid, dev)
            sl, T, ids, attention = batch.sl, batch.T, batch.ids, batch.attention
            toks_np, targets_np, rows, flat_toks = batch.toks_np, batch.targets_np, batch.rows, batch.flat_toks
            acts: dict[str, torch.Tensor] = {}
            dla_a = DlaBatch(self.dla, batch) if self.dla else None
            dla_b = DlaBatch(self.dla_b, batch) if self.dla else None

            def keep_a(point, x: torch.Tensor) -> None:
                if point.site == "attn.hook_z":
                    values = _head_dla(dla_a, point, x, self.w_o["a", point.name])
                    dla_a.keep_raw(point.name, "attn", point.layer, values)
                    return
                acts[point.name] = mined_rows(x, rows).float()
                if dla_a is not None and point.name in self.dla_points:
                    dla_a.gain(point, x)
                if dla_a is not None and point.name in self.latent_dla:
                    dla_a.latent_gain(point, x, *self.latent_dla[point.name])

            def pair_b(point, x: torch.Tensor) -> None:
                if point.site == "attn.hook_z":
                    values = _head_dla(dla_b, point, x, self.w_o["b", point.name])
                    dla_b.keep_raw(point.name, "attn", point.layer, values)
                    return
                partners = [a for a in self.partners.get(point.name, ()) if a in acts]
                if partners:
                    b = mined_rows(x, rows).float()
                    for a in partners:
                        _update_pair(stats[a], acts.pop(a), b, flat_toks)
                if dla_b is not None and point.name in self.dla_points:
                    dla_b.gain(point, x)
                if dla_b is not None and point.name in self.latent_dla_b:
                    dla_b.latent_gain(point, x, *self.latent_dla_b[point.name])

            with capture(self.loaded.model, self.points + [p for p in self.heads_a if p.name not in paired], keep_a), \
                    (dla_a.watch_norm() if dla_a else nullcontext()):
                out_a = self.loaded.model(input_ids=ids, attention_mask=attention)
            points_b = list(self.points_b.values()) + [p for p in self.heads_b if p.name not in paired]
            with capture(self.loaded_b.model, points_b, pair_b), (dla_b.watch_norm() if dla_b else nullcontext()):
                mask_b = None if attention is None else attention.to(self.loaded_b.device)
                out_b = self.loaded_b.model(input_ids=ids.to(self.loaded_b.device), attention_mask=mask_b)
            if dla_a is not None:
                fb = dict(dla_b.finish())
                for name, va in dla_a.finish():
                    stats[name].dla_moments.update(va)
                    stats[name].dla_moments_b.update(fb[name])
            rows = self._token_rows(shard, sl, T, out_a, toks_np, targets_np)
            rows["logprob_b"] = OnHost(token_scores(out_b.logits, targets_np)[0], toks_np >= 0)
            token_parts.append(rows)
        result = ShardResult(shard.index, stats, _concat(token_parts, shard.index), n_tokens=shard.n_tokens)
        result.seconds = time.perf_counter() - start
        return result


def pattern_keys(points: list) -> int | None:
    """The context length A's attention patterns were resolved with: B's take the same."""
    return next((p.n_ctx for p in points if p.n_ctx), None)


def structure_difference(points_a: list, n_a: int, model_b: torch.nn.Module, hooks) -> str | None:
    """How B differs from A (n_a layers) where the hooks are, or None when B has A's depth and every hooked point
    of A at the same width (model_b may be on the meta device). Otherwise they are models of other sizes, which
    only neuron_match pairs. An SAE's latents compare at the site the SAE reads (B's latents are the same SAE's)."""
    n_b = n_layers(model_b)
    if n_b != n_a:
        return f"models.a has {n_a} layers and models.b {n_b}"
    sites = {p.name.removesuffix(SUFFIX): p.sae.d_in if p.sae else p.width for p in points_a}
    widths_b = {q.name: q.width for q in resolve_hooks(model_b, sorted(sites), pattern_keys(points_a))}
    for name, width in sites.items():
        if widths_b.get(name) != width:
            return (f"{name} differs between models.a and models.b "
                    f"({width} vs {widths_b.get(name, 'no such hook')} features)")
    return None


def check_same_structure(points_a: list, n_a: int, model_b: torch.nn.Module, hooks) -> None:
    """One line saying how B differs and the ways out, unless the two have the same structure."""
    problem = structure_difference(points_a, n_a, model_b, hooks)
    if problem:
        raise UserError(f"hooks: {problem}: a neuron diff needs the same structure; with `hooks: []` the job "
                        "compares models of any size token by token (token-gains, doc-diff), and with "
                        "`stats: {neuron_match: true}` alone it matches each A neuron to its best-correlated B "
                        "neuron at the same relative depth")


CROSS_MEMORY_FRACTION = 0.25
"""stats.neuron_match's state may take this much of the machine's memory: an actor holds one per shard it mines, and
the driver two while it merges them (plus the correlations it finalizes, layer by layer)."""


def machine_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_cross_memory(pairs: list) -> None:
    """Refuse a neuron_match whose state would not fit: a float64 co-moment of every A neuron with every B neuron of
    its matched layer, per hooked layer (SmolLM2 against itself, all 30 MLP layers: 0.53 GiB)."""
    need = sum(8 * pa_.width * pb.width for pa_, pb in pairs)
    memory = machine_memory()
    if need > CROSS_MEMORY_FRACTION * memory:
        pa_, pb = max(pairs, key=lambda p: p[0].width * p[1].width)
        raise UserError(f"stats.neuron_match: its state is a float64 co-moment of every A neuron with every B neuron "
                        f"of the matched layer ({pa_.width} x {pb.width} at {pa_.name}), {need / 2**30:.1f} GiB for "
                        f"the {len(pairs)} hooked layers: more than a quarter of this machine's "
                        f"{memory / 2**30:.0f} GiB; hook fewer layers (e.g. hooks: [\"{pa_.name}\"])")


def matched_layer(layer: int, n_a: int, n_b: int) -> int:
    """B's layer at the relative depth of A's `layer`: first to first, last to last, the rest rounded between."""
    return 0 if n_a <= 1 else round(layer * (n_b - 1) / (n_a - 1))


def paired_points(points_a: list, n_a: int, model_b: torch.nn.Module, cross_size: bool,
                  saes: Mapping[str, SAE] | None = None) -> list:
    """(A point, B point) for every A point: B's of the same name, or (cross_size) of the same site at the matched
    layer (A has n_a layers). saes: the job's, which B's latents are read with too. model_b may be a meta-device
    model (validation)."""
    if not points_a:
        return []

    n_b = n_layers(model_b)
    names = {p.name: f"blocks.{matched_layer(p.layer, n_a, n_b) if cross_size else p.layer}.{p.site}"
             for p in points_a}
    by_name = {q.name: q for q in resolve_hooks(model_b, sorted(set(names.values())), pattern_keys(points_a), saes)}
    return [(p, by_name[names[p.name]]) for p in points_a]


def _head_dla(dla: DlaBatch, point, z: torch.Tensor, w_o: torch.Tensor) -> torch.Tensor:
    """(M, heads): each head's output z_h through its W_O slice, dotted with the target's direction
    (divided by the final norm's scale, and the attention output norm's where there is one, in DlaBatch.finish)."""
    zs = mined_rows(z, dla.sel, torch.float32)  # (M, H * dh)
    g = dla.per_position(dla.dla.head_directions(point.layer, dla.directions) @ w_o.T)  # (M, H * dh): W_O^T d_t
    return (zs * g).unflatten(-1, (point.n_heads, point.d_head)).sum(-1)


def head_dla_table(st: HookStats, layer: int) -> pa.Table:
    ma, mb = st.dla_moments.finalize(), st.dla_moments_b.finalize()
    n = len(ma["mean"])
    return pa.table({"layer": np.full(n, layer, np.int32), "head": np.arange(n, dtype=np.int32),
                     "mean_dla_a": ma["mean"], "mean_dla_b": mb["mean"], "diff": mb["mean"] - ma["mean"],
                     "count": np.asarray(ma["count"], np.int64)})


def _update_pair(st: HookStats, a: torch.Tensor, b: torch.Tensor, toks: torch.Tensor) -> None:
    if st.pair is None:  # models of other sizes: the cross-correlation only
        st.cross.update(a, b)
        return
    st.top.update(a, toks, check=False)
    st.top_b.update(b, toks, check=False)
    st.pair.update(a, b)
    delta = b - a
    st.diff_top.update(delta, toks, check=False)
    st.diff_bottom.update(delta, toks, check=False)
    if st.cross is not None:
        st.cross.update(a, b)


# ---------------------------------------------------------------- tables at merge


def diff_hook_tables(st: HookStats, site: str, layer: int) -> dict[str, pa.Table]:
    """neuron_diff, neuron_diff_examples, diff_top_examples, neuron_match for one hook."""
    from .merge import examples_table

    p = st.pair.finalize()
    n = len(p["corr"])
    top_a, top_b = st.top.finalize()[1].cpu().numpy(), st.top_b.finalize()[1].cpu().numpy()  # (k, N) toks
    overlap = np.array([len(set(top_a[:, j][top_a[:, j] >= 0]) & set(top_b[:, j][top_b[:, j] >= 0]))
                        / max(1, int((top_a[:, j] >= 0).sum())) for j in range(n)])
    key = {"hook": pa.array([site] * n), "layer": np.full(n, layer, np.int32), "neuron": np.arange(n, dtype=np.int32)}
    out = {"neuron_diff": pa.table({**key, "corr": p["corr"], "mean_abs_diff": p["mean_abs_diff"],
                                    "mean_a": p["mean_a"], "mean_b": p["mean_b"], "std_a": p["std_a"],
                                    "std_b": p["std_b"], "top_overlap": overlap})}
    parts = []
    for sign, r in (("b_above_a", st.diff_top), ("a_above_b", st.diff_bottom)):
        t = examples_table(*r.finalize(), site, layer)
        t = t.add_column(3, "sign", pa.array([sign] * t.num_rows))
        parts.append(t.rename_columns(["diff" if c == "value" else c for c in t.column_names]))
    out["neuron_diff_examples"] = pa.concat_tables(parts)
    tops = []
    for model, r in (("a", st.top), ("b", st.top_b)):
        t = examples_table(*r.finalize(), site, layer)
        tops.append(t.add_column(3, "model", pa.array([model] * t.num_rows)))
    out["diff_top_examples"] = pa.concat_tables(tops)
    if st.dla_moments is not None:
        ma, mb = st.dla_moments.finalize(), st.dla_moments_b.finalize()
        out["dla_diff"] = pa.table({**key,
                                    "mean_dla_a": ma["mean"], "mean_dla_b": mb["mean"],
                                    "diff": mb["mean"] - ma["mean"], "count": np.asarray(ma["count"], np.int64)})
    if st.cross is not None:
        best, corr = st.cross.best_match()
        out["neuron_match"] = pa.table({"hook": pa.array([site] * n), "layer_a": np.full(n, layer, np.int32),
                                        "neuron_a": np.arange(n, dtype=np.int32),
                                        "layer_b": np.full(n, layer, np.int32), "neuron_b": best.astype(np.int32),
                                        "corr": corr, "self_corr": p["corr"]})
    return out


def cross_match_table(st: HookStats, site: str, layer: int, spec: JobSpec) -> pa.Table:
    """neuron_match of models of other sizes: each A neuron's best-correlated neuron in B's matched layer."""
    best, corr = st.cross.best_match()
    n = len(best)
    n_a, n_b = (_n_layers(spec.models[side]) for side in ("a", "b"))
    return pa.table({"hook": pa.array([site] * n), "layer_a": np.full(n, layer, np.int32),
                     "neuron_a": np.arange(n, dtype=np.int32),
                     "layer_b": np.full(n, matched_layer(layer, n_a, n_b), np.int32),
                     "neuron_b": best.astype(np.int32), "corr": corr,
                     "self_corr": pa.nulls(n, pa.float64())})


@functools.lru_cache(maxsize=8)
def _n_layers(model: "ModelSpec") -> int:
    from .models import load_config
    from .runner import meta_model

    return n_layers(meta_model(load_config(model)))


# ---------------------------------------------------------------- weights

LAYER = re.compile(r"\.(\d+)\.")


def weight_diff_tables(a: torch.nn.Module, b: torch.nn.Module) -> dict[str, pa.Table]:
    """weight_diff(param, layer, rel_norm, norm_a): per parameter tensor ||B - A|| / ||A||;
    neuron_weight_diff(layer, neuron, in_norm, out_norm, in_rel, out_rel): the change of each MLP
    neuron's input rows (gate and up for gated MLPs) and output column; head_weight_diff(layer, head,
    out_norm, out_rel): the change of each head's slice of the attention output projection."""
    pb = dict(b.named_parameters())
    rows = []
    for name, wa in a.named_parameters():
        wb = pb.get(name)
        if wb is None or wb.shape != wa.shape:
            continue
        na = float(wa.detach().double().norm())
        delta = float((wb.detach().double() - wa.detach().double()).norm())
        m = LAYER.search(name)
        rows.append({"param": name, "layer": int(m.group(1)) if m else -1,
                     "rel_norm": delta / na if na > 0 else float("nan"), "norm_a": na})
    if not rows:  # models of different sizes, diffed token by token: no weight to compare
        return {}
    return {"weight_diff": pa.Table.from_pylist(rows), "neuron_weight_diff": _neuron_weights(a, b),
            "head_weight_diff": _head_weights(a, b)}


def _shared_layers(a: torch.nn.Module, b: torch.nn.Module, site: str) -> list:
    """The hook points of `site` at the layers where A and B have the same width (a deeper B: A's layers)."""
    from .architectures import arch_of, locate

    if any(site not in available_sites(m) for m in (a, b)):
        return []  # a mixture of experts has no mlp.hook_post
    n = min(len(locate(m, arch_of(m))[1]) for m in (a, b))
    on_a, on_b = (resolve_hooks(m, [f"blocks.{layer}.{site}" for layer in range(n)]) for m in (a, b))
    return [p for p, q in zip(on_a, on_b) if (p.width, p.n_heads, p.d_head) == (q.width, q.n_heads, q.d_head)]


def _feature_rows(model: torch.nn.Module, point) -> torch.Tensor:
    """The weight of the module a hook sits on, as (features of the hook, the other side), float64.
    nn.Linear stores (out, in), GPT-2's Conv1D (in, out); a pre-hook sees the module's input side."""
    module = model.get_submodule(point.module_path)
    w = module.weight.detach().double()
    linear = isinstance(module, torch.nn.Linear)
    rows = (w.T if linear else w) if point.direction == "input" else (w if linear else w.T)
    if point.chunk is None:
        return rows
    i = point.chunk[0]  # a fused projection's slice (Phi-3's gate, up): its own rows
    return rows[i * point.width:(i + 1) * point.width]


NEURON_WEIGHTS = pa.schema([("layer", pa.int32()), ("neuron", pa.int32()), ("in_norm", pa.float64()),
                            ("out_norm", pa.float64()), ("in_rel", pa.float64()), ("out_rel", pa.float64())])
HEAD_WEIGHTS = pa.schema([("layer", pa.int64()), ("head", pa.int64()), ("out_norm", pa.float64()),
                          ("out_rel", pa.float64())])


def _neuron_weights(a: torch.nn.Module, b: torch.nn.Module) -> pa.Table:
    parts = [NEURON_WEIGHTS.empty_table()]
    for post in _shared_layers(a, b, "mlp.hook_post"):
        layer = post.layer
        wo_a, wo_b = (mlp_out_weight(m, layer).detach().double() for m in (a, b))  # (N, d)
        if wo_a.shape != wo_b.shape:
            continue
        out_norm = (wo_b - wo_a).norm(dim=1)
        out_rel = out_norm / wo_a.norm(dim=1).clamp(min=1e-30)
        in_sq, in_base = torch.zeros_like(out_norm), torch.zeros_like(out_norm)
        for site in ("mlp.hook_pre", "mlp.hook_pre_linear"):
            try:
                point = resolve_hooks(a, [f"blocks.{layer}.{site}"])[0]
            except UserError:
                continue  # not a gated MLP: no separate up projection
            wa, wb = _feature_rows(a, point), _feature_rows(b, point)  # (N, d)
            if wa.shape != wb.shape:
                continue
            in_sq += ((wb - wa) ** 2).sum(1)
            in_base += (wa ** 2).sum(1)
        n = post.width
        parts.append(pa.table({"layer": np.full(n, layer, np.int32), "neuron": np.arange(n, dtype=np.int32),
                               "in_norm": in_sq.sqrt().numpy(), "out_norm": out_norm.numpy(),
                               "in_rel": (in_sq.sqrt() / in_base.sqrt().clamp(min=1e-30)).numpy(),
                               "out_rel": out_rel.numpy()}))
    return pa.concat_tables(parts)


def _head_weights(a: torch.nn.Module, b: torch.nn.Module) -> pa.Table:
    rows = []
    for point in _shared_layers(a, b, "attn.hook_z"):
        layer = point.layer
        wa, wb = _feature_rows(a, point), _feature_rows(b, point)  # (H * dh, d)
        if wa.shape != wb.shape:
            continue
        for h in range(point.n_heads):
            sl = slice(h * point.d_head, (h + 1) * point.d_head)
            delta = float((wb[sl] - wa[sl]).norm())
            base = float(wa[sl].norm())
            rows.append({"layer": layer, "head": h, "out_norm": delta, "out_rel": delta / base if base else float("nan")})
    return pa.Table.from_pylist(rows, schema=HEAD_WEIGHTS)
