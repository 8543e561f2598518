"""A hook's standard reducers on the GPU: one read of the activations, states updated in place.

reducers/device.py does each reducer with torch ops: every reducer reads the (B, T, N) batch again and
the histogram is one global atomic per value, about 8 ms a layer for a 64 x 512 x 1536 bfloat16 batch on
an H200 (the model's own layer takes ~2.4 ms). cuda_layer.cu reads the batch once (histograms counted in
shared memory, per-context moments and peaks, the few top/bottom candidates), then its finishing kernels
fold those into the reducers' tensors: one library call per layer, no torch op in between. The states are
the ones the other paths leave (keys and counts bit for bit, moments to rounding).

The kernel is compiled with nvcc on first use (cached under ~/.cache/activation-mining/cuda), checked on
the device against the CPU reducers (`proves_itself`), and called through ctypes on torch's current stream.
nvcc is the one on PATH or in /usr/local/cuda, else the one the nvidia-cuda-nvcc wheel installs (`pip install
activation-mining[cuda]`) when its CUDA major version is torch's. Without nvcc, after a failed build or check,
or with MINING_CUDA_LAYER=0, the caller keeps the torch ops. MINING_CUDA_EMULATE=1 (with MINING_DEVICE_PATH=1)
builds it for the CPU instead: a fiber per CUDA thread, switched at __syncthreads, for the tests;
MINING_CUDA_EMULATE_FLAGS adds g++ flags to that build (tests/test_cuda_sanitized.py: AddressSanitizer and UBSan, which
find an out-of-bounds read that the exactness checks cannot see, since the value read is never used).
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from . import device
from .device import upload

HERE = Path(__file__).resolve().parent
SOURCES = ("cuda_layer.cu", "cuda_emulate.h")
PER_BLOCK = 4
"""Contexts per block: enough rows that zeroing and flushing the shared histogram is a small overhead."""
MAX_ROW_BLOCKS = 16
"""At most this many blocks down the rows (more contexts per block beyond): the histogram partials they
write, row blocks x N x bins int32, stay bounded (16 x 1,536 x 645 x 4 B = 63 MB for SmolLM2)."""
CAP_MARGIN = 32
"""Candidate lists 32 times the expected count: the kernels read only the candidates found, so a wide list
costs 20 bytes an entry (key, column, and its grouped copy) and spares the shard a dense re-mine when a batch
is lumpy."""
X_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
"""The activations' dtypes the kernel reads, and its codes for them (X_FLOAT32, X_BFLOAT16, X_FLOAT16)."""
DLA_ROWS = 512
"""Rows per pseudo-context when the rows have no contexts (direct logit attribution)."""


class Ranked(ctypes.Structure):
    _fields_ = [("keys", ctypes.c_void_p), ("floor", ctypes.c_void_p), ("k", ctypes.c_int64),
                ("cand_key", ctypes.c_void_p), ("cand_col", ctypes.c_void_p), ("count", ctypes.c_void_p),
                ("overflow", ctypes.c_void_p), ("fill", ctypes.c_void_p), ("start", ctypes.c_void_p),
                ("sorted", ctypes.c_void_p)]


class Params(ctypes.Structure):
    _fields_ = [("x", ctypes.c_void_p), ("tok", ctypes.c_void_p), ("first", ctypes.c_void_p),
                ("ctx_count", ctypes.c_void_p),
                ("M", ctypes.c_int64), ("N", ctypes.c_int64), ("T", ctypes.c_int64),
                ("n_ctx", ctypes.c_int64), ("per_block", ctypes.c_int64), ("cap", ctypes.c_int64),
                ("top", Ranked), ("bottom", Ranked), ("ctx", Ranked),
                ("counts", ctypes.c_void_p), ("hist_part", ctypes.c_void_p),
                ("shift", ctypes.c_int32), ("base", ctypes.c_int32), ("R", ctypes.c_int32),
                ("zero_bin", ctypes.c_int32), ("nb", ctypes.c_int32),
                ("c_mean", ctypes.c_void_p), ("c_m2", ctypes.c_void_p), ("c_m3", ctypes.c_void_p),
                ("c_m4", ctypes.c_void_p), ("c_min", ctypes.c_void_p), ("c_max", ctypes.c_void_p),
                ("c_active", ctypes.c_void_p), ("c_key", ctypes.c_void_p),
                ("mean", ctypes.c_void_p), ("m2", ctypes.c_void_p), ("m3", ctypes.c_void_p), ("m4", ctypes.c_void_p),
                ("vmin", ctypes.c_void_p), ("vmax", ctypes.c_void_p), ("n_active", ctypes.c_void_p),
                ("n_before", ctypes.c_double), ("zero", ctypes.c_void_p), ("zero_bytes", ctypes.c_int64),
                ("sums", ctypes.c_int32), ("gain", ctypes.c_void_p), ("gain_row", ctypes.c_void_p),
                ("row_scale", ctypes.c_void_p)]


@dataclass(frozen=True)
class Gain:
    """Direct logit attribution fused into the kernel's read: the value of row i, column n is
    (x[i, n] * table[row[i], n]) / scale[i] in float32, the bits DlaBatch's torch product and quotient give, so a
    layer's (M, N) attributions are never written out (see DlaBatch.gain)."""

    table: torch.Tensor  # (U, N) float32, contiguous: each distinct target's gains
    row: torch.Tensor  # (rows,) int32: each row's target among them (any valid index where the row is not mined)
    scale: torch.Tensor  # (rows,) float32: the final norm's scale at each row's position

    def values(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The (len(rows), N) float32 values of x's `rows`, as the kernel takes them (for the torch ops around it)."""
        product = self.table.index_select(0, self.row.index_select(0, rows).long())
        return product.mul_(x.index_select(0, rows)).div_(self.scale.index_select(0, rows)[:, None])


SUMS_FLOAT64, SUMS_FLOAT_PAIRS = 0, 1
"""How the kernel sums a context's powers (cuda_layer.cu, Float64Sums and FloatPairSums)."""
SLOW_FP64 = 8
"""A device whose float64 runs this many times slower than its float32, or more, sums in float32 pairs: a T4 (32),
an L4, A10 or RTX (64); an A100, H100 or H200 (2) keeps float64."""


_lib: dict[str, object] = {}
_smem_limit: dict[tuple[str, int], int] = {}
_fp64_ratio: dict[tuple[str, int], int] = {}


def emulated() -> bool:
    return os.environ.get("MINING_CUDA_EMULATE") == "1"


def nvcc(cuda: str | None = torch.version.cuda) -> str | None:
    """A system nvcc first (it matches the machine's driver), then the nvidia-cuda-nvcc wheel's
    (site-packages/nvidia/cu13/bin/nvcc) if its CUDA major version is torch's (`cuda`): the library links the CUDA
    runtime statically, so a newer major than torch's could ask for a newer driver than the machine has."""
    found = shutil.which("nvcc") or shutil.which("nvcc", path="/usr/local/cuda/bin")
    if found:
        return found
    major = (cuda or "").split(".")[0]
    spec = importlib.util.find_spec("nvidia") if major else None
    for root in (spec.submodule_search_locations or []) if spec else []:
        wheel = Path(root) / f"cu{major}" / "bin" / "nvcc"
        if os.access(wheel, os.X_OK):
            return str(wheel)
    return None


def nvcc_flags(arch: str) -> list[str]:
    """arch: sm_90 and the like (the device's compute capability)."""
    return ["-O3", f"-arch={arch}", "-shared", "-Xcompiler", "-fPIC"]


def compile_command(compiler: str, flags: list[str], out: Path) -> list[str]:
    return [compiler, *flags, "-I", str(HERE), "-o", str(out), str(HERE / "cuda_layer.cu")]


def _build(emulate: bool) -> ctypes.CDLL | None:
    """Compile once per source and target; None (the torch ops stay) if the compiler is missing or fails."""
    if emulate:
        compiler = shutil.which("g++")
        flags = ["-std=c++20", "-O1", "-DEMULATE", "-shared", "-fPIC", "-pthread", "-xc++",
                 *os.environ.get("MINING_CUDA_EMULATE_FLAGS", "").split()]
        target = "emulate"
    else:
        compiler = nvcc()
        major, minor = torch.cuda.get_device_capability()
        target = f"sm_{major}{minor}"
        flags = nvcc_flags(target)
    if compiler is None:
        return None
    digest = hashlib.sha256(b"".join((HERE / s).read_bytes() for s in SOURCES) + " ".join(flags).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("MINING_CACHE_DIR", Path.home() / ".cache" / "activation-mining")) / "cuda"
    lib = cache / f"layer-{target}-{digest}.so"
    if not lib.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            out = Path(tmp) / lib.name
            done = subprocess.run(compile_command(compiler, flags, out), capture_output=True, text=True)
            if done.returncode != 0:
                print(f"cuda_layer: build failed, torch ops instead: {done.stderr.strip()[-500:]}", file=sys.stderr)
                return None
            os.replace(out, lib)  # whole or not at all: another process may be building the same file
    so = ctypes.CDLL(str(lib))
    so.layer_update.argtypes = [ctypes.POINTER(Params), ctypes.c_int, ctypes.c_void_p]
    so.layer_update.restype = ctypes.c_int
    so.layer_row_blocks.argtypes = [ctypes.c_int64, ctypes.c_int64]
    so.layer_row_blocks.restype = ctypes.c_int64
    so.layer_smem_bytes.argtypes = [ctypes.c_int32]
    so.layer_smem_bytes.restype = ctypes.c_int64
    so.layer_smem_limit.argtypes = [ctypes.c_int32]
    so.layer_smem_limit.restype = ctypes.c_int64
    so.layer_fp64_ratio.argtypes = [ctypes.c_int32]
    so.layer_fp64_ratio.restype = ctypes.c_int32
    return so


def library(dev: torch.device | None = None):
    """The built kernel, or None (the torch ops stay). On a GPU it must first pass `proves_itself` on `dev`."""
    key = "emulate" if emulated() else "cuda"
    if key not in _lib:
        _lib[key] = _build(emulated())
        if _lib[key] is not None and key == "cuda" and not proves_itself(dev or torch.device("cuda")):
            _lib[key] = None
    return _lib[key]


def _device_key(dev: torch.device) -> tuple[str, int]:
    index = dev.index if dev.index is not None else (torch.cuda.current_device() if dev.type == "cuda" else 0)
    return "emulate" if emulated() else "cuda", index


def smem_limit(dev: torch.device) -> int:
    """The shared memory a block of the kernel may opt in to on `dev`, in bytes (asked once a device)."""
    key = _device_key(dev)
    if key not in _smem_limit:
        _smem_limit[key] = library(dev).layer_smem_limit(key[1])
    return _smem_limit[key]


def float_pairs(dev: torch.device) -> bool:
    """Whether the kernel sums powers in float32 pairs on `dev` (its float64 is slow: SLOW_FP64) or in float64."""
    key = _device_key(dev)
    if key not in _fp64_ratio:
        _fp64_ratio[key] = library(dev).layer_fp64_ratio(key[1])
    return _fp64_ratio[key] >= SLOW_FP64


def histogram_fits(n_bins: int, dev: torch.device) -> bool:
    """Whether the kernel's per-block histogram (16 columns x n_bins x 4 B) fits `dev`'s shared memory: the
    default 645 bins (45 KB) fit every GPU since Turing; finer ones may not (1,285 bins, 86 KB, on a T4)."""
    return library(dev).layer_smem_bytes(n_bins) <= smem_limit(dev)


@contextmanager
def _cpu_reference() -> Iterator[None]:
    """The CPU reducers' own torch code for the block (no device path, no numba compile)."""
    saved = {name: os.environ.get(name) for name in ("MINING_DEVICE_PATH", "MINING_KERNELS")}
    os.environ.pop("MINING_DEVICE_PATH", None)
    os.environ["MINING_KERNELS"] = "torch"
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def proves_itself(dev: torch.device) -> bool:
    """The kernel's first use in a process: five small batches with ties, NaN and infinities (dense first, then
    through the candidate lists), in each dtype it reads and with the sums the device takes (float_pairs), must
    leave the states the CPU reducers leave: keys and counts bit for bit, moments to 1e-9. A library built for the
    wrong driver, or miscompiled, then costs one line on stderr and the torch ops, not a crash or a wrong result.
    A few milliseconds, once."""
    gen = torch.Generator().manual_seed(0)
    B, T, N = 15, 40, 37  # 37 columns: a partial block
    x = (torch.randn(B, T, N, generator=gen) * 3).round(decimals=1)  # ties
    flat = x.view(-1)
    flat[::97], flat[::89], flat[::83] = float("nan"), float("inf"), float("-inf")
    toks = np.arange(B * T, dtype=np.int64).reshape(B, T) * 2 + 5
    toks[:, 0] = -1  # unmined first positions
    toks[4] = -1  # a context with nothing mined
    try:
        for dtype in X_DTYPES:
            if not _same_states(x.to(dtype), toks, dev):
                raise ValueError(f"its states differ from the CPU reducers' in {dtype}")
            if not _same_dla(x.to(dtype), toks, dev):
                raise ValueError(f"its direct logit attributions differ from the CPU reducers' in {dtype}")
        return True
    except Exception as e:  # noqa: BLE001 - whatever went wrong, the torch ops are the safe answer
        print(f"cuda_layer: the kernel failed its check on {dev} ({type(e).__name__}: {e}); torch ops instead",
              file=sys.stderr)
        return False


def _same_states(x: torch.Tensor, toks: np.ndarray, dev: torch.device, k: int = 2) -> bool:
    """x (B, T, N) on the host, mined by the kernel on dev three contexts a batch and by the CPU reducers."""
    from . import ContextTopK, Histogram, HistogramBins, Moments, TopK

    def fresh():
        return TopK(k), TopK(k, largest=False), ContextTopK(k), Histogram(HistogramBins()), Moments()

    batches = [slice(lo, lo + 3) for lo in range(0, x.shape[0], 3)]
    top, bottom, ctx, hist, mom = got = fresh()
    xd = x.to(dev)
    for sl in batches:
        tok = torch.from_numpy(np.ascontiguousarray(toks[sl])).to(dev)
        layer_pass(xd[sl].reshape(-1, x.shape[-1]).contiguous(), Layout.of_grid(toks[sl], tok), *got)
    ref = fresh()
    with _cpu_reference():
        for sl in batches:
            xb, tb = x[sl].float(), torch.from_numpy(toks[sl])
            mined = tb >= 0
            ref[0].update(xb[mined], tb[mined], check=False)
            ref[1].update(xb[mined], tb[mined], check=False)
            ref[2].update(xb, tb, check=False, rising=True)
            ref[3].update(xb[mined])
            ref[4].update(xb[mined])
    same = not top.overflowed() and not bottom.overflowed()
    same &= all(torch.equal(a.cpu(), b) for a, b in ((top.keys, ref[0].keys), (bottom.keys, ref[1].keys),
                                                      (ctx.top.keys, ref[2].top.keys)))
    same &= torch.equal(hist.finalize().cpu(), ref[3].finalize())
    a, b = mom.finalize(), ref[4].finalize()
    same &= all(np.array_equal(a[key], b[key], equal_nan=True) for key in ("count", "frac_active", "min", "max"))
    return same and all(np.allclose(a[key], b[key], rtol=1e-9, atol=1e-12, equal_nan=True) for key in ("mean", "std"))


def _same_dla(x: torch.Tensor, toks: np.ndarray, dev: torch.device, k: int = 2) -> bool:
    """The read with gains (Gain, a kernel of its own) on the same batches against the CPU reducers fed Gain.values."""
    from . import Moments, TopK

    gen = torch.Generator().manual_seed(1)
    B, T, N = x.shape
    x = x.clone()  # half the columns finite: there infinities would not show a wrong scale, nor NaN wrong moments
    x[..., :N // 2] = torch.nan_to_num(x[..., :N // 2].float(), nan=0.5, posinf=4.0, neginf=-4.0).to(x.dtype)
    table = torch.randn(5, N, generator=gen)
    target = torch.randint(0, 5, (B * T,), generator=gen, dtype=torch.int32)
    scale = torch.rand(B * T, generator=gen) + 0.5
    on_dev = [t.to(dev) for t in (x, table, target, scale)]
    (top, bottom, mom), ref = ((TopK(k), TopK(k, largest=False), Moments()) for _ in range(2))
    for lo in range(0, B, 3):
        rows, tb = slice(lo * T, (lo + 3) * T), np.ascontiguousarray(toks[lo:lo + 3])
        xd, td, gd, sd = on_dev[0][lo:lo + 3].reshape(-1, N), on_dev[1], on_dev[2][rows], on_dev[3][rows]
        layer_pass(xd, Layout.of_grid(tb, torch.from_numpy(tb).to(dev)), top, bottom, None, None, mom,
                   gain=Gain(td, gd, sd))
        sel = torch.from_numpy(np.flatnonzero(tb.reshape(-1) >= 0))
        with _cpu_reference():
            values = Gain(table, target[rows], scale[rows]).values(x[lo:lo + 3].reshape(-1, N), sel)
            ref[0].update(values, torch.from_numpy(tb.reshape(-1))[sel], check=False)
            ref[1].update(values, torch.from_numpy(tb.reshape(-1))[sel], check=False)
            ref[2].update(values)
    same = not top.overflowed() and not bottom.overflowed()
    same &= torch.equal(top.keys.cpu(), ref[0].keys) and torch.equal(bottom.keys.cpu(), ref[1].keys)
    a, b = mom.finalize(), ref[2].finalize()
    same &= all(np.array_equal(a[key], b[key], equal_nan=True) for key in ("count", "frac_active", "min", "max"))
    return same and all(np.allclose(a[key], b[key], rtol=1e-9, atol=1e-12, equal_nan=True) for key in ("mean", "std"))


def usable(x: torch.Tensor) -> bool:
    """A contiguous float32/bfloat16/float16 batch on a GPU (or on the CPU under MINING_CUDA_EMULATE=1)."""
    if os.environ.get("MINING_CUDA_LAYER") == "0" or x.dtype not in X_DTYPES:
        return False
    if not x.is_contiguous() or not (x.is_cuda or (emulated() and device.forced())):
        return False
    return library(x.device) is not None


@dataclass(frozen=True)
class Layout:
    """How a batch's rows form contexts, from the host (no device reads): rows T per context."""

    T: int
    first: torch.Tensor  # (C,) int32 first mined row of each context, -1 = none
    counts: torch.Tensor  # (C,) float64 mined rows of each context
    total: int  # mined rows in all
    tok: torch.Tensor  # (C * T,) int64 global token index of every row, -1 = not mined
    rows: torch.Tensor | None = None  # (total,) the mined rows' index (the batch's own); None: every row

    @classmethod
    def of_grid(cls, toks_np: np.ndarray, tok: torch.Tensor, rows: torch.Tensor | None = None) -> "Layout":
        """toks_np (C, T) on the host, tok its device copy, rows the flat index of its mined positions on the
        device (the batch has it already; built here if not)."""
        mined = toks_np >= 0
        counts = mined.sum(axis=1)
        first = np.where(counts > 0, mined.argmax(axis=1), -1).astype(np.int32)
        if rows is None:
            rows = upload(np.flatnonzero(mined), tok.device)
        return cls(toks_np.shape[1], upload(first, tok.device), upload(counts.astype(np.float64), tok.device),
                   int(counts.sum()), tok.reshape(-1), rows)

    @classmethod
    def of_rows(cls, tok: torch.Tensor) -> "Layout":
        """M rows, all mined, cut into pseudo-contexts of DLA_ROWS rows."""
        M = tok.shape[0]
        C = -(-M // DLA_ROWS)
        counts = np.minimum(DLA_ROWS, M - DLA_ROWS * np.arange(C)).astype(np.float64)
        return cls(DLA_ROWS, upload(np.zeros(C, np.int32), tok.device), upload(counts, tok.device), M, tok)


class Workspace:
    """One scratch allocation per call, cut into aligned pieces (one allocation instead of a dozen)."""

    def __init__(self, sizes: dict[str, int], dev: torch.device):
        self.offsets, total = {}, 0
        for name, size in sizes.items():
            self.offsets[name] = total
            total += -(-size // 256) * 256
        self.buf = torch.empty(max(total, 1), dtype=torch.uint8, device=dev)
        self.base = self.buf.data_ptr()

    def ptr(self, name: str) -> int:
        return self.base + self.offsets[name]


def _ranked(t, cap: int, ws: Workspace | None, prefix: str) -> Ranked:
    if not t.keys.is_contiguous():
        t.keys = t.keys.contiguous()
    r = Ranked(keys=t.keys.data_ptr(), k=t.k)
    if t.floor is not None:
        if t.floor.device != t.keys.device or not t.floor.is_contiguous():
            t.floor = t.floor.to(t.keys.device).contiguous()
        r.floor = t.floor.data_ptr()
    if cap and ws is not None:
        r.cand_key, r.cand_col, r.count = ws.ptr(prefix + "key"), ws.ptr(prefix + "col"), ws.ptr(prefix + "count")
        r.fill, r.start, r.sorted = ws.ptr(prefix + "fill"), ws.ptr(prefix + "start"), ws.ptr(prefix + "sorted")
        r.overflow = t.overflow_buffer(t.keys.device).data_ptr()
    return r


def _moments_state(m, N: int, dev: torch.device) -> None:
    """An empty running state the kernel can update in place."""
    if m.mean is None:
        z = dict(dtype=torch.float64, device=dev)
        m.mean, m.m2, m.m3, m.m4 = (torch.zeros(N, **z) for _ in range(4))
        m.min, m.max = torch.full((N,), float("inf"), **z), torch.full((N,), float("-inf"), **z)
        m.n_active = torch.zeros(N, dtype=torch.int64, device=dev)
        m.count = 0
    else:
        for name in ("mean", "m2", "m3", "m4", "min", "max", "n_active"):
            v = getattr(m, name)
            if v.device != dev or not v.is_contiguous():
                setattr(m, name, v.to(dev).contiguous())


def layer_pass(x: torch.Tensor, layout: Layout, top, bottom, contexts, histogram, moments,
               gain: Gain | None = None) -> None:
    """x (rows, N) contiguous, rows = contexts x layout.T. top/bottom: TopK (largest, smallest) or None;
    contexts: ContextTopK or None; histogram: Histogram or None; moments: Moments or None; gain: the reducers take
    x's direct logit attributions instead of x (Gain). One library call: the kernel's read, then the states
    updated in place. A histogram too fine for the device's shared memory takes its own torch ops afterwards;
    the rest stays in the kernel."""
    dev, (M, N) = x.device, x.shape
    apart = None
    if histogram is not None and not histogram_fits(histogram.bins.n_bins, dev):
        apart, histogram = histogram, None
    C = layout.first.shape[0]
    lib = library()
    ranked = [t for t in (top, bottom) if t is not None]
    for t in ranked + ([contexts.top] if contexts is not None else []):
        t._start(N, dev)
    caps = [t.sparse_capacity(layout.total, N, margin=CAP_MARGIN) for t in ranked]
    cap = 0 if not caps or any(c is None for c in caps) else max(caps)
    per_block = max(PER_BLOCK, -(-C // MAX_ROW_BLOCKS))
    rb = lib.layer_row_blocks(C, per_block)
    sizes = {}
    if cap:  # first, one span the library zeroes: the candidate counts, and the counts per column
        for prefix in ("top_", "bot_"):
            sizes.update({prefix + "count": 8, prefix + "fill": N * 4})
    sizes.update({name: C * N * 8 for name in ("c_mean", "c_m2", "c_m3", "c_m4", "c_key")})
    sizes.update({name: C * N * 4 for name in ("c_min", "c_max", "c_active")})
    if histogram is not None:
        sizes["hist_part"] = rb * N * histogram.bins.n_bins * 4
    if cap:
        for prefix in ("top_", "bot_"):
            sizes.update({prefix + "key": cap * 8, prefix + "col": cap * 4, prefix + "start": (N + 1) * 4,
                          prefix + "sorted": cap * 8})
    ws = Workspace(sizes, dev)
    p = Params(x=x.data_ptr(), tok=layout.tok.data_ptr(), first=layout.first.data_ptr(),
               ctx_count=layout.counts.data_ptr(), M=M, N=N, T=layout.T, n_ctx=C, per_block=per_block, cap=cap,
               sums=SUMS_FLOAT_PAIRS if float_pairs(dev) else SUMS_FLOAT64)
    for name in ("c_mean", "c_m2", "c_m3", "c_m4", "c_min", "c_max", "c_active", "c_key"):
        setattr(p, name, ws.ptr(name))
    if cap:
        p.top, p.bottom = _ranked(top, cap, ws, "top_"), _ranked(bottom, cap, ws, "bot_")
        p.zero, p.zero_bytes = ws.ptr("top_count"), ws.ptr("bot_fill") + N * 4 - ws.ptr("top_count")
    if contexts is not None:
        p.ctx = _ranked(contexts.top, 0, None, "")
    if histogram is not None:
        histogram._flush()
        p.counts, p.hist_part = histogram.accumulator(N, dev).data_ptr(), ws.ptr("hist_part")
        p.shift, p.base, p.R, p.zero_bin, p.nb = histogram.bins.kernel_params()
    if gain is not None:
        p.gain, p.gain_row, p.row_scale = gain.table.data_ptr(), gain.row.data_ptr(), gain.scale.data_ptr()
    if moments is not None:
        _moments_state(moments, N, dev)
        p.mean, p.m2, p.m3, p.m4 = (getattr(moments, k).data_ptr() for k in ("mean", "m2", "m3", "m4"))
        p.vmin, p.vmax, p.n_active = moments.min.data_ptr(), moments.max.data_ptr(), moments.n_active.data_ptr()
        p.n_before = float(moments.count)
    stream = torch.cuda.current_stream(dev).cuda_stream if x.is_cuda else None
    err = lib.layer_update(ctypes.byref(p), X_DTYPES[x.dtype], stream)
    if err:
        raise RuntimeError(f"cuda_layer: kernel launch failed (CUDA error {err})")
    if apart is not None or (not cap and ranked):  # what the torch ops take: the mined rows' values
        if gain is not None:
            values = gain.values(x, layout.rows if layout.rows is not None else torch.arange(M, device=dev))
        else:
            values = x if layout.rows is None else x.index_select(0, layout.rows)
    if apart is not None:
        apart.update(values)
    if moments is not None:
        moments.count += layout.total
    if cap:
        for t in ranked:
            t.seen += layout.total
    elif ranked:  # young thresholds: the batch's mined rows ranked densely by the torch ops
        toks = layout.tok if layout.rows is None else layout.tok[layout.rows]
        for t in ranked:
            device.topk_update(t, values, toks)
