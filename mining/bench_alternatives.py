"""What a user would do without the miner, on the same batches: the `alternatives` part of `mine bench`.

`cache_then_reduce` is the usual notebook: plain PyTorch forward hooks copy every MLP activation
(float16, mined positions only) to disk, one safetensors file per batch; a second pass loads each
layer back and computes what the miner keeps — top/bottom-k with their token index, histograms on
the miner's bins (bucketize + bincount), float64 moments (not the top contexts, so it does a little
less than the miner). Both passes are timed together; deleting the cache is not.

nnsight and TransformerLens are measured only when importable (they are not dependencies of this
project): a forward that captures every MLP activation, with no reduction at all — a lower bound
on what a full pipeline built on them would cost.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .architectures import IN
from .bench import iter_batches
from .hooks import HookPoint
from .reducers import HistogramBins


def cache_then_reduce(loaded, shards, batch_size: int, points: list[HookPoint], k: int, bins: HistogramBins,
                      scratch: str) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="cache-", dir=scratch))
    try:
        start = time.perf_counter()
        files = write_cache(loaded, shards, batch_size, points, folder)
        cached = time.perf_counter()
        reduce_cache(files, [p.name for p in points], k, bins)
        done = time.perf_counter()
        size = sum(f.stat().st_size for f in files)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {"forward_write_s": cached - start, "reduce_s": done - cached, "cache_bytes": size}


def write_cache(loaded, shards, batch_size: int, points: list[HookPoint], folder: Path) -> list[Path]:
    import safetensors.torch

    model = loaded.model
    saved: dict[str, torch.Tensor] = {}
    mask: torch.Tensor | None = None

    def keep(name: str, x: torch.Tensor) -> None:
        saved[name] = x[mask].to(torch.float16).cpu()  # (M, N): mined positions only

    handles = []
    for p in points:
        module = model.get_submodule(p.module_path)
        if p.direction == IN:
            handles.append(module.register_forward_pre_hook(
                lambda m, args, kwargs, name=p.name: keep(name, args[0] if args else kwargs["hidden_states"]),
                with_kwargs=True))
        else:
            handles.append(module.register_forward_hook(
                lambda m, args, out, name=p.name: keep(name, out[0] if isinstance(out, tuple) else out)))
    files = []
    try:
        with torch.inference_mode():
            for i, (ids, attention, toks) in enumerate(iter_batches(shards, batch_size, loaded.device)):
                mask = toks >= 0
                saved.clear()
                saved["tok"] = toks[mask].cpu()
                model(input_ids=ids, attention_mask=attention)
                path = folder / f"batch-{i:05d}.safetensors"
                safetensors.torch.save_file(saved, str(path))
                files.append(path)
    finally:
        for h in handles:
            h.remove()
    return files


def reduce_cache(files: list[Path], names: list[str], k: int, bins: HistogramBins) -> dict[str, Any]:
    """Per layer: load every batch's (M, N) block, then top/bottom-k, histogram counts and moments."""
    from safetensors import safe_open

    def column(name: str) -> torch.Tensor:
        parts = []
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                parts.append(st.get_tensor(name))
        return torch.cat(parts)

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


# ---------------------------------------------------------------- libraries, when installed

LIBRARIES = {"nnsight": "nnsight", "transformer_lens": "transformer-lens"}


def library_alternatives(loaded, shards, warm, batch_size: int, n_tokens: int, bare: float) -> dict[str, Any]:
    out = {}
    for module, package in LIBRARIES.items():
        if importlib.util.find_spec(module) is None:
            out[module] = {"skipped": f"not installed; not a dependency of this project "
                                      f"(`pip install {package}` to include it)"}
            continue
        try:
            run = {"nnsight": _nnsight, "transformer_lens": _transformer_lens}[module](loaded)
            run([warm], batch_size)
            start = time.perf_counter()
            run(shards, batch_size)
            rate = n_tokens / (time.perf_counter() - start)
            out[module] = {"tokens_per_s": rate, "ratio": rate / bare,
                           "what": "forward capturing every MLP activation, no reduction (a lower bound)"}
        except Exception as e:  # noqa: BLE001 - a library we do not depend on: report, never fail the bench
            out[module] = {"skipped": f"{module} could not run this model: {type(e).__name__}: "
                                      f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"}
    return out


def _nnsight(loaded):
    from nnsight import NNsight

    from .hooks import resolve_hooks

    wrapped = NNsight(loaded.model)
    points = resolve_hooks(loaded.model, ["blocks.*.mlp.hook_post"])

    def envoy(path: str):
        node = wrapped
        for part in path.split("."):
            node = node[int(part)] if part.isdigit() else getattr(node, part)
        return node

    def run(shards, batch_size: int) -> None:
        with torch.inference_mode():
            for ids, attention, _ in iter_batches(shards, batch_size, loaded.device):
                with wrapped.trace(input_ids=ids, attention_mask=attention):
                    for p in points:
                        e = envoy(p.module_path)
                        (e.input if p.direction == IN else e.output).save()

    return run


def _transformer_lens(loaded):
    from transformer_lens import HookedTransformer

    name = getattr(loaded.model.config, "_name_or_path", "")
    model = HookedTransformer.from_pretrained(name, hf_model=loaded.model, tokenizer=loaded.tokenizer,
                                              device=str(loaded.device), dtype=loaded.dtype)

    def run(shards, batch_size: int) -> None:
        with torch.inference_mode():
            for ids, attention, _ in iter_batches(shards, batch_size, loaded.device):
                model.run_with_cache(ids, attention_mask=attention, names_filter=lambda n: n.endswith("mlp.hook_post"))

    return run

