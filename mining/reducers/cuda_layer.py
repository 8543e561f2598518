"""The GPU's single read of a hook's activations for top-k, bottom-k, top contexts, histogram and moments.

reducers/device.py does each reducer with torch ops: every reducer reads the (B, T, N) batch again and
the histogram is one global atomic per value, about 8 ms a layer for a 64 x 512 x 1536 bfloat16 batch on
an H200 (a forward pass of SmolLM2-135M's layer takes ~2.4 ms). cuda_layer.cu reads the batch once, counts
histograms in shared memory, and leaves per-context partial moments, context peaks and the (few) top/bottom
candidates, which the torch ops here turn into the reducers' states, the same states as the other paths.

The kernel is compiled with nvcc on first use (cached under ~/.cache/activation-mining/cuda) and called
through ctypes on torch's current stream. Without nvcc, or with MINING_CUDA_LAYER=0, the caller keeps the
torch ops. MINING_CUDA_EMULATE=1 builds it for the CPU instead (tests: one std::thread per CUDA thread).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import device
from .device import upload
from .topk import EMPTY, MAX_TOK, _add_batch, decode, encode

HERE = Path(__file__).resolve().parent
SOURCES = ("cuda_layer.cu", "cuda_emulate.h")
PER_BLOCK = 4
"""Contexts per block: enough rows that zeroing and flushing the shared histogram is a small overhead."""
DLA_ROWS = 512
"""Rows per pseudo-context when the rows have no contexts (direct logit attribution)."""


class Params(ctypes.Structure):
    _fields_ = [("x", ctypes.c_void_p), ("tok", ctypes.c_void_p), ("first", ctypes.c_void_p),
                ("M", ctypes.c_int64), ("N", ctypes.c_int64), ("T", ctypes.c_int64),
                ("n_ctx", ctypes.c_int64), ("per_block", ctypes.c_int64),
                ("top_o", ctypes.c_void_p), ("top_tok", ctypes.c_void_p),
                ("bot_o", ctypes.c_void_p), ("bot_tok", ctypes.c_void_p),
                ("top_cand", ctypes.c_void_p), ("top_count", ctypes.c_void_p),
                ("bot_cand", ctypes.c_void_p), ("bot_count", ctypes.c_void_p),
                ("cap", ctypes.c_int64),
                ("counts", ctypes.c_void_p),
                ("shift", ctypes.c_int32), ("base", ctypes.c_int32), ("R", ctypes.c_int32),
                ("zero_bin", ctypes.c_int32), ("nb", ctypes.c_int32),
                ("mean", ctypes.c_void_p), ("m2", ctypes.c_void_p), ("m3", ctypes.c_void_p), ("m4", ctypes.c_void_p),
                ("vmin", ctypes.c_void_p), ("vmax", ctypes.c_void_p), ("active", ctypes.c_void_p),
                ("cnt", ctypes.c_void_p), ("peak_o", ctypes.c_void_p), ("peak_pos", ctypes.c_void_p)]


_lib: dict[str, object] = {}


def emulated() -> bool:
    return os.environ.get("MINING_CUDA_EMULATE") == "1"


def _build(emulate: bool) -> ctypes.CDLL | None:
    """Compile once per source and target; None (the torch ops stay) if the compiler is missing or fails."""
    if emulate:
        compiler = shutil.which("g++")
        flags = ["-std=c++20", "-O1", "-DEMULATE", "-shared", "-fPIC", "-pthread", "-xc++"]
        target = "emulate"
    else:
        compiler = shutil.which("nvcc") or (shutil.which("nvcc", path="/usr/local/cuda/bin"))
        major, minor = torch.cuda.get_device_capability()
        flags = ["-O3", f"-arch=sm_{major}{minor}", "-shared", "-Xcompiler", "-fPIC"]
        target = f"sm_{major}{minor}"
    if compiler is None:
        return None
    digest = hashlib.sha256(b"".join((HERE / s).read_bytes() for s in SOURCES) + " ".join(flags).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("MINING_CACHE_DIR", Path.home() / ".cache" / "activation-mining")) / "cuda"
    lib = cache / f"layer-{target}-{digest}.so"
    if not lib.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            out = Path(tmp) / lib.name
            cmd = [compiler, *flags, "-I", str(HERE), "-o", str(out), str(HERE / "cuda_layer.cu")]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"cuda_layer: build failed, torch ops instead: {done.stderr.strip()[-500:]}", file=sys.stderr)
                return None
            os.replace(out, lib)  # whole or not at all: another process may be building the same file
    so = ctypes.CDLL(str(lib))
    so.layer_launch.argtypes = [ctypes.POINTER(Params), ctypes.c_int, ctypes.c_void_p]
    so.layer_launch.restype = ctypes.c_int
    so.layer_smem_bytes.argtypes = [ctypes.c_int32]
    so.layer_smem_bytes.restype = ctypes.c_int64
    return so


def library():
    key = "emulate" if emulated() else "cuda"
    if key not in _lib:
        _lib[key] = _build(emulated())
    return _lib[key]


def usable(x: torch.Tensor) -> bool:
    """A contiguous bfloat16/float32 batch on a GPU (or on the CPU under MINING_CUDA_EMULATE=1)."""
    if os.environ.get("MINING_CUDA_LAYER") == "0" or x.dtype not in (torch.bfloat16, torch.float32):
        return False
    if not x.is_contiguous() or not (x.is_cuda or (emulated() and device.forced())):
        return False
    return library() is not None


@dataclass(frozen=True)
class Layout:
    """How a batch's rows form contexts, from the host (no device reads): rows T per context."""

    T: int
    first: torch.Tensor  # (C,) int32 first mined row of each context, -1 = none
    counts: torch.Tensor  # (C,) float64 mined rows of each context
    total: int  # mined rows in all
    tok: torch.Tensor  # (C * T,) int64 global token index of every row, -1 = not mined

    @classmethod
    def of_grid(cls, toks_np: np.ndarray, tok: torch.Tensor) -> "Layout":
        mined = toks_np >= 0
        counts = mined.sum(axis=1)
        first = np.where(counts > 0, mined.argmax(axis=1), -1).astype(np.int32)
        return cls(toks_np.shape[1], upload(first, tok.device), upload(counts.astype(np.float64), tok.device),
                   int(counts.sum()), tok.reshape(-1))

    @classmethod
    def of_rows(cls, tok: torch.Tensor) -> "Layout":
        """M rows, all mined, cut into pseudo-contexts of DLA_ROWS rows."""
        M = tok.shape[0]
        C = -(-M // DLA_ROWS)
        counts = np.minimum(DLA_ROWS, M - DLA_ROWS * np.arange(C)).astype(np.float64)
        return cls(DLA_ROWS, upload(np.zeros(C, np.int32), tok.device), upload(counts, tok.device), M, tok)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _threshold(t, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The column's k-th key as (float32 image int32, tok) for the kernel's comparison; a free slot takes all."""
    thr = t.threshold()
    kth, kth_tok = decode(thr, largest)
    return device.ordered(kth.contiguous()).contiguous(), kth_tok.masked_fill_(thr == EMPTY, MAX_TOK + 1).contiguous()


def layer_pass(x: torch.Tensor, layout: Layout, top, bottom, contexts, histogram, moments) -> None:
    """x (rows, N) contiguous, rows = contexts x layout.T. top/bottom: TopK (largest, smallest) or None;
    contexts: ContextTopK or None; histogram: Histogram or None; moments: Moments."""
    dev, (M, N) = x.device, x.shape
    C = layout.first.shape[0]
    for t in (top, bottom, contexts.top if contexts is not None else None):
        if t is not None:
            t._start(N, dev)
    caps = [t.sparse_capacity(layout.total, N) for t in (top, bottom) if t is not None]
    cap = 0 if not caps or any(c is None for c in caps) else max(caps)
    f64 = dict(dtype=torch.float64, device=dev)
    out = {k: torch.empty(C, N, **f64) for k in ("mean", "m2", "m3", "m4")}
    out.update(vmin=torch.empty(C, N, dtype=torch.float32, device=dev), vmax=torch.empty(C, N, dtype=torch.float32, device=dev),
               active=torch.empty(C, N, dtype=torch.int32, device=dev), cnt=torch.empty(C, N, dtype=torch.int32, device=dev))
    if contexts is not None:
        out.update(peak_o=torch.empty(C, N, dtype=torch.int32, device=dev), peak_pos=torch.empty(C, N, dtype=torch.int32, device=dev))
    p = Params(x=_ptr(x), tok=_ptr(layout.tok), first=_ptr(layout.first), M=M, N=N, T=layout.T, n_ctx=C,
               per_block=PER_BLOCK, cap=cap)
    keep = []
    if cap:
        (to, tt), (bo, bt) = _threshold(top, True), _threshold(bottom, False)
        cand = torch.empty(2, cap, dtype=torch.int64, device=dev)
        count = torch.zeros(2, dtype=torch.int32, device=dev)
        keep += [to, tt, bo, bt, cand, count]
        p.top_o, p.top_tok, p.bot_o, p.bot_tok = _ptr(to), _ptr(tt), _ptr(bo), _ptr(bt)
        p.top_cand, p.bot_cand = _ptr(cand[0]), _ptr(cand[1])
        p.top_count, p.bot_count = count.data_ptr(), count.data_ptr() + 4
    if histogram is not None:
        b = histogram.bins
        if histogram._counts is None:
            histogram._counts = torch.zeros(N, b.n_bins, dtype=torch.int64, device=dev)
        p.counts = _ptr(histogram._counts)
        p.shift, p.base, p.R, p.zero_bin, p.nb = (23 - b.mantissa_bits, (b.min_exp + 127) << b.mantissa_bits, b.n_regular,
                                                  b.zero_bin, b.n_bins)
    for k, v in out.items():
        setattr(p, k, _ptr(v))
    stream = None if not x.is_cuda else torch.cuda.current_stream(dev).cuda_stream
    err = library().layer_launch(ctypes.byref(p), int(x.dtype == torch.bfloat16), stream)
    if err:
        raise RuntimeError(f"cuda_layer: kernel launch failed (CUDA error {err})")
    if cap:
        for i, t in enumerate((top, bottom)):
            _merge_candidates(t, cand[i], count[i], x, layout.tok, N)
    elif top is not None:
        flat_rows = torch.nonzero_static(layout.tok >= 0, size=layout.total).view(-1)  # host-known size: no sync
        rows = x.index_select(0, flat_rows)
        device.topk_update(top, rows, layout.tok[flat_rows])
        device.topk_update(bottom, rows, layout.tok[flat_rows])
    if top is not None and cap:
        top.seen += layout.total
        bottom.seen += layout.total
    if contexts is not None:
        tok2 = layout.tok.view(C, layout.T)
        pos = out["peak_pos"].clamp(0, layout.T - 1).long()
        keys = (out["peak_o"].long() * 2**31 + (MAX_TOK - tok2.gather(1, pos)))
        keys.masked_fill_(out["peak_o"] == device.INT32_MIN, EMPTY)
        contexts.top.keys = _add_batch(contexts.top.keys, contexts.top._floored(keys, None), contexts.top.k)
    if moments is not None:
        moments.add_batch(_combine_contexts(layout, out))


def _merge_candidates(t, cand: torch.Tensor, count: torch.Tensor, x: torch.Tensor, tok: torch.Tensor, N: int) -> None:
    cap = cand.shape[0]
    t.flag_overflow(count > cap)  # some candidates did not fit: the miner mines the shard again, densely
    valid = torch.arange(cap, device=cand.device) < count
    c = torch.where(valid, cand, 0)
    row, col = c // N, c % N
    keys = encode(x[row, col].float(), tok[row], t.largest).masked_fill_(~valid, EMPTY)
    t.keys = device.merge_sparse(t.keys, t._floored(keys, col), col.masked_fill(~valid, N), t.k)


def _combine_contexts(layout: Layout, out: dict[str, torch.Tensor]) -> dict:
    """The batch's moments from the contexts' (count, mean, central sums): exact algebra, no second read."""
    w = layout.counts[:, None]
    has = w > 0
    mean_c = torch.where(has, out["mean"], 0.0)
    mu = (w * mean_c).sum(0) / layout.total
    d = torch.where(has, mean_c - mu, 0.0)
    m2, m3, m4 = out["m2"], out["m3"], out["m4"]
    d2 = d * d
    return {"count": layout.total, "mean": mu, "m2": (m2 + w * d2).sum(0),
            "m3": (m3 + 3 * d * m2 + w * d2 * d).sum(0),
            "m4": (m4 + 4 * d * m3 + 6 * d2 * m2 + w * d2 * d2).sum(0),
            "n_active": out["active"].sum(0, dtype=torch.int64),
            "min": out["vmin"].amin(0).double(), "max": out["vmax"].amax(0).double()}
