"""The GPU path, checked and measured in one run (for a lent GPU machine; see BENCHMARKS.md).

    python3 scripts/gpu_check.py --config DIR --out OUT [--device cuda] [--tokens N]
    python3 scripts/gpu_check.py --config DIR --out OUT --dry-run   # toy sizes on the CPU, kernel emulated

DIR holds a model's config.json and tokenizer files (no weights: the device machine cannot download
any, and SmolLM2's weights are too large to carry there), so the model is SmolLM2-135M's architecture
with random bf16 weights: the same FLOPs, shapes and reducer work as the real one. To make DIR here, after
anything has loaded smollm2-135m once (which converts the GGUF into the cache):

    echo /.gpu/ >> .git/info/exclude; mkdir -p .gpu/smollm2
    cp ~/.cache/activation-mining/gguf-*/{config.json,tokenizer.json,tokenizer_config.json} .gpu/smollm2/

and name `.gpu` in the device call's carry. The sanitize stage needs NVIDIA's compute-sanitizer. If the device
machine's CUDA toolkit may lack it, carry one (about 40 MB, within the carry limit with the model's files):

    pip download --no-deps -d /tmp/cs nvidia-cuda-sanitizer-api==13.0.85   # CUDA 13.0, as the device's torch
    python3 -m zipfile -e /tmp/cs/*.whl /tmp/cs/x && mkdir -p .gpu/compute-sanitizer
    cp -r /tmp/cs/x/nvidia/cu13/bin /tmp/cs/x/nvidia/cu13/lib .gpu/compute-sanitizer/
    chmod +x .gpu/compute-sanitizer/bin/compute-sanitizer

and run with MINING_COMPUTE_SANITIZER=.gpu/compute-sanitizer/bin/compute-sanitizer.

Stages (--stages, comma-separated), each reported even if another fails:
  kernel_exact  cuda_layer.cu against the CPU reducers, batch by batch, on bf16 and fp16 data with ties, NaN
                and infinities: top/bottom/context keys and histogram counts bit for bit, moments to 1e-7;
                and every fp16 bit pattern's float32 image; bf16 again with the float32-pair sums forced;
                DLA read with the gains (FusedGain) at the bench's width
  kernel_ops    one layer's pass at the bench's shape, CUDA events; with float64 and with float32-pair sums;
                and its direct logit attribution as the torch product and quotient then the kernel (the path
                before session 17) against the kernel reading the activations with the gains (FusedGain)
  exact         the torch-ops device path (reducers/device.py) against the CPU
  ops           per-reducer times of the torch-ops path on one layer's (B*T, N) bf16 batch
  bench         `mine bench` forward, mining, dla on the random SmolLM2, batch 64 x 512
  bench_auto    the same at `--batch-size auto` (compute.batch_size: auto: the batch that fills the device)
  miner         ShardMiner on a tiny random Llama on the device against the CPU, and the host syncs
                left while it mines (torch.cuda.set_sync_debug_mode)
  families      ShardMiner on a tiny random model of every supported family, on the device against the CPU
  profile       torch.profiler over the bench's mining variant: device and host time by op (profile.txt), the
                device's busy fraction and longest idle gaps, the trace (trace.json.gz)
  sanitize      kernel_exact at toy sizes under NVIDIA's compute-sanitizer, once per tool: memcheck (out-of-bounds
                and misaligned accesses), racecheck (shared-memory hazards: a missing __syncthreads), synccheck
                (barriers misused) and initcheck (reads of device memory never written); each tool's error count
                and the first lines of its report. The CPU emulation cannot see races within a phase (one fiber runs
                at a time); these tools see them on the hardware. Skipped where compute-sanitizer is not installed
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mining.reducers import ContextTopK, Histogram, HistogramBins, TopK  # noqa: E402


from mining.reducers.moments import _batch_moments  # noqa: E402

REPORT: dict = {}
REPORT_PATH: Path | None = None
"""OUT/report.json, rewritten after every stage: a run the device session's time limit kills keeps what it did."""
SMALL = False
"""--small: toy sizes on the device (the sanitize stage's runs, which compute-sanitizer slows 10-100 times)."""
DRY = False
"""--dry-run: every stage at a toy size on the CPU, the kernel emulated (MINING_CUDA_EMULATE=1), timed with the
host's clock: the script itself checked (tests/test_gpu_check.py) before a device session spends minutes on it."""


def size(real, toy):
    return toy if DRY or SMALL else real


def stage(name):
    def wrap(fn):
        def run(*a, **k):
            t0 = time.perf_counter()
            try:
                REPORT[name] = {"ok": True, **(fn(*a, **k) or {})}
            except Exception as e:  # noqa: BLE001 - every stage reports
                REPORT[name] = {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]}
            REPORT[name]["seconds"] = round(time.perf_counter() - t0, 1)
            if REPORT_PATH is not None:
                REPORT_PATH.write_text(json.dumps(REPORT, indent=1, default=str))
            print(f"== {name}: {'ok' if REPORT[name]['ok'] else 'FAILED ' + REPORT[name]['error']} "
                  f"({REPORT[name]['seconds']} s)", flush=True)
        return run
    return wrap


def hostile(M: int, N: int, seed: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, N, generator=g) * torch.rand(N, generator=g) * 3
    x[:, ::7] = x[:, ::7].round()  # ties
    x[:, 3::11] = 0.0  # dead columns
    x[torch.rand(M, N, generator=g) < 1e-4] = float("nan")
    x[torch.rand(M, N, generator=g) < 1e-4] = float("inf")
    x[torch.rand(M, N, generator=g) < 1e-4] = float("-inf")
    return x.to(dtype)


def cpu_path(fn):
    before = os.environ.pop("MINING_DEVICE_PATH", None)
    try:
        return fn()
    finally:
        if before is not None:
            os.environ["MINING_DEVICE_PATH"] = before


@stage("exact")
def exact(dev: torch.device) -> dict:
    M, N, k = size(4096, 64), size(1536, 64), 16
    x = hostile(M * 4, N, 0)
    tok = torch.randperm(10 * M * 4)[: M * 4].sort().values
    out = {}
    for largest in (True, False):
        ref, got = TopK(k, largest), TopK(k, largest)
        caps = []
        for lo in range(0, 4 * M, M):
            cpu_path(lambda: ref.update(x[lo:lo + M].float(), tok[lo:lo + M], check=False))
            caps.append(got.sparse_capacity(M, N))
            got.update(x[lo:lo + M].to(dev), tok[lo:lo + M].to(dev), check=False)
        out[f"topk_{'top' if largest else 'bottom'}"] = {
            "equal": bool(torch.equal(ref.keys, got.keys.cpu())), "capacities": caps, "overflow": got.overflowed()}
    B, T = size(32, 4), size(128, 16)
    xs = x[: B * T].view(B, T, N)
    toks = torch.arange(B * T).view(B, T) * 2
    toks[:, :3] = -1
    ref, got = ContextTopK(k), ContextTopK(k)
    cpu_path(lambda: ref.update(xs.float(), toks, check=False, rising=True))
    got.update(xs.to(dev), toks.to(dev), check=False, rising=True)
    out["contexts"] = bool(torch.equal(ref.top.keys, got.top.keys.cpu()))
    bins = HistogramBins()
    ref, got = Histogram(bins), Histogram(bins)
    cpu_path(lambda: ref.update(x.float()))
    got.update(x.to(dev))
    out["histogram"] = bool(torch.equal(ref.finalize(), got.finalize().cpu()))
    r = cpu_path(lambda: _batch_moments(x.float()))
    g = _batch_moments(x.to(dev))
    out["moments"] = all(bool(torch.allclose(g[key].cpu().double(), r[key].double(), rtol=1e-9, equal_nan=True))
                         for key in ("mean", "m2", "m3", "m4", "n_active", "min", "max"))
    flat = [v["equal"] if isinstance(v, dict) else v for v in out.values()]
    if not all(flat):
        raise AssertionError(f"mismatch: {out}")
    return out


@stage("miner")
def miner(dev: torch.device, config_dir: str, scratch: Path) -> dict:
    from transformers import AutoTokenizer

    from mining.engine import ShardMiner
    from mining.models import load_model
    from mining.runner import plan
    from mining.spec import spec_from_dict
    from mining.tiny import tiny_model

    tok = AutoTokenizer.from_pretrained(config_dir)
    folder = scratch / "tiny"
    tiny_model("llama", vocab_size=len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)

    def mine(device: str):
        spec = spec_from_dict({
            "name": "check", "model": {"id": str(folder), "device": device},
            "corpus": {"source": "builtin:python-docs", "max_tokens": 6000, "context_length": 64},
            "hooks": ["blocks.*.mlp.hook_post"],
            "stats": {"top_k": 6, "dla": True, "token_table": True},
            "dense": {"hooks": ["blocks.1.mlp.hook_post"], "token_fraction": 0.3},
            "compute": {"batch_size": 8, "shard_tokens": 1500}})
        loaded = load_model(spec.model)
        shards, _ = plan(spec, loaded.tokenizer)
        m = ShardMiner(spec, loaded)
        res = []
        for s in shards:
            res.append(m.mine(s))
            m.raise_floors(res[-1])
        return res

    ref = cpu_path(lambda: mine("cpu"))
    got = mine(str(dev))
    syncs = []
    if dev.type == "cuda":  # which operations still wait for the GPU (the shard-end reads are expected)
        import warnings

        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mine(str(dev))
        torch.cuda.set_sync_debug_mode(0)
        for w in caught:
            where = [f"{f.filename.split('/')[-1]}:{f.lineno}" for f in traceback.extract_stack()[-1:]]
            syncs.append(str(w.message)[:160] + f" @ {w.filename.split('/')[-1]}:{w.lineno}" + str(where))
    bad = mismatches(ref, got)
    counts: dict[str, int] = {}
    for line in syncs:
        counts[line] = counts.get(line, 0) + 1
    return {"shards": len(ref), "mismatches": len(bad), "first": bad[:10], "syncs": len(syncs), "sync_sites": counts}


def mismatches(ref: list, got: list) -> list[str]:
    """Where the device's shard results differ from the CPU's. Float32 on both: the forward differs in rounding
    (cuBLAS vs CPU), so values may differ in the last bits and ranks of near-ties may swap: the stages report, and
    do not fail on, the first mismatches."""
    bad = []
    for ra, rb in zip(ref, got, strict=True):
        for name, st in ra.stats.items():
            sa, sb = st.state_dict(), rb.stats[name].state_dict()
            for key in sa:
                a, b = sa[key], sb[key]
                ok = torch.allclose(a.double(), b.double(), rtol=1e-4, atol=1e-5, equal_nan=True) \
                    if key.split(".")[0] in ("moments", "dla_moments", "dla_top", "dla_bottom") else torch.equal(a, b)
                if not ok:
                    bad.append(f"shard {ra.index} {name} {key}")
        if ra.tokens is None:
            continue
        for col in ("tok", "token_id"):
            if not ra.tokens[col].equals(rb.tokens[col]):
                bad.append(f"tokens.{col}")
        lp_a, lp_b = ra.tokens["logprob"].to_numpy(zero_copy_only=False), rb.tokens["logprob"].to_numpy(zero_copy_only=False)
        if not np.allclose(lp_a, lp_b, rtol=1e-3, atol=1e-4, equal_nan=True):
            bad.append("tokens.logprob")
    return bad


@stage("families")
def families(dev: torch.device, config_dir: str, scratch: Path) -> dict:
    """ShardMiner on a tiny random model of every family (mining.tiny.ARCHS; three in a dry run), on the device
    against the CPU: its neurons (a mixture of experts' routing probabilities) with DLA where it is a causal LM
    with MLP neurons, its first layer's attention pattern (eager attention on the device), the latents of a random
    SAE on its second layer's residual stream (their DLA too, where the neurons have it), and the token table.
    Each family's mismatches are reported, as the miner stage's."""
    from transformers import AutoTokenizer

    from mining.architectures import MODEL_TYPES
    from mining.engine import ShardMiner
    from mining.models import ENCODER_TYPES, load_model
    from mining.runner import plan
    from mining.spec import spec_from_dict
    from mining.tiny import ARCHS, tiny_model

    tok = AutoTokenizer.from_pretrained(config_dir)
    out = {}
    for arch in (("opt", "gemma2", "olmoe") if DRY else ARCHS):
        folder = scratch / f"tiny-{arch}"
        if not folder.exists():
            tiny_model(arch, vocab_size=len(tok)).save_pretrained(folder)
            tok.save_pretrained(folder)
        moe = "mlp.hook_expert_weights" in MODEL_TYPES[arch].sites
        causal = arch not in ENCODER_TYPES
        ln2 = ["blocks.1.ln2.hook_normalized"] if "ln2.hook_normalized" in MODEL_TYPES[arch].sites else []
        sae = random_sae(scratch / f"sae-{arch}", folder)

        def mine(device: str, arch=arch, folder=folder, moe=moe, causal=causal, ln2=ln2, sae=sae):
            spec = spec_from_dict({
                "name": arch, "model": {"id": str(folder), "device": device},
                "corpus": {"source": "builtin:python-docs", "max_tokens": size(1200, 300), "context_length": 48},
                "hooks": ["blocks.*.mlp.hook_expert_weights" if moe else "blocks.*.mlp.hook_post",
                          "blocks.0.attn.hook_pattern", "blocks.1.hook_attn_out", "blocks.1.hook_mlp_out", *ln2,
                          "blocks.1.hook_resid_post.hook_sae_acts_post"],
                "saes": {"blocks.1.hook_resid_post": str(sae)},
                "stats": {"top_k": 6, "dla": causal and not moe, "token_table": True},
                "compute": {"batch_size": 8, "shard_tokens": size(400, 150)}})
            loaded = load_model(spec.model)
            shards, _ = plan(spec, loaded.tokenizer)
            m = ShardMiner(spec, loaded)
            return [m.mine(s) for s in shards]

        t0 = time.perf_counter()
        try:
            got = mine(str(dev))
            bad = mismatches(cpu_path(lambda: mine("cpu")), got)
            latents = got[0].stats["blocks.1.hook_resid_post.hook_sae_acts_post"].state_dict()["moments.mean"]
            out[arch] = {"mismatches": len(bad), "first": bad[:5], "latents": len(latents)}
        except Exception as e:  # noqa: BLE001 - each family reports; the stage fails after all have run
            out[arch] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        out[arch]["seconds"] = round(time.perf_counter() - t0, 1)
        print(f"   {arch}: {out[arch]}", flush=True)
    errors = [arch for arch, r in out.items() if "error" in r]
    if errors:
        raise RuntimeError(f"families that failed to mine on {dev}: {', '.join(errors)}; {out}")
    return {"families": out, "with_mismatches": sorted(a for a, r in out.items() if r["mismatches"]),
            "latents": {a: r["latents"] for a, r in out.items()}}


def random_sae(folder: Path, model: Path) -> Path:
    """A random SAELens JumpReLU SAE (4x, with its decoder) on a model's residual stream, written once."""
    from safetensors.torch import save_file

    from mining.architectures import dims
    from mining.models import load_config
    from mining.spec import ModelSpec

    if not (folder / "cfg.json").exists():
        d = dims(load_config(ModelSpec(id=str(model))))["d_model"]
        g = torch.Generator().manual_seed(d)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"W_enc": torch.randn(d, 4 * d, generator=g) / d ** 0.5,
                   "b_enc": torch.randn(4 * d, generator=g) * 0.1, "threshold": torch.rand(4 * d, generator=g) * 0.2,
                   "W_dec": torch.randn(4 * d, d, generator=g), "b_dec": torch.randn(d, generator=g) * 0.1},
                  str(folder / "sae_weights.safetensors"))
        (folder / "cfg.json").write_text(json.dumps({"architecture": "jumprelu", "d_in": d, "d_sae": 4 * d,
                                                     "normalize_activations": "none"}))
    return folder


def timed(fn, n: int = 20) -> float:
    if DRY:  # one call, the host's clock: the dry run checks that it runs, not how fast
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    times = []
    for _ in range(3):
        fn()
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return float(np.median(times))


@stage("ops")
def ops(dev: torch.device) -> dict:
    B, T, N, k = size(64, 4), size(512, 16), size(1536, 64), 32
    x = (torch.randn(B, T, N, device=dev) * torch.rand(N, device=dev)).bfloat16()
    flat = x.view(-1, N)
    tok = torch.arange(B * T, device=dev).view(B, T)
    ftok = tok.view(-1)
    bytes_bf16 = flat.numel() * 2
    out = {"shape": [B * T, N], "copy_ms": timed(lambda: flat.clone())}
    young = TopK(k)
    out["topk_dense_ms"] = timed(lambda: (young.__init__(k), young.update(flat, ftok, check=False)))
    settled = TopK(k)
    settled.update(flat, ftok, check=False)
    fresh = (torch.randn(B * T, N, device=dev) * torch.rand(N, device=dev)).bfloat16()

    def sparse():  # the second batch: thresholds from one batch, about k candidates per column
        keys = settled.keys
        settled.seen = B * T
        settled.update(fresh, ftok + 10**7, check=False)
        settled.keys = keys
    out["topk_sparse_ms"] = timed(sparse)
    out["topk_sparse_capacity"] = settled.sparse_capacity(B * T, N)
    ctx = ContextTopK(k)
    out["contexts_ms"] = timed(lambda: ctx.update(x, tok, check=False, rising=True))
    h = Histogram(HistogramBins())
    out["histogram_ms"] = timed(lambda: h.update(flat))
    out["moments_ms"] = timed(lambda: _batch_moments(flat))
    out["rows_index_ms"] = timed(lambda: flat.index_select(0, torch.arange(B * T, device=dev)))
    out["bf16_read_gb_per_s_clone"] = 2 * bytes_bf16 / (out["copy_ms"] / 1e3) / 1e9
    return out


@stage("kernel_exact")
def kernel_exact(dev: torch.device) -> dict:
    """cuda_layer.cu on the GPU against the CPU reducers, batch by batch, on bfloat16 and float16 data with
    ties and NaN; and every float16 bit pattern's image."""
    out = {"bfloat16": kernel_exact_dtype(dev, torch.bfloat16), "float16": kernel_exact_dtype(dev, torch.float16)}
    out["float16_patterns"] = every_float16(dev)
    with summing(pairs=True):  # the sums of GPUs with slow float64 (T4, L4, RTX), on this one's hardware
        out["bfloat16_float_pairs"] = kernel_exact_dtype(dev, torch.bfloat16)
    out["dla_fused_bfloat16"] = dla_exact(dev, *size((24, 128, 1536), (8, 16, 64)))
    return out


def dla_exact(dev: torch.device, B: int = 24, T: int = 128, N: int = 1536) -> bool:
    """The kernel's read with gains (FusedGain) at the bench's width, against the CPU reducers fed the torch path's
    values: the first-use check's comparison (cuda_layer._same_dla) on a larger batch."""
    from mining.reducers import cuda_layer

    toks = (np.arange(B * T).reshape(B, T) * 2 + 1).astype(np.int64)
    toks[:, 0] = -1
    toks[3] = -1
    toks[:, -1] = -1  # no next token
    return cuda_layer._same_dla(hostile(B * T, N, 2).view(B, T, N), toks, dev, k=8)


@contextmanager
def summing(pairs: bool):
    """The kernel's power sums forced to float32 pairs or float64, whatever this device's float64 rate."""
    from mining.reducers import cuda_layer

    saved = cuda_layer.float_pairs
    cuda_layer.float_pairs = lambda dev: pairs
    try:
        yield
    finally:
        cuda_layer.float_pairs = saved


def every_float16(dev: torch.device) -> bool:
    """All 65,536 float16 patterns, every value a top and bottom candidate (k = all rows): each non-NaN
    value's float32 image, as the kernel converts it, is a key (tests/test_cuda_layer.py, on the device)."""
    from mining.reducers import Moments, cuda_layer

    B, T, N = 4, 1024, 16
    x = torch.from_numpy(np.arange(1 << 16, dtype=np.uint16).view(np.float16).reshape(N, B * T).T.copy()).view(B, T, N)
    toks = np.arange(B * T, dtype=np.int64).reshape(B, T)
    top, bot, hist, mom = TopK(B * T), TopK(B * T, largest=False), Histogram(HistogramBins()), Moments()
    td = torch.from_numpy(toks).to(dev)
    layout = cuda_layer.Layout.of_grid(toks, td)
    capacity = TopK.sparse_capacity
    TopK.sparse_capacity = lambda self, M, N, margin=4: M * N  # the kernel ranks every value, from the first batch
    try:
        cuda_layer.layer_pass(x.to(dev).view(-1, N), layout, top, bot, None, hist, mom)
    finally:
        TopK.sparse_capacity = capacity
    rt, rb, rh = TopK(B * T), TopK(B * T, largest=False), Histogram(HistogramBins())
    flat, tk = x.view(-1, N).float(), torch.from_numpy(toks).view(-1)
    cpu_path(lambda: (rt.update(flat, tk, check=False), rb.update(flat, tk, check=False), rh.update(flat)))
    same = (torch.equal(top.keys.cpu(), rt.keys) and torch.equal(bot.keys.cpu(), rb.keys)
            and torch.equal(hist.finalize().cpu(), rh.finalize()))
    if not same:
        raise AssertionError("float16 patterns: the kernel's images differ from torch's")
    return same


def kernel_exact_dtype(dev: torch.device, dtype: torch.dtype) -> dict:
    from mining.reducers import Moments, cuda_layer

    B, T, N, k = size(24, 8), size(128, 16), size(1536, 64), 8
    x = hostile(B * T, N, 1, dtype).view(B, T, N)
    toks = (np.arange(B * T).reshape(B, T) * 2 + 1).astype(np.int64)
    toks[:, 0] = -1
    toks[3] = -1
    assert cuda_layer.usable(x.to(dev)), "kernel not usable (nvcc missing or build failed)"
    top, bot, ctx, hist, mom = TopK(k), TopK(k, largest=False), ContextTopK(k), Histogram(HistogramBins()), Moments()
    rt, rb, rc, rh, rm = TopK(k), TopK(k, largest=False), ContextTopK(k), Histogram(HistogramBins()), Moments()
    caps = []
    for lo in range(0, B, 4):
        xb = x[lo:lo + 4].contiguous()
        tb = torch.from_numpy(toks[lo:lo + 4].copy())
        xd, td = xb.to(dev), tb.to(dev)
        layout = cuda_layer.Layout.of_grid(toks[lo:lo + 4], td)
        caps.append(top.sparse_capacity(layout.total, N))
        cuda_layer.layer_pass(xd.view(-1, N), layout, top, bot, ctx, hist, mom)

        def ref():
            mined = tb >= 0
            flat = xb.float()[mined]
            rt.update(flat, tb[mined], check=False)
            rb.update(flat, tb[mined], check=False)
            rc.update(xb.float(), tb, check=False, rising=True)
            rh.update(flat)
            rm.update(flat)
        cpu_path(ref)
    out = {"capacities": caps, "overflow": top.overflowed() or bot.overflowed(),
           "top": bool(torch.equal(top.keys.cpu(), rt.keys)), "bottom": bool(torch.equal(bot.keys.cpu(), rb.keys)),
           "contexts": bool(torch.equal(ctx.top.keys.cpu(), rc.top.keys)),
           "histogram": bool(torch.equal(hist.finalize().cpu(), rh.finalize()))}
    a, b = mom.finalize(), rm.finalize()
    fin = np.isfinite(b["std"])
    off = [key for key in ("mean", "std", "skew", "kurtosis", "min", "max", "frac_active")
           if not np.allclose(a[key][fin], b[key][fin], rtol=1e-7, atol=1e-9, equal_nan=True)]
    out["moments"] = not off
    out["moments_off"] = {key: float(np.nanmax(np.abs(a[key][fin] - b[key][fin]))) for key in off}
    out["moments_nonfinite_match"] = bool(np.array_equal(np.isfinite(a["std"]), fin))
    # direct logit attribution: rows without contexts
    rows = size(40_000, 500)
    dla = torch.randn(rows, N, device=dev)
    dtok = torch.arange(rows, device=dev) * 3
    t2, b2, m2 = TopK(k), TopK(k, largest=False), Moments()
    cuda_layer.layer_pass(dla, cuda_layer.Layout.of_rows(dtok), t2, b2, None, None, m2)
    r2, q2 = TopK(k), TopK(k, largest=False)
    cpu_path(lambda: (r2.update(dla.cpu(), dtok.cpu(), check=False), q2.update(dla.cpu(), dtok.cpu(), check=False)))
    out["dla"] = bool(torch.equal(t2.keys.cpu(), r2.keys) and torch.equal(b2.keys.cpu(), q2.keys))
    bad = [key for key in ("top", "bottom", "contexts", "histogram", "moments", "dla") if not out[key]]
    if bad or out["overflow"]:
        raise AssertionError(f"{dtype}: mismatch {bad}: {out}")
    return out


@stage("kernel_ops")
def kernel_ops(dev: torch.device) -> dict:
    """One layer's pass at the bench's shape: the kernel alone, and with the torch ops around it."""
    from mining.reducers import Moments, cuda_layer

    B, T, N, k = size(64, 4), size(512, 16), size(1536, 64), 32
    x = (torch.randn(B, T, N, device=dev) * torch.rand(N, device=dev)).bfloat16()
    toks_np = np.arange(B * T).reshape(B, T).astype(np.int64)
    tok = torch.from_numpy(toks_np).to(dev)
    layout = cuda_layer.Layout.of_grid(toks_np, tok)
    top, bot, ctx, hist, mom = TopK(k), TopK(k, largest=False), ContextTopK(k), Histogram(HistogramBins()), Moments()
    cuda_layer.layer_pass(x.view(-1, N), layout, top, bot, ctx, hist, mom)  # dense first batch
    fresh = (torch.randn(B, T, N, device=dev) * torch.rand(N, device=dev)).bfloat16()
    keys = (top.keys, bot.keys, ctx.top.keys)

    def settled_pass(batches: int = 30):  # thresholds from 30 batches' worth: the steady state's candidate rate
        top.keys, bot.keys, ctx.top.keys = (t.clone() for t in keys)  # the inserts write the keys in place
        top.seen = bot.seen = batches * B * T
        cuda_layer.layer_pass(fresh.view(-1, N), layout, top, bot, ctx, hist, mom)
    out = {"layer_pass_ms": timed(settled_pass), "capacity": top.sparse_capacity(B * T, N)}
    # a job's second batch: thresholds from one batch, about k candidates a column (~49k a list) to group and insert
    out["layer_pass_second_batch_ms"] = timed(lambda: settled_pass(1))
    for pairs in (False, True):  # both ways of summing powers, whichever this device takes by default
        with summing(pairs):
            out[f"layer_pass_{'float_pairs' if pairs else 'float64'}_sums_ms"] = timed(settled_pass)
    lean = Histogram(HistogramBins())
    out["kernel_hist_moments_ctx_ms"] = timed(lambda: cuda_layer.layer_pass(x.view(-1, N), layout, None, None, ctx, lean, mom))
    out["x_read_ms_at_3.4TB/s"] = x.numel() * 2 / 3.4e12 * 1e3
    out.update(dla_ops(x, fresh, layout, k, targets=size(8192, 64)))
    return out


def dla_ops(x: torch.Tensor, fresh: torch.Tensor, layout, k: int, targets: int = 8192) -> dict:
    """One layer's DLA at the same shape (every row with a next token), settled thresholds: DlaBatch's torch path
    (gains gathered per row, times the activations, over the scale: three (M, N) float32 tensors written) and the
    kernel on its values, against the kernel reading the activations with the gains (cuda_layer.Gain)."""
    from mining.reducers import Moments, cuda_layer

    B, T, N = x.shape
    dev = x.device
    table = torch.randn(targets, N, device=dev)
    gain = cuda_layer.Gain(table, torch.randint(0, targets, (B * T,), device=dev, dtype=torch.int32),
                           torch.rand(B * T, device=dev) + 0.5)
    every = torch.arange(B * T, device=dev)
    by_rows = cuda_layer.Layout.of_rows(layout.tok)
    top, bot, mom = TopK(k), TopK(k, largest=False), Moments()
    cuda_layer.layer_pass(fresh.view(-1, N), layout, top, bot, None, None, mom, gain=gain)  # dense first batch
    keys = (top.keys, bot.keys)

    def settled(fused: bool) -> None:
        top.keys, bot.keys = (t.clone() for t in keys)
        top.seen = bot.seen = 30 * B * T
        if fused:
            cuda_layer.layer_pass(x.view(-1, N), layout, top, bot, None, None, mom, gain=gain)
        else:  # Gain.values is the torch path's product and quotient: the same three (M, N) tensors
            cuda_layer.layer_pass(gain.values(x.view(-1, N), every), by_rows, top, bot, None, None, mom)
    return {"dla_torch_then_kernel_ms": timed(lambda: settled(False)), "dla_fused_ms": timed(lambda: settled(True)),
            "dla_capacity": top.sparse_capacity(B * T, N)}


@stage("profile")
def profile(dev: torch.device, model: Path, out: Path, tokens: int = 131072) -> dict:
    """torch.profiler over the bench's mining variant on the random SmolLM2 (after a settle pass, as the
    bench does): where a batch's time goes, on the device and on the host."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from mining.bench import BenchConfig, Workload

    tokens = tokens if dev.type == "cuda" else 512  # a CPU run of the script
    cfg = BenchConfig(model=str(model), tokens=tokens, batch_size=64 if dev.type == "cuda" else 4,
                      context_length=512 if dev.type == "cuda" else 64, dtype="bfloat16" if dev.type == "cuda"
                      else "float32", device=str(dev), corpus="builtin:python-stdlib", parts=("mining",))
    work = Workload(cfg)
    from mining.engine import ShardMiner

    miner = ShardMiner(work.spec("mining"), work.loaded)
    for shard in work.shards:
        miner.raise_floors(miner.mine(shard))
    miner.mine(work.warm)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for shard in work.shards:
            miner.mine(shard)
    device_table = prof.key_averages().table(sort_by="cuda_time_total" if dev.type == "cuda" else "cpu_time_total",
                                             row_limit=30)
    host_table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
    (out / "profile.txt").write_text(device_table + "\n\n" + host_table)
    print(device_table[-6000:], flush=True)
    trace = out / "trace.json"
    prof.export_chrome_trace(str(trace))  # chrome://tracing or ui.perfetto.dev
    with open(trace, "rb") as f, gzip.open(str(trace) + ".gz", "wb") as g:
        shutil.copyfileobj(f, g)
    trace.unlink()
    return {"tokens": work.n_tokens, "remined": miner.remined, **timeline(prof.events(), dev.type == "cuda")}


def timeline(events, on_device: bool, top: int = 12) -> dict:
    """How much of the profiled span the device was busy, and its longest idle gaps with the kernels on either
    side: whatever keeps the GPU waiting (host work, a sync, a slow launch) shows up here, not in per-kernel
    tables. On the CPU (a dry run) the same over the host's ops."""
    from torch.autograd import DeviceType

    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in events
                   if (e.device_type == DeviceType.CUDA) == on_device and e.time_range.end > e.time_range.start)
    if not spans:
        return {"busy_fraction": None}
    gaps, busy, (lo, end, last) = [], 0.0, spans[0]
    start = lo
    for a, b, name in spans[1:]:
        if a > end:
            busy += end - start
            gaps.append((a - end, last, name))
            start = a
        if b > end:
            end, last = b, name
    busy += end - start
    gaps.sort(reverse=True)
    idle = sum(g for g, _, _ in gaps)
    return {"busy_fraction": busy / (end - lo), "span_ms": (end - lo) / 1e3, "idle_ms": idle / 1e3,
            "idle_in_gaps_over_100us_ms": sum(g for g, _, _ in gaps if g > 100) / 1e3,
            "longest_gaps": [{"us": round(g, 1), "after": a[:80], "before": b[:80]} for g, a, b in gaps[:top]]}


SANITIZER_TOOLS = ("memcheck", "racecheck", "synccheck", "initcheck")


def compute_sanitizer() -> str | None:
    """MINING_COMPUTE_SANITIZER (a carried copy, see the module's docstring), else the CUDA toolkit's, else the
    nvidia-cuda-sanitizer-api wheel's (nvidia/cu13/bin), if either is installed."""
    carried = os.environ.get("MINING_COMPUTE_SANITIZER")
    if carried:
        return carried if os.access(carried, os.X_OK) else None
    found = shutil.which("compute-sanitizer") or shutil.which("compute-sanitizer", path="/usr/local/cuda/bin")
    spec = None if found else importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        for wheel in sorted(Path(root).glob("cu*/bin/compute-sanitizer"), reverse=True):
            if os.access(wheel, os.X_OK):
                return str(wheel)
    return found


@stage("sanitize")
def sanitize(config: str, out: Path, scratch: Path) -> dict:
    """This script's kernel_exact stage at toy sizes in a process of its own under each compute-sanitizer tool (at
    most 3 minutes each: run this stage last). A dry run runs the first of those processes without the sanitizer,
    to check the plumbing on the CPU."""
    tool_path = None if DRY else compute_sanitizer()
    if tool_path is None and not DRY:
        return {"skipped": "no compute-sanitizer (CUDA toolkit, or pip install nvidia-cuda-sanitizer-api)"}
    res = {}
    for tool in SANITIZER_TOOLS[:1] if DRY else SANITIZER_TOOLS:  # a dry run checks the plumbing once
        wrap = [] if DRY else [tool_path, "--tool", tool, "--error-exitcode", "7", "--print-limit", "20"]
        inner = [sys.executable, str(Path(__file__).resolve()), "--config", config,
                 "--out", str(out / f"sanitize-{tool}"), "--scratch", str(scratch), "--stages", "kernel_exact",
                 "--small"] + (["--dry-run"] if DRY else [])
        t0 = time.perf_counter()
        try:
            done = subprocess.run(wrap + inner, capture_output=True, text=True, timeout=180)
            text = done.stdout + done.stderr
            lines = text.splitlines()
            summary = [line for line in lines if "ERROR SUMMARY" in line]
            errors = [line for line in lines if line.startswith("========= ") and "ERROR SUMMARY" not in line]
            res[tool] = {"rc": done.returncode, "summary": summary[-1] if summary else None, "report": errors[:40],
                         "tail": text[-1500:] if done.returncode else "", "seconds": round(time.perf_counter() - t0, 1)}
        except subprocess.TimeoutExpired:
            res[tool] = {"rc": None, "summary": "timed out", "seconds": round(time.perf_counter() - t0, 1)}
    bad = [t for t, r in res.items() if r["rc"] != 0]
    if bad:  # every tool reported above; the stage fails with the names
        REPORT["sanitize_tools"] = res
        raise RuntimeError(f"compute-sanitizer found errors or failed: {', '.join(bad)} (report.json: sanitize_tools)")
    return res


@stage("model")
def make_model(config_dir: str, target: Path) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = AutoConfig.from_pretrained(config_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(config_dir).save_pretrained(target)
    return {"params": sum(p.numel() for p in model.parameters())}


def bench(name: str, model: Path, out: Path, tokens: int, env: dict, dev: torch.device, batch_size: str = "64") -> None:
    @stage(name)
    def run() -> dict:
        cmd = [sys.executable, "-c", "import sys; from mining.cli import main; sys.exit(main(sys.argv[1:]))", "bench",
               "--model", str(model), "--device", str(dev), "--dtype", "bfloat16",
               "--batch-size", batch_size if batch_size == "auto" else size(batch_size, "4"),
               "--context-length", size("512", "64"), "--tokens", str(size(tokens, 512)),
               "--corpus", "builtin:python-stdlib", "--parts", "forward,mining,dla", "--repeats", size("3", "1")]
        p = subprocess.run(cmd + ["--json"], capture_output=True, text=True, timeout=size(200, 600),
                           env={**os.environ, **env, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
        (out / f"{name}.log").write_text(p.stderr[-20000:])
        if p.returncode:
            raise RuntimeError(p.stderr[-2000:])
        r = json.loads(p.stdout)
        (out / f"{name}.json").write_text(json.dumps(r, indent=1))
        from mining.bench import format_report

        print(format_report(r), flush=True)
        keys = ("bare_tokens_per_s", "mining_tokens_per_s", "mining_ratio", "dla_tokens_per_s", "dla_ratio",
                "gpu_utilisation")
        return {"batch_size": r["config"]["batch_size"], "batch_fit": r["config"].get("batch_fit"),
                **{k: r.get(k) for k in keys}}
    run()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tokens", type=int, default=524288)
    ap.add_argument("--stages", default="kernel_exact,kernel_ops,bench,miner")
    ap.add_argument("--scratch", default="/tmp/gpu_check", help="where the random model and tiny model are kept")
    ap.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU, the kernel emulated")
    ap.add_argument("--small", action="store_true", help="toy sizes on the device (the sanitize stage's runs)")
    a = ap.parse_args()
    if a.small:
        global SMALL
        SMALL = True
    if a.dry_run:
        global DRY
        DRY = True
        a.device = "cpu"
        os.environ["MINING_CUDA_EMULATE"] = "1"
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    global REPORT_PATH
    REPORT_PATH = out / "report.json"
    dev = torch.device(a.device)
    REPORT["env"] = {"torch": torch.__version__, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"}
    if dev.type == "cuda":  # built with nvcc and passed its first-use check (cuda_layer.proves_itself), or the torch ops
        from mining.reducers import cuda_layer

        t0 = time.perf_counter()
        REPORT["env"]["cuda_layer"] = {"nvcc": cuda_layer.nvcc(), "trusted": cuda_layer.library(dev) is not None,
                                       "build_and_check_s": round(time.perf_counter() - t0, 1)}
        if REPORT["env"]["cuda_layer"]["trusted"]:
            REPORT["env"]["cuda_layer"].update(smem_limit_bytes=cuda_layer.smem_limit(dev),
                                               sums="float32 pairs" if cuda_layer.float_pairs(dev) else "float64")
    print(REPORT["env"], flush=True)
    os.environ["MINING_DEVICE_PATH"] = "1"  # the CPU reference runs unset it; on a GPU it changes nothing
    os.environ["MINING_KERNELS"] = "torch"  # CPU references on the torch code (bit-identical; no numba compile)
    scratch = Path(a.scratch)
    stages = a.stages.split(",")
    model = scratch / "smollm2-random"
    try:
        for s in stages:
            os.environ["MINING_DEVICE_PATH"] = "1"
            if s == "exact":
                exact(dev)
            elif s == "bench":
                if not model.exists():
                    make_model(a.config, model)
                bench("bench", model, out, a.tokens, {}, dev)
            elif s == "bench_auto":
                if not model.exists():
                    make_model(a.config, model)
                bench("bench_auto", model, out, a.tokens, {}, dev, batch_size="auto")
            elif s == "ops":
                ops(dev)
            elif s == "kernel_exact":
                kernel_exact(dev)
            elif s == "kernel_ops":
                kernel_ops(dev)
            elif s == "miner":
                miner(dev, a.config, scratch)
            elif s == "families":
                families(dev, a.config, scratch)
            elif s == "profile":
                if not model.exists():
                    make_model(a.config, model)
                profile(dev, model, out)
            elif s == "sanitize":
                sanitize(a.config, out, scratch)
    finally:
        REPORT_PATH.write_text(json.dumps(REPORT, indent=1, default=str))
        print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "trace"} for k, v in REPORT.items()},
                         indent=1, default=str), flush=True)
    failed = [name for name, r in REPORT.items() if isinstance(r.get("ok"), bool) and not r["ok"]]
    if failed:
        sys.exit(f"gpu_check: {', '.join(failed)} failed (report.json has each one's error)")


if __name__ == "__main__":
    main()
