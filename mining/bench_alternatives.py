"""What a user would do without the miner, on the same batches: the `alternatives` part of `mine bench`.

Each alternative captures every hooked MLP activation at the mined positions (float16, as a notebook
keeps them) and then computes what the miner keeps: top/bottom-k with their token index, histograms on
the miner's bins (bucketize + bincount), float64 moments (not the top contexts, so each does a little
less than the miner). Capture and reduction are timed together; deleting the cache is not.

    cache_to_disk     plain PyTorch forward hooks -> one safetensors file per batch -> reduce
    nnsight_to_disk   an nnsight trace saving each activation -> the same files -> reduce
    transformer_lens  TransformerLens' run_with_cache (TransformerBridge) -> kept in memory -> reduce

nnsight and TransformerLens are not dependencies of the miner (`pip install -e .[alternatives]`): where
one is not installed, or cannot run the model, the report says so instead of a figure. Both rewire the
model they are given (nnsight patches module forwards, the bridge swaps in its own blocks and eager
attention), so each gets its own copy and the variants timed next to them keep the original.
"""

from __future__ import annotations

import copy
import importlib.util
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import hooks
from .architectures import IN
from .bench import iter_batches
from .hooks import HookPoint
from .reducers import HistogramBins

Capture = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]
"""(ids, attention, mask) -> hook name -> (M, N) float16 host copy of the activations at the M mined positions."""

ALTERNATIVES = ("cache_to_disk", "nnsight_to_disk", "transformer_lens")
LIBRARIES = {"nnsight_to_disk": ("nnsight", "nnsight"), "transformer_lens": ("transformer_lens", "transformer-lens")}
"""alternative -> (module, PyPI package) it needs."""


def alternative_runners(loaded, points: list[HookPoint], k: int, bins: HistogramBins, batch_size: int,
                        scratch: str) -> tuple[dict[str, Callable[[list], dict[str, Any]]], dict[str, dict[str, str]]]:
    """The alternatives that can run here (shards -> details), and those that cannot, each with why."""
    captures: dict[str, Capture] = {"cache_to_disk": hook_capture(loaded.model, points)}
    skipped: dict[str, dict[str, str]] = {}
    for name, (module, package) in LIBRARIES.items():
        if importlib.util.find_spec(module) is None:
            skipped[name] = {"skipped": f"{module} is not installed; not a dependency of the miner "
                                       f"(`pip install -e .[alternatives]` or `pip install {package}`)"}
            continue
        try:
            capture = {"nnsight_to_disk": nnsight_capture, "transformer_lens": transformer_lens_capture}[name](loaded, points)
            _probe(capture, loaded)
        except Exception as e:  # noqa: BLE001 - a library we do not depend on: report, never fail the bench
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            skipped[name] = {"skipped": f"{module} could not run this model: {type(e).__name__}: {first}"}
            continue
        captures[name] = capture
    names = [p.name for p in points]
    runs = {}
    for name, capture in captures.items():
        if name == "transformer_lens":
            runs[name] = lambda shards, c=capture: keep_then_reduce(c, loaded, shards, batch_size, names, k, bins)[0]
        else:
            runs[name] = lambda shards, c=capture: cache_then_reduce(c, loaded, shards, batch_size, names, k, bins,
                                                                     scratch)[0]
    return runs, skipped


def _probe(capture: Capture, loaded) -> None:
    """One small batch, so that a library that cannot run this model is reported before the timed rounds."""
    ids = torch.zeros((1, 4), dtype=torch.long, device=loaded.device)
    with torch.inference_mode():
        capture(ids, torch.ones_like(ids), torch.ones_like(ids, dtype=torch.bool))


# ---------------------------------------------------------------- captures


def hook_capture(model: torch.nn.Module, points: list[HookPoint]) -> Capture:
    """Plain forward (pre-)hooks on the model's own modules (the miner's `hooks.capture`), for the batch only."""

    def capture(ids: torch.Tensor, attention: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        saved: dict[str, torch.Tensor] = {}

        def keep(point: HookPoint, x: torch.Tensor) -> None:
            saved[point.name] = x[mask].to(torch.float16).cpu()

        with hooks.capture(model, points, keep):
            model(input_ids=ids, attention_mask=attention)
        return saved

    return capture


def nnsight_capture(loaded, points: list[HookPoint]) -> Capture:
    """An nnsight trace that saves every hooked module's input (or output), as its tutorials do."""
    from nnsight import NNsight

    wrapped = NNsight(copy.deepcopy(loaded.model))

    def envoy(path: str):
        node = wrapped
        for part in path.split("."):
            node = node[int(part)] if part.isdigit() else getattr(node, part)
        return node

    envoys = [(p, envoy(p.module_path), p.direction == IN) for p in points]

    def capture(ids: torch.Tensor, attention: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        saved: dict[str, torch.Tensor] = {}
        with wrapped.trace(input_ids=ids, attention_mask=attention):  # nnsight runs this body itself: no comprehensions
            for p, e, pre in envoys:
                saved[p.name] = (e.input if pre else e.output).save()
        by_name = {p.name: p for p, _, _ in envoys}  # saved as the modules gave them: shaped as the hooks shape them
        return {name: hooks.as_btw(by_name[name], x, mask.shape)[mask].to(torch.float16).cpu()
                for name, x in saved.items()}

    return capture


def transformer_lens_capture(loaded, points: list[HookPoint]) -> Capture:
    """TransformerLens' run_with_cache on a TransformerBridge around a copy of the model (TransformerLens >= 4:
    HookedTransformer is gone, and the bridge names its hooks as this project does)."""
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(loaded.source.id, hf_model=copy.deepcopy(loaded.model),
                                                 tokenizer=loaded.tokenizer, device=str(loaded.device),
                                                 dtype=loaded.dtype)
    wanted = {p.name for p in points}

    def capture(ids: torch.Tensor, attention: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        _, cache = bridge.run_with_cache(ids, attention_mask=attention, names_filter=lambda n: n in wanted)
        missing = wanted - set(cache.keys())
        if missing:
            raise KeyError(f"no TransformerLens hook named {sorted(missing)[0]}")
        return {name: cache[name][mask].to(torch.float16).cpu() for name in wanted}

    return capture


# ---------------------------------------------------------------- capture, then reduce


def cache_then_reduce(capture: Capture, loaded, shards, batch_size: int, names: list[str], k: int,
                      bins: HistogramBins, scratch: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every batch's activations to a safetensors file, then each layer read back and reduced.
    Returns (timings and cache size, the reduction)."""
    import safetensors.torch

    folder = Path(tempfile.mkdtemp(prefix="cache-", dir=scratch))
    try:
        start = time.perf_counter()
        files = []
        with torch.inference_mode():
            for i, (ids, attention, toks) in enumerate(iter_batches(shards, batch_size, loaded.device)):
                mask = toks >= 0
                saved = {"tok": toks[mask].cpu(), **capture(ids, attention, mask)}
                files.append(folder / f"batch-{i:05d}.safetensors")
                safetensors.torch.save_file(saved, str(files[-1]))
        cached = time.perf_counter()
        reduced = reduce_cache(files, names, k, bins)
        done = time.perf_counter()
        size = sum(f.stat().st_size for f in files)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {"capture_s": cached - start, "reduce_s": done - cached, "cache_bytes": size}, reduced


def keep_then_reduce(capture: Capture, loaded, shards, batch_size: int, names: list[str], k: int,
                     bins: HistogramBins) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every batch's activations kept in host memory (a notebook's list of caches), then reduced.
    Returns (timings and cache size, the reduction)."""
    kept: dict[str, list[torch.Tensor]] = {name: [] for name in ["tok", *names]}
    start = time.perf_counter()
    with torch.inference_mode():
        for ids, attention, toks in iter_batches(shards, batch_size, loaded.device):
            mask = toks >= 0
            kept["tok"].append(toks[mask].cpu())
            for name, x in capture(ids, attention, mask).items():
                kept[name].append(x)
    cached = time.perf_counter()
    reduced = reduce_columns(lambda name: torch.cat(kept[name]), names, k, bins)
    done = time.perf_counter()
    size = sum(t.numel() * t.element_size() for name in names for t in kept[name])
    return {"capture_s": cached - start, "reduce_s": done - cached, "cache_bytes": size}, reduced


def reduce_cache(files: list[Path], names: list[str], k: int, bins: HistogramBins) -> dict[str, Any]:
    """Per layer: load every batch's (M, N) block from its file, then reduce it."""
    from safetensors import safe_open

    def column(name: str) -> torch.Tensor:
        parts = []
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                parts.append(st.get_tensor(name))
        return torch.cat(parts)

    return reduce_columns(column, names, k, bins)


def reduce_columns(column: Callable[[str], torch.Tensor], names: list[str], k: int,
                   bins: HistogramBins) -> dict[str, Any]:
    """column(name): every mined position's (n, N) activations of a hook (or "tok": their (n,) token index).
    Per hook: top/bottom-k, histogram counts on the miner's bins and float64 moments."""
    tok = column("tok")  # (n,)
    lo, _ = bins.edges()
    boundaries = torch.from_numpy(lo[1:]).float()  # bin b holds lo[b] <= x < lo[b + 1]
    out = {}
    for name in names:
        x = column(name).float()  # (n, N)
        n, N = x.shape
        kk = min(k, n)
        top_v, top_i = torch.topk(x, kk, dim=0)
        bot_v, bot_i = torch.topk(x, kk, dim=0, largest=False)
        idx = torch.bucketize(x, boundaries, right=True) + torch.arange(N) * bins.n_bins
        counts = torch.bincount(idx.flatten(), minlength=N * bins.n_bins).view(N, bins.n_bins)
        x64 = x.double()
        mean = x64.mean(0)
        c = x64 - mean
        var = (c * c).mean(0)
        std = var.sqrt()
        skew = (c ** 3).mean(0) / std ** 3
        kurt = (c ** 4).mean(0) / var ** 2 - 3
        out[name] = {"top": (top_v, tok[top_i]), "bottom": (bot_v, tok[bot_i]), "histogram": counts,
                     "moments": (mean, std, skew, kurt, (x > 0).double().mean(0), x.min(0).values, x.max(0).values)}
    return out
