"""`mine bench`: what mining costs next to the bare forward pass, and what the store and its queries cost.

One invocation measures, on the same model, corpus slice (planned by the normal spec/plan path),
batches, dtype and device — each a `--parts` name:

    forward       the bare forward pass (model + LM head, no hooks, inference mode): the baseline
    mining        ShardMiner.mine — the code the actors run — in-process, without Ray: top/bottom-k,
                  top contexts, histograms and moments of every blocks.*.mlp.hook_post neuron
    dla           the same + direct logit attribution
    kernels       mining again with the reducers' numba kernels off (MINING_KERNELS=torch): what they buy
    tokens        the same + the token table (log-prob, entropy)
    dense         the same + a dense float16 copy of the middle layer for every token
    patterns      mining + every layer's attn.hook_pattern (heads x context keys a token; eager attention)
    sae           mining + the latents of an 8x top-k SAE on every layer's residual stream (random weights)
    alternatives  what a user would do instead (bench_alternatives.py)
    bytes         store size per mined token next to a dense float16 cache (bench_store.py)
    memory        peak RSS of mining N and 10N tokens, each in a fresh process (bench_store.py)
    duckdb        latency of named queries on a synthetic 10M-token store (bench_store.py)

Each throughput variant gets a one-batch warm-up before every timed round, the order reversed every round. On
the CPU the forward and the miners take turns batch by batch and a ratio is the forward's total time over the
variant's, so drift on a shared machine hits both sides alike; on a GPU (or `--interleave run`) whole runs take
turns and a ratio is best round over best round. Ratios are throughput over the bare forward's: 0.5 means mining
takes twice as long.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError
from .spec import CPU_SHARD_TOKENS, GPU_SHARD_TOKENS

PARTS = ("forward", "mining", "dla", "kernels", "tokens", "dense", "patterns", "sae", "alternatives", "bytes",
         "memory", "duckdb")
THROUGHPUT = ("forward", "mining", "dla", "kernels", "tokens", "dense", "patterns", "sae", "alternatives")
# miner variant -> (part, stats keys on top of top-k/histogram/moments, dense copy of the middle layer)
MINER_VARIANTS = {
    "mining": ("mining", {}, False),
    "dla": ("dla", {"dla": True}, False),
    "mining_torch_ops": ("kernels", {}, False),
    "token_table": ("tokens", {"dla": True, "token_table": True}, False),
    "dense": ("dense", {"dla": True, "token_table": True}, True),
    "patterns": ("patterns", {}, False),  # mining, its hooks plus every layer's attn.hook_pattern (eager attention)
    "sae": ("sae", {}, False),  # mining, its hooks plus an SAE's latents on every layer's residual stream
}
SAE_EXPANSION, SAE_K = 8, 32
"""The sae variant's SAEs: d_sae = 8 x d_model latents, the 32 largest kept (a common release's shape)."""
TORCH_OPS = {"mining_torch_ops"}
"""Variants run with MINING_KERNELS=torch: the reducers' torch code instead of their numba kernels."""
LABELS = {
    "forward": "bare forward (model + LM head)",
    "mining": "mining: top/bottom-k, contexts, histograms, moments",
    "dla": "  + direct logit attribution",
    "mining_torch_ops": "mining, numba kernels off (torch ops)",
    "token_table": "  + token table",
    "dense": "  + dense {dense_hook} (every token)",
    "patterns": "mining + every layer's attention pattern (eager)",
    "sae": f"mining + every layer's {SAE_EXPANSION}x top-{SAE_K} SAE latents",
    "cache_to_disk": "alternative: hooks -> float16 cache on disk -> reduce",
    "nnsight_to_disk": "alternative: nnsight -> float16 cache on disk -> reduce",
    "transformer_lens": "alternative: TransformerLens run_with_cache -> reduce",
}


@dataclass(frozen=True)
class BenchConfig:
    model: str = "smollm2-135m"
    tokens: int = 4096
    """Mined tokens per timed run (the corpus slice every variant processes)."""
    batch_size: int | str = 8
    """Contexts per forward pass, or auto: what `compute.batch_size: auto` picks on this device (batch_fit)."""
    context_length: int = 128
    dtype: str = "float32"
    device: str = "auto"
    threads: int | None = None
    """torch threads; None keeps torch's default (one per core)."""
    repeats: int = 2
    """Rounds of every throughput variant."""
    interleave: str = "auto"
    """batch: the forward and the miner variants run a batch each in turn, and a ratio is the total time of the
    forward's batches over the variant's, over every round; run: whole runs one after another, a ratio is best tok/s
    over the forward's best. auto: batch on the CPU, whose host drifts (rounds 10-18 points apart, session 26); run on
    a GPU, where a host sync after every batch would cost the device its overlap."""
    top_k: int = 32
    corpus: str = "builtin:python-docs"
    parts: tuple[str, ...] = PARTS
    memory_tokens: int | None = None
    """N of the memory part: fresh processes mine N and 10N tokens. None: two full batches, so that the
    growth from N to 10N is the streaming's, not a partly filled batch's or the one-time step from one
    batch to two (the previous batch's outputs are still held while the next forward runs)."""
    memory_repeats: int = 2
    """Fresh processes per size. The small run's peak moves from one process to the next (2,820-3,056 MB for the
    same 2,032 tokens, session 11), so each size's peak is the largest of its runs."""
    memory_variant: str = "token_table"
    """Miner variant the memory part mines (default: mining + DLA + token table, the demo's statistics)."""
    synthetic_store: str | None = None
    """Where the duckdb part keeps its synthetic store (reused when it matches); None: a temp dir."""
    synthetic_tokens: int = 10_000_000
    query_repeats: int = 5
    settle: bool = True
    """Each miner first mines the slice once, untimed, and keeps its top-k thresholds (engine.raise_floors),
    as an actor does with the shards it stored: the timed runs are its steady state. Floors from the slice
    itself admit about k candidates per neuron over the slice - more than the steady state of a long job,
    whose floors come from far more tokens - so this is still a conservative figure."""

    def __post_init__(self) -> None:
        for key in ("tokens", "context_length", "repeats", "top_k", "memory_tokens",
                    "memory_repeats", "synthetic_tokens", "query_repeats"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise UserError(f"--{key.replace('_', '-')}: must be positive, got {getattr(self, key)}")
        if self.batch_size != "auto" and (not isinstance(self.batch_size, int) or self.batch_size <= 0):
            raise UserError(f"--batch-size: must be positive or auto, got {self.batch_size}")
        if self.threads is not None and self.threads <= 0:
            raise UserError(f"--threads: must be positive, got {self.threads}")
        if self.memory_variant not in MINER_VARIANTS:
            raise UserError(f"--memory-variant: unknown variant {self.memory_variant!r}; "
                            f"choose from {', '.join(MINER_VARIANTS)}")
        if self.interleave not in ("auto", "batch", "run"):
            raise UserError(f"--interleave: must be auto, batch or run, got {self.interleave!r}")
        if self.context_length < 4:
            raise UserError(f"--context-length: must be at least 4, got {self.context_length}")


def parse_parts(text: str | None) -> tuple[str, ...]:
    if not text or text.strip() == "all":
        return PARTS
    parts = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise UserError(f"--parts: unknown part {unknown[0] if unknown else text!r}; "
                        f"choose from {','.join(PARTS)} (comma-separated) or all")
    return tuple(p for p in PARTS if p in parts)


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the shared workload


class Workload:
    """The model, loaded once, and the planned corpus slice every variant runs over."""

    def __init__(self, cfg: BenchConfig, scratch: str | None = None):
        """scratch: a folder for the files variants need (the sae variant's SAEs); a temporary one if None."""
        import tempfile

        from .hooks import resolve_hooks
        from .models import load_model
        from .runner import plan, validate
        from .spec import spec_from_dict

        self.cfg = cfg
        if scratch is None:  # removed with this object (or at exit)
            self._tmp = tempfile.TemporaryDirectory(prefix="mining-bench-")
            scratch = self._tmp.name
        self.scratch = scratch
        spec = spec_from_dict(bench_job(cfg, "mining"))
        validate(spec)  # hook names, context length vs the model, corpus source: before loading weights
        log(f"loading {cfg.model}")
        self.loaded = load_model(spec.model)
        self.shards, self.docs = plan(spec, self.loaded.tokenizer)
        self.batch_fit: dict[str, Any] | None = None
        """How `--batch-size auto` was resolved (batch_fit), else None."""
        if cfg.batch_size == "auto":
            from .batch_fit import fit_batch_size
            from .engine import ShardMiner

            batch_size, self.batch_fit = fit_batch_size(ShardMiner(spec, self.loaded), self.shards[0])
            self.cfg = cfg = dataclasses.replace(cfg, batch_size=batch_size)
            log(f"batch size auto: {batch_size} contexts ({self.batch_fit['rule']})")
        self.settle: list[Any] = list(self.shards) if cfg.settle else []
        """Shards each miner mines once (untimed) before the timed runs: its steady state."""
        self.warm = self.shards[0].head(cfg.batch_size)
        self.n_tokens = sum(s.n_tokens for s in self.shards)
        points = resolve_hooks(self.loaded.model, spec.hooks)
        self.n_layers, self.n_neurons = len(points), sum(p.width for p in points)
        self.dense_hook = points[len(points) // 2].name
        self.miners: dict[str, Any] = {}
        """The ShardMiner of each miner variant (their counters, e.g. shards mined twice, go in the report)."""
        self.skipped: dict[str, dict[str, str]] = {}
        """Alternatives that cannot run here (library missing or failing on this model), each with why."""
        self.steppers: dict[str, Callable[[list], Generator]] = {}
        """The forward and each miner variant a batch per step (runners fills it), for `interleave: batch`."""
        self.kept: list[Any] | None = None
        """ShardResults of the token_table variant (mining + DLA + token table): the bytes part writes them."""

    def job(self, variant: str) -> dict[str, Any]:
        return bench_job(self.cfg, variant, self.dense_hook, os.path.join(self.scratch, "saes"))

    def spec(self, variant: str):
        from .spec import spec_from_dict

        return spec_from_dict(self.job(variant))


def bench_job(cfg: BenchConfig, variant: str, dense_hook: str | None = None,
              sae_folder: str | None = None) -> dict[str, Any]:
    """The job spec (as YAML would give it) of a miner variant. The sae variant writes its SAEs in sae_folder (once)."""
    _, extra, dense = MINER_VARIANTS[variant]
    job: dict[str, Any] = {
        "name": "bench",
        "model": {"id": cfg.model, "dtype": cfg.dtype, "device": cfg.device},
        "corpus": {"source": cfg.corpus, "max_tokens": cfg.tokens, "context_length": cfg.context_length},
        "hooks": ["blocks.*.mlp.hook_post"] + {"patterns": ["blocks.*.attn.hook_pattern"],
                                               "sae": ["blocks.*.hook_resid_post.hook_sae_acts_post"]}.get(variant, []),
        "stats": {"top_k": cfg.top_k, "histogram": True, "moments": True, "dla": False, "token_table": False, **extra},
        # shards as `shard_tokens: auto` cuts them for actors on this device (and the most `--batch-size auto` may pick)
        "compute": {"actors": 1, "batch_size": cfg.batch_size,
                    "shard_tokens": GPU_SHARD_TOKENS if _on_gpu(cfg.device) else CPU_SHARD_TOKENS},
    }
    if dense:
        job["dense"] = {"hooks": [dense_hook], "token_fraction": 1.0}
    if variant == "sae":
        if sae_folder is None:
            raise ValueError("the sae variant needs a folder for its SAEs")
        job["saes"] = {f"blocks.{layer}.hook_resid_post": folder
                       for layer, folder in bench_saes(cfg.model, sae_folder).items()}
    return job


def bench_saes(model: str, root: str) -> dict[int, str]:
    """An SAE of random weights for every layer's residual stream, in SAELens' layout (float16, encoder only: the
    mining cost does not depend on the weights), written in root unless a call did already: layer -> folder. The
    caller owns root (run_bench: its scratch folder), so nothing outlives the run, not even a killed one's atexit."""
    import json

    import torch
    from safetensors.torch import save_file

    from .architectures import dims, text_config
    from .models import load_config
    from .spec import ModelSpec

    config = load_config(ModelSpec(id=model))
    d_in, n_layers = dims(config)["d_model"], int(text_config(config).num_hidden_layers)
    d_sae = SAE_EXPANSION * d_in
    folders = {layer: Path(root) / f"blocks.{layer}.hook_resid_post" for layer in range(n_layers)}
    done = Path(root) / "complete"
    if done.exists():
        return {layer: str(folder) for layer, folder in folders.items()}
    for layer, folder in folders.items():
        g = torch.Generator().manual_seed(layer)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"W_enc": (torch.randn(d_in, d_sae, generator=g) / d_in ** 0.5).half(),
                   "b_enc": torch.zeros(d_sae, dtype=torch.float16), "b_dec": torch.zeros(d_in, dtype=torch.float16)},
                  str(folder / "sae_weights.safetensors"))
        (folder / "cfg.json").write_text(json.dumps({"architecture": "topk", "d_in": d_in, "d_sae": d_sae,
                                                     "k": SAE_K, "normalize_activations": "none"}))
    done.touch()
    return {layer: str(folder) for layer, folder in folders.items()}


def _on_gpu(device: str) -> bool:
    import torch

    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def iter_batches(shards, batch_size: int, device):
    """(ids (B, T), attention (B, T) or None, toks (B, T) global index or -1) exactly as the engine builds them."""
    import torch

    from .batch import model_mask

    for shard in shards:
        grid = shard.tok_grid()
        for lo in range(0, len(shard.ids), batch_size):
            sl = slice(lo, lo + batch_size)
            T = int(shard.length[sl].max())
            ids = torch.from_numpy(shard.ids[sl, :T]).to(device)
            mask = model_mask(shard.length[sl], T)
            attention = None if mask is None else torch.from_numpy(mask).to(device)
            yield ids, attention, torch.from_numpy(grid[sl, :T]).to(device)


def bare_forward(loaded, shards, batch_size: int) -> None:
    for _ in forward_steps(loaded, shards, batch_size):
        pass


def forward_steps(loaded, shards, batch_size: int) -> Iterator[None]:
    """The bare forward a batch per step, as ShardMiner.steps mines."""
    import torch

    @torch.inference_mode()  # on a generator torch enters the mode around each step, not across the pauses
    def steps() -> Iterator[None]:
        for ids, attention, _ in iter_batches(shards, batch_size, loaded.device):
            loaded.model(input_ids=ids, attention_mask=attention)
            yield

    return steps()


# ---------------------------------------------------------------- throughput


def runners(work: Workload, parts: tuple[str, ...], scratch: str) -> dict[str, Callable[[list], Any]]:
    """Each throughput variant as a whole run over a list of shards; the forward's and the miners' also go to
    work.steppers, a batch per step."""
    from .engine import ShardMiner

    B = work.cfg.batch_size
    out: dict[str, Callable[[list], Any]] = {"forward": lambda shards: bare_forward(work.loaded, shards, B)}
    work.steppers = {"forward": lambda shards: forward_steps(work.loaded, shards, B)}
    for name, (part, _, _) in MINER_VARIANTS.items():
        if name == "dla" and part in parts and not work.loaded.causal:  # the engine would mine it without DLA
            work.skipped[name] = {"skipped": f"{work.cfg.model} is an encoder: no next token to attribute"}
            continue
        if part in parts:
            miner = work.miners[name] = ShardMiner(work.spec(name), work.loaded)
            with kernels_off(name in TORCH_OPS):
                for shard in work.settle:  # as an actor: shards it stored set its top-k thresholds
                    miner.raise_floors(miner.mine(shard))

            def run(shards, m=miner, off=name in TORCH_OPS):
                with kernels_off(off):
                    return [m.mine(s) for s in shards]

            out[name] = run
            work.steppers[name] = lambda shards, m=miner: miner_steps(m, shards)
    if "alternatives" in parts:
        from .bench_alternatives import alternative_runners
        from .engine import histogram_bins
        from .hooks import resolve_hooks

        spec = work.spec("mining")
        points = resolve_hooks(work.loaded.model, spec.hooks)
        alternatives, skipped = alternative_runners(work.loaded, points, spec.stats.top_k, histogram_bins(spec),
                                                         B, scratch)
        out.update(alternatives)
        work.skipped.update(skipped)
    return out


def miner_steps(miner, shards: list) -> Generator[None, None, list]:
    results = []
    for shard in shards:
        results.append((yield from miner.steps(shard)))
    return results


@contextmanager
def kernels_off(off: bool) -> Iterator[None]:
    """MINING_KERNELS=torch for the block (reducers/kernels.py reads it on every call)."""
    before = os.environ.get("MINING_KERNELS")
    if off:
        os.environ["MINING_KERNELS"] = "torch"
    try:
        yield
    finally:
        if off:
            if before is None:
                os.environ.pop("MINING_KERNELS", None)
            else:
                os.environ["MINING_KERNELS"] = before


def measure(work: Workload, runs: dict[str, Callable[[list], Any]], repeats: int,
            steppers: dict[str, Callable[[list], Generator]] | None = None) -> tuple[dict, dict]:
    """tok/s of every run per round (order reversed every other round), and the best round's details.
    steppers: variants timed batch by batch in turn (paired) instead of as whole runs one after another."""
    rates: dict[str, list[float]] = {name: [] for name in runs}
    details: dict[str, Any] = {}
    order = list(runs)
    steppers = steppers or {}
    for r in range(repeats):
        turn = order if r % 2 == 0 else order[::-1]
        paired = [name for name in turn if name in steppers]
        timed: dict[str, tuple[float, Any]] = {}
        if paired:
            for name in paired:
                runs[name]([work.warm])
            gc.collect()
            timed = interleaved({name: steppers[name] for name in paired}, work)
        for name in turn:
            if name not in timed:
                runs[name]([work.warm])
                gc.collect()
                _sync(work.loaded.device)
                start = time.perf_counter()
                out = runs[name](work.shards)
                _sync(work.loaded.device)
                timed[name] = time.perf_counter() - start, out
            seconds, out = timed.pop(name)
            rate = work.n_tokens / seconds
            if name == "token_table":
                work.kept = out
            if isinstance(out, dict) and (not rates[name] or rate > max(rates[name])):
                details[name] = out
            rates[name].append(rate)
            del out
            log(f"round {r + 1}/{repeats} {name}: {rate:,.0f} tok/s")
    return rates, details


def interleaved(steppers: dict[str, Callable[[list], Generator]], work: Workload) -> dict[str, tuple[float, Any]]:
    """Each variant over work.shards, a batch of one, then the same batch of the next, and so on (the order reversed
    every other batch): a host whose speed drifts slows every variant's batch alike. -> name: (seconds, result)."""
    runs = {name: make(work.shards) for name, make in steppers.items()}
    seconds = dict.fromkeys(runs, 0.0)
    done: dict[str, Any] = {}
    step = 0
    while len(done) < len(runs):
        names = [name for name in runs if name not in done]
        for name in names if step % 2 == 0 else names[::-1]:
            _sync(work.loaded.device)
            start = time.perf_counter()
            with kernels_off(name in TORCH_OPS):
                try:
                    next(runs[name])
                except StopIteration as end:
                    done[name] = end.value
            _sync(work.loaded.device)
            seconds[name] += time.perf_counter() - start
        step += 1
    return {name: (seconds[name], done[name]) for name in runs}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput(work: Workload, parts: tuple[str, ...], scratch: str) -> dict[str, Any]:
    from .bench_alternatives import ALTERNATIVES

    runs = runners(work, parts, scratch)
    paired = work.cfg.interleave == "batch" or (work.cfg.interleave == "auto" and work.loaded.device.type != "cuda")
    rates, details = measure(work, runs, work.cfg.repeats, work.steppers if paired else None)
    best = {name: max(r) for name, r in rates.items()}
    bare = best["forward"]
    out: dict[str, Any] = {"bare_tokens_per_s": bare, "interleave": "batch" if paired else "run"}
    for name in MINER_VARIANTS:
        if name in best:
            out[f"{name}_tokens_per_s"] = best[name]
            # batch by batch, every round's batches ran beside the forward's: the ratio of their total times over all
            # rounds. Whole runs: the best round of each, since the rounds ran apart
            out[f"{name}_ratio"] = (sum(1 / f for f in rates["forward"]) / sum(1 / v for v in rates[name]) if paired
                                    else best[name] / bare)
    if "dla" in work.skipped:
        out["dla_ratio"] = None
        out["skipped_variants"] = {"dla": work.skipped["dla"]["skipped"]}
    if "mining" in best and "mining_torch_ops" in best:
        out["kernels_speedup"] = out["mining_ratio"] / out["mining_torch_ops_ratio"]
    out["rounds_tokens_per_s"] = rates
    # Each round's ratio to the same round's forward (run next to it): how far the machine's drift moves the ratio.
    out["round_ratios"] = {name: [v / f for v, f in zip(r, rates["forward"])]
                           for name, r in rates.items() if name != "forward"}
    # On a host whose speed drifts between rounds, the best-of ratio moves with whichever variant got the fastest
    # round; the median of the rounds' own ratios does not.
    out["round_ratio_medians"] = {name: statistics.median(r) for name, r in out["round_ratios"].items()}
    remined = {name: m.remined for name, m in work.miners.items() if m.remined}
    if remined:  # the device path's candidate buffers overflowed: those shards were mined twice
        out["remined_shards"] = remined
        log(f"shards mined again densely after a candidate-buffer overflow: {remined}")
    if work.loaded.device.type == "cuda":
        out["gpu_utilisation"] = gpu_utilisation(work, best)
    if "alternatives" in parts:
        out["alternatives"] = {}
        for name in ALTERNATIVES:
            if name not in best:
                out["alternatives"][name] = work.skipped[name]
                continue
            alt = out["alternatives"][name] = {"tokens_per_s": best[name], "ratio": best[name] / bare,
                                               **details.get(name, {})}
            if "mining" in best:
                alt["mining_speedup"] = best["mining"] / best[name]
    return out


PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "A100": 312.0, "A10G": 125.0, "L4": 121.0, "L40S": 362.0}
"""Dense bf16/fp16 tensor-core peaks from the vendors' datasheets (SXM parts), TFLOP/s."""


def flops_per_token(model, context_length: int) -> float:
    """Forward FLOPs per token: 2 per weight of every matmul in the blocks and the LM head (tied or not; embeddings,
    token and position, are lookups; a multimodal model's vision tower does not run on text) plus causal attention's
    scores and mix, 2 x 2 x d x T/2 per layer at an average T/2 keys."""
    from .architectures import arch_of, locate, text_config

    cfg = text_config(model.config)
    _, blocks = locate(model, arch_of(model))
    matmul = sum(p.numel() for p in blocks.parameters() if p.ndim >= 2)
    head = model.get_output_embeddings()
    if head is not None:
        matmul += head.weight.numel()
    heads_dim = getattr(cfg, "num_attention_heads", 0) * getattr(cfg, "head_dim", None) \
        if getattr(cfg, "head_dim", None) else cfg.hidden_size
    return 2.0 * matmul + 2.0 * cfg.num_hidden_layers * heads_dim * context_length


def gpu_utilisation(work: Workload, best: dict[str, float]) -> dict[str, Any]:
    """Model FLOP utilisation of each variant: useful forward FLOPs per second over the GPU's dense peak."""
    import torch

    name = torch.cuda.get_device_name(work.loaded.device)
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    T = sum(s.n_tokens for s in work.shards) / max(1, sum(len(s.ids) for s in work.shards))  # mean context
    fpt = flops_per_token(work.loaded.model, int(round(T)))
    out: dict[str, Any] = {"name": name, "flops_per_token": fpt, "peak_tflops": peak,
                           "memory_gib": torch.cuda.max_memory_allocated(work.loaded.device) / 2**30}
    if peak and work.loaded.dtype in (torch.bfloat16, torch.float16):
        out["mfu"] = {k: v * fpt / (peak * 1e12) for k, v in best.items()}
    return out


# ---------------------------------------------------------------- the targets (issue 7)


def verdicts(r: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each target of the parts this run measured: its figure, the target, met or not, and by how much it is missed
    (figure minus target: negative for a ratio below its floor, positive for a size or latency over its ceiling)."""
    store, memory, duck = r.get("store", {}), r.get("memory", {}), r.get("duckdb", {})
    figures: list[tuple[str, str, float | None, float, bool]] = [  # key, what, figure, target, at least (else under)
        ("mining_ratio", "mining >= 0.90 of the bare forward's tok/s", r.get("mining_ratio"), 0.90, True),
        ("dla_ratio", "mining + DLA >= 0.80", r.get("dla_ratio"), 0.80, True),
        ("memory_growth_pct", "peak memory growth from N to 10N tokens < 10%", memory.get("peak_growth_pct"), 10.0,
         False),
        ("store_pct_of_dense_1m", "store < 1% of a dense float16 cache at 1M tokens",
         100 / store["ratio_dense_to_store_1m"] if store else None, 1.0, False),
        ("query_ms", "each named query < 100 ms at 10M token rows (the slowest median)",
         max(q["median_ms"] for q in duck["queries"].values()) if duck else None, 100.0, False),
    ]
    if r.get("machine", {}).get("gpu"):
        figures.append(("mined_tokens_per_s", "stretch: >= 1M mined tok/s (one H100)", r.get("mining_tokens_per_s"),
                        1e6, True))
    out = {}
    for key, what, figure, target, at_least in figures:
        if figure is None:
            continue
        met: bool | None = figure >= target if at_least else figure < target
        out[key] = {"what": what, "value": figure, "target": target}
        if key == "query_ms" and duck["token_rows"] < 10_000_000:  # a smaller store says nothing of this target
            met, out[key]["note"] = None, f"measured at {duck['token_rows']:,} token rows, not 10M (--synthetic-tokens)"
        out[key].update(met=met, missed_by=None if met in (True, None) else figure - target)
    return out


def verdict_lines(targets: dict[str, dict[str, Any]]) -> list[str]:
    def shown(key: str, v: float) -> str:
        if key.endswith("_pct") or key.endswith("_pct_of_dense_1m"):
            return f"{v:.1f}%" if key == "memory_growth_pct" else f"{v:.2f}%"
        return f"{v:,.0f} ms" if key == "query_ms" else f"{v:,.0f}" if abs(v) > 100 else f"{v:.2f}"

    out = ["targets (issue 7)"]
    for key, t in targets.items():
        how = ("not judged" if t["met"] is None else "met" if t["met"]
               else f"missed by {shown(key, abs(t['missed_by']))}")
        note = f" ({t['note']})" if t.get("note") else ""
        out.append(f"  {t['what']:<72}{shown(key, t['value']):>10}  {how}{note}")
    return out


# ---------------------------------------------------------------- the whole bench


def machine(work: Workload | None, cfg: BenchConfig) -> dict[str, Any]:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                if line.startswith("model name")), platform.processor())
    info = {"cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count(), "cpu": cpu, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "platform": platform.platform(),
            "dtype": cfg.dtype, "device": str(work.loaded.device) if work else cfg.device}
    if work and work.loaded.device.type == "cuda":
        from .reducers import cuda_layer

        info["gpu"] = torch.cuda.get_device_name(work.loaded.device)
        # the reducers' path on the device: the CUDA kernel (built and past its first-use check), or the torch ops
        kernel = os.environ.get("MINING_CUDA_LAYER") != "0" and cuda_layer.library(work.loaded.device) is not None
        sums = "float32-pair" if kernel and cuda_layer.float_pairs(work.loaded.device) else "float64"
        info["gpu_reducers"] = f"cuda kernel, {sums} sums" if kernel else "torch ops"
    return info


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    import tempfile

    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    parts = cfg.parts
    # the memory part's children mine with a number: `auto` is resolved here, on the loaded model, first
    needs_model = any(p in parts for p in THROUGHPUT + ("bytes",)) or (cfg.batch_size == "auto" and "memory" in parts)
    with tempfile.TemporaryDirectory(prefix="mining-bench-") as scratch:  # the Workload's too: gone after the run
        return _run_bench(cfg, parts, needs_model, scratch)


def _run_bench(cfg: BenchConfig, parts: tuple[str, ...], needs_model: bool, scratch: str) -> dict[str, Any]:
    from . import bench_store

    work = Workload(cfg, scratch) if needs_model else None
    cfg = work.cfg if work else cfg
    result: dict[str, Any] = {"parts": list(parts)}
    if work:
        result["config"] = {
            "model": cfg.model, "corpus": cfg.corpus, "tokens": work.n_tokens, "shards": len(work.shards),
            "batch_size": cfg.batch_size, "context_length": cfg.context_length, "top_k": cfg.top_k,
            "repeats": cfg.repeats, "hooks": "blocks.*.mlp.hook_post", "layers": work.n_layers,
            "neurons": work.n_neurons, "dense_hook": work.dense_hook, "causal": work.loaded.causal}
        if work.batch_fit:
            result["config"]["batch_fit"] = work.batch_fit
    result["machine"] = machine(work, cfg)
    if any(p in parts for p in THROUGHPUT):
        result.update(throughput(work, parts, scratch))
    if "bytes" in parts:
        result["store"] = bench_store.store_bytes(work, scratch)
    if "memory" in parts:
        result["memory"] = memory_part(cfg, work, scratch)
    if "duckdb" in parts:
        result["duckdb"] = bench_store.duckdb_latency(cfg.synthetic_store or os.path.join(scratch, "synthetic"),
                                                      cfg.synthetic_tokens, cfg.query_repeats)
    result["targets"] = verdicts(result)
    return result


def memory_part(cfg: BenchConfig, work: Workload | None, scratch: str) -> dict[str, Any]:
    import torch

    from .bench_store import memory_growth
    from .runner import validate
    from .spec import spec_from_dict

    dense_hook = work.dense_hook if work else middle_hook(cfg)
    job = bench_job(cfg, cfg.memory_variant, dense_hook, os.path.join(scratch, "saes"))
    if not work:
        validate(spec_from_dict(job))  # a bad model or corpus: one line here, not a child's traceback
    n = cfg.memory_tokens or 2 * cfg.batch_size * (cfg.context_length - 1)
    return memory_growth(job, n, torch.get_num_threads(), cfg.memory_repeats)


def middle_hook(cfg: BenchConfig) -> str:
    """blocks.L.mlp.hook_post of the middle layer, from the model's config alone (no weights)."""
    from .hooks import resolve_hooks
    from .models import load_config
    from .runner import meta_model
    from .spec import ModelSpec

    points = resolve_hooks(meta_model(load_config(ModelSpec(id=cfg.model))), ["blocks.*.mlp.hook_post"])
    return points[len(points) // 2].name


# ---------------------------------------------------------------- the readable report


def format_report(r: dict[str, Any]) -> str:
    out = []
    m, c = r["machine"], r.get("config")
    where = f"{m['dtype']} on {m['device']}" if m.get("device") else "no model"
    out.append(f"machine: {m['cpu']} ({m['cpus_usable']} usable of {m['cpu_count']} CPUs), torch {m['torch']}, "
               f"{m['threads']} threads, {where}" + (f", {m['gpu']}" if m.get("gpu") else "")
               + (f" ({m['gpu_reducers']})" if m.get("gpu_reducers") else ""))
    if c:
        auto = " (auto)" if c.get("batch_fit") else ""
        out.append(f"workload: {c['model']}, {c['tokens']:,} tokens of {c['corpus']}, batch {c['batch_size']}{auto} x "
                   f"{c['context_length']}, top_k {c['top_k']}, {c['neurons']:,} neurons ({c['layers']} layers, "
                   f"{c['hooks']}), {c['repeats']} rounds, " + ("each batch of each variant beside the forward's"
                                                                 if r.get("interleave") == "batch" else
                                                                 "whole runs interleaved"))
    if "bare_tokens_per_s" in r:
        out += ["", f"{'throughput':<58}{'tok/s':>9}{'ratio':>8}{'time':>8}{'per round (median)':>22}"]
        bare = r["bare_tokens_per_s"]
        rows = [("forward", bare)] + [(n, r[f"{n}_tokens_per_s"]) for n in MINER_VARIANTS if f"{n}_tokens_per_s" in r]
        alt = r.get("alternatives", {})
        rows += [(name, a["tokens_per_s"]) for name, a in alt.items() if "tokens_per_s" in a]
        for name, rate in rows:
            label = LABELS[name].format(dense_hook=c["dense_hook"])
            if name == "forward" and not c.get("causal", True):
                label = "bare forward (model; an encoder: no LM head)"
            spread = r.get("round_ratios", {}).get(name)
            spread = f"{min(spread):.2f}-{max(spread):.2f} ({statistics.median(spread):.2f})" if spread else ""
            ratio = r.get(f"{name}_ratio", rate / bare)
            out.append(f"  {label:<56}{rate:>9,.0f}{ratio:>8.2f}{1 / ratio:>7.2f}x{spread:>22}")
            if name == "mining":
                out += [f"  {LABELS[n]}: skipped: {why}" for n, why in r.get("skipped_variants", {}).items()]
        for name, a in sorted(alt.items(), key=lambda item: "skipped" in item[1]):
            if "skipped" in a:
                out.append(f"  {name}: skipped: {a['skipped']}")
            else:
                out.append(f"    ({name}: cache {a['cache_bytes'] / 1e6:,.1f} MB; capture {a['capture_s']:.1f} s, "
                           f"reduce {a['reduce_s']:.1f} s" + (f"; mining is {a['mining_speedup']:.2f}x its speed"
                                                              if "mining_speedup" in a else "") + ")")
        out.append(("  ratio = the forward's time over the variant's, batch beside batch, all rounds (alternatives: "
                    "best tok/s over the forward's best)" if r.get("interleave") == "batch" else
                    "  ratio = best tok/s over the bare forward's best")
                   + "; time = wall time over the bare forward's; tok/s = the best round's; "
                   "per round = the range of each round's ratio to that round's forward, and its median")
        g = r.get("gpu_utilisation")
        if g:
            mfu = ", ".join(f"{k} {v:.1%}" for k, v in g.get("mfu", {}).items()) or "n/a (no bf16/fp16 peak known)"
            out.append(f"  {g['name']}: {g['flops_per_token'] / 1e6:,.0f} MFLOP/token; model FLOP utilisation "
                       f"(of {g['peak_tflops']} TFLOP/s): {mfu}; peak memory {g['memory_gib']:.1f} GiB")
    if "store" in r:
        from .bench_store import store_lines

        out += [""] + store_lines(r["store"])
    if "memory" in r:
        from .bench_store import memory_lines

        out += [""] + memory_lines(r["memory"])
    if "duckdb" in r:
        from .bench_store import duckdb_lines

        out += [""] + duckdb_lines(r["duckdb"])
    if r.get("targets"):
        out += [""] + verdict_lines(r["targets"])
    return "\n".join(out)
