"""The GPU kernel (reducers/cuda_layer.cu) built for the CPU (MINING_CUDA_EMULATE=1: a fiber per CUDA
thread, switched at __syncthreads, in thread order and reversed on alternate phases) against the reducers' own paths and brute force: the same keys
and counts bit for bit, moments to rounding; and the miner with it against the CPU miner."""

import shutil

import numpy as np
import pytest
import torch

from mining.reducers import ContextTopK, Histogram, HistogramBins, Moments, TopK, cuda_layer

from test_device import mine_all, same_results
from test_kernels import hostile

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="the emulated kernel needs g++")


@pytest.fixture
def emulated(monkeypatch):
    monkeypatch.setenv("MINING_DEVICE_PATH", "1")
    monkeypatch.setenv("MINING_CUDA_EMULATE", "1")
    assert cuda_layer.library() is not None


def reference(x: torch.Tensor, toks: np.ndarray, k: int, batches: list[slice], floor=None, bins=HistogramBins()):
    """The CPU reducers, fed batch by batch as the miner feeds them."""
    top, bottom, ctx, hist, mom = TopK(k), TopK(k, largest=False), ContextTopK(k), Histogram(bins), Moments()
    if floor is not None:
        top.set_floor(floor[0]), bottom.set_floor(floor[1])
    for sl in batches:
        xb, tb = x[sl].float(), torch.from_numpy(toks[sl])
        mined = tb >= 0
        flat = xb[mined]
        top.update(flat, tb[mined], check=False)
        bottom.update(flat, tb[mined], check=False)
        ctx.update(xb, tb, check=False, rising=True)
        hist.update(flat)
        mom.update(flat)
    return top, bottom, ctx, hist, mom


def kernel_pass(x: torch.Tensor, toks: np.ndarray, k: int, batches: list[slice], floor=None, rows: int = 0,
                bins=HistogramBins()):
    top, bottom, ctx, hist, mom = TopK(k), TopK(k, largest=False), ContextTopK(k), Histogram(bins), Moments()
    if floor is not None:
        top.set_floor(floor[0], rows), bottom.set_floor(floor[1], rows)
    caps = []
    for sl in batches:
        xb, tb = x[sl].contiguous(), torch.from_numpy(np.ascontiguousarray(toks[sl]))
        layout = cuda_layer.Layout.of_grid(toks[sl], tb)
        caps.append(top.sparse_capacity(layout.total, x.shape[-1]))
        cuda_layer.layer_pass(xb.view(-1, x.shape[-1]), layout, top, bottom, ctx, hist, mom)
    return (top, bottom, ctx, hist, mom), caps


def data(seed: int, B: int, T: int, N: int, dtype):
    x = hostile(seed, B * T, N).view(B, T, N).to(dtype)
    rng = np.random.default_rng(seed)
    toks = (np.arange(B * T).reshape(B, T) * 2 + 5).astype(np.int64)
    toks[:, 0] = -1  # a BOS-like unmined first position
    toks[rng.random((B, T)) < 0.1] = -1
    toks[1] = -1  # a context with nothing mined
    return x, toks


def check_same(got, ref, caps=None):
    top, bottom, ctx, hist, mom = got
    r_top, r_bottom, r_ctx, r_hist, r_mom = ref
    assert not top.overflowed() and not bottom.overflowed()
    assert torch.equal(top.keys, r_top.keys)
    assert torch.equal(bottom.keys, r_bottom.keys)
    assert torch.equal(ctx.top.keys, r_ctx.top.keys)
    assert torch.equal(hist.finalize(), r_hist.finalize())
    a, b = mom.finalize(), r_mom.finalize()
    finite = np.isfinite(b["mean"]) & np.isfinite(b["std"])
    for key in ("count", "frac_active", "min", "max"):
        assert np.array_equal(a[key], b[key], equal_nan=True), key
    for key in ("mean", "std", "skew", "kurtosis"):
        assert np.allclose(a[key][finite], b[key][finite], rtol=1e-7, atol=1e-9, equal_nan=True), key
        assert np.array_equal(np.isfinite(a[key]), np.isfinite(b[key])) or key in ("skew", "kurtosis"), key


@pytest.mark.parametrize("pairs", [False, True], ids=["float64", "float_pairs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_equals_the_reducers(dtype, pairs, emulated, monkeypatch):
    monkeypatch.setattr(cuda_layer, "float_pairs", lambda dev: pairs)
    x, toks = data(0, 15, 40, 37, dtype)  # 37 columns: a partial block of 16
    batches = [slice(lo, lo + 3) for lo in range(0, 15, 3)]
    got, caps = kernel_pass(x, toks, 2, batches)
    assert caps[0] is None and caps[-1] is not None  # dense first, then candidates from the kernel
    check_same(got, reference(x, toks, 2, batches))


def test_every_float16_value(emulated, monkeypatch):
    """The kernel's float16 -> float32 conversion (integer ops, cuda_layer.cu half_to_float_bits) against
    torch's, on all 65,536 bit patterns: with k = every row and every value a candidate, each non-NaN
    value's exact image is a top and a bottom key; bins, min and max are checked too."""
    monkeypatch.setattr(TopK, "sparse_capacity", lambda self, M, N, margin=4: M * N)  # the kernel ranks all
    B, T, N = 4, 1024, 16
    x = torch.from_numpy(np.arange(1 << 16, dtype=np.uint16).view(np.float16).reshape(N, B * T).T.copy())
    x = x.view(B, T, N)
    toks = np.arange(B * T, dtype=np.int64).reshape(B, T)
    batches = [slice(0, B)]
    got, caps = kernel_pass(x, toks, B * T, batches)
    ref = reference(x, toks, B * T, batches)
    assert caps == [B * T * N] and not got[0].overflowed()
    assert torch.equal(got[0].keys, ref[0].keys) and torch.equal(got[1].keys, ref[1].keys)
    assert torch.equal(got[3].finalize(), ref[3].finalize())
    for key in ("min", "max", "count", "frac_active"):
        assert np.array_equal(got[4].finalize()[key], ref[4].finalize()[key], equal_nan=True), key
    column = x.reshape(-1, N)[:, 0].float()  # patterns 0..4095: zero, every subnormal, the smallest normals
    assert column[1].item() == 2.0**-24 and column[1023].item() == 1023 * 2.0**-24 and column[1024].item() == 2.0**-14


def test_kernel_with_floors_from_another_shard(emulated):
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(6, 40, 20, generator=gen).bfloat16()  # no constant columns: ties with the floor's (higher)
    _, toks = data(1, 6, 40, 20, torch.bfloat16)          # toks would all be candidates
    other = TopK(2), TopK(2, largest=False)
    y = torch.randn(4000, 20, generator=gen)
    for t in other:
        t.update(y, torch.arange(4000) + 10_000, check=False)
    floor = (other[0].threshold(), other[1].threshold())
    batches = [slice(0, 3), slice(3, 6)]
    got, caps = kernel_pass(x, toks, 2, batches, floor, rows=4000)
    assert all(c is not None for c in caps)
    ref = reference(x, toks, 2, batches, floor)
    assert not got[0].overflowed() and not got[1].overflowed()
    assert torch.equal(got[0].keys, ref[0].keys) and torch.equal(got[1].keys, ref[1].keys)


def test_candidates_grouped_by_column(emulated, monkeypatch):
    """The inserts' counting sort: 300 columns (two a scan thread, a partial insert block), candidates
    lumped into a few columns (dozens in one, a handful in most), top and bottom lists of different sizes."""
    monkeypatch.setattr(TopK, "sparse_capacity", lambda self, M, N, margin=4: M * N if self.seen else None)
    gen = torch.Generator().manual_seed(5)
    B, T, N = 4, 24, 300
    x = torch.randn(B, T, N, generator=gen)
    x[2:, :, 7] += 50.0  # the later batch beats every earlier value of column 7: all of its rows enter
    x[2:, ::3, 201] += 50.0
    x[2:, :, 299] -= 50.0  # ... and only the bottom list of the last column
    toks = np.arange(B * T, dtype=np.int64).reshape(B, T)
    batches = [slice(0, 2), slice(2, 4)]
    got, caps = kernel_pass(x, toks, 8, batches)
    assert caps[0] is None and caps[1] is not None  # the second batch through the candidate lists
    check_same(got, reference(x, toks, 8, batches))
    assert int(got[0].keys[0, 7] >> 31) > 0 and (got[0].keys[:, 7] >> 31).unique().numel() == 8


class NoKernel:
    """A library that launches nothing (or fails to): what a miscompile or a wrong driver might amount to."""

    def __init__(self, error: int = 0):
        self.error = error

    def layer_update(self, params, dtype, stream) -> int:
        return self.error

    def layer_row_blocks(self, n_ctx, per_block) -> int:
        return (n_ctx + per_block - 1) // per_block

    def layer_smem_bytes(self, n_bins) -> int:
        return 0

    def layer_smem_limit(self, device) -> int:
        return 48 * 1024


def test_the_kernel_proves_itself_before_it_is_trusted(monkeypatch, capsys):
    """On a GPU the first use runs proves_itself: the built library is kept only if five small hostile batches
    leave the CPU reducers' states; one that does nothing, or whose launches fail, gives the torch ops."""
    real = cuda_layer._build(emulate=True)
    for lib, kept in ((real, True), (NoKernel(), False), (NoKernel(error=35), False)):
        monkeypatch.setattr(cuda_layer, "_lib", {})
        monkeypatch.setattr(cuda_layer, "_build", lambda emulate, lib=lib: lib)
        assert (cuda_layer.library(torch.device("cpu")) is lib) == kept
        said = capsys.readouterr().err
        assert ("failed its check" in said) != kept, said
    assert "CUDA error 35" in said


def test_a_wrong_dla_read_fails_the_check(monkeypatch, capsys, tmp_path):
    """The read with gains is a kernel of its own, and the first-use check runs it too: a library whose DLA read
    leaves out the final norm's scale, and is right everywhere else, gives the torch ops."""
    for name in cuda_layer.SOURCES:
        text = (cuda_layer.HERE / name).read_text()
        (tmp_path / name).write_text(text.replace("__fdiv_rn(u, p.row_scale[row])", "u"))
    assert (tmp_path / "cuda_layer.cu").read_text() != (cuda_layer.HERE / "cuda_layer.cu").read_text()
    monkeypatch.setattr(cuda_layer, "HERE", tmp_path)
    monkeypatch.setenv("MINING_CACHE_DIR", str(tmp_path / "cache"))
    wrong = cuda_layer._build(emulate=True)
    monkeypatch.setattr(cuda_layer, "_lib", {})
    monkeypatch.setattr(cuda_layer, "_build", lambda emulate: wrong)
    assert cuda_layer.library(torch.device("cpu")) is None
    assert "direct logit attributions differ" in capsys.readouterr().err


def test_a_full_candidate_list_is_flagged(emulated, monkeypatch):
    x, toks = data(2, 4, 10, 20, torch.float32)
    monkeypatch.setattr(TopK, "sparse_capacity", lambda self, M, N, margin=4: 2 if self.seen else None)
    got, _ = kernel_pass(x, toks, 3, [slice(0, 2), slice(2, 4)])
    assert got[0].overflowed()


def test_dla_rows_without_contexts(emulated):
    gen = torch.Generator().manual_seed(3)
    dla = torch.randn(1100, 24, generator=gen)  # three pseudo-contexts of 512 rows, the last short
    tok = torch.arange(1100) * 3
    top, bottom, mom = TopK(4), TopK(4, largest=False), Moments()
    r_top, r_bottom, r_mom = TopK(4), TopK(4, largest=False), Moments()
    for sl in (slice(0, 600), slice(600, 1100)):
        cuda_layer.layer_pass(dla[sl].contiguous(), cuda_layer.Layout.of_rows(tok[sl]), top, bottom, None, None, mom)
        r_top.update(dla[sl], tok[sl]), r_bottom.update(dla[sl], tok[sl]), r_mom.update(dla[sl])
    assert torch.equal(top.keys, r_top.keys) and torch.equal(bottom.keys, r_bottom.keys)
    for key, v in mom.finalize().items():
        assert np.allclose(v, r_mom.finalize()[key], rtol=1e-9), key


@pytest.mark.parametrize("pairs", [False, True], ids=["float64", "float_pairs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dla_fused_into_the_read(dtype, pairs, emulated, monkeypatch):
    """The kernel's GAIN read (the value (x * gain[target]) / scale, never stored) against DlaBatch's torch product
    and quotient fed to the CPU reducers: the same keys bit for bit, moments to rounding. Rows without a next token
    are left out; NaN, infinities and subnormals are in x; the first batch ranks densely, the later ones through
    the candidate lists."""
    monkeypatch.setattr(cuda_layer, "float_pairs", lambda dev: pairs)
    x, toks = data(5, 12, 40, 37, dtype)
    x[..., :24] = torch.nan_to_num(x[..., :24].float(), nan=0.5, posinf=3.0, neginf=-3.0).to(dtype)  # finite moments
    rng = np.random.default_rng(5)
    toks[rng.random(toks.shape) < 0.15] = -1  # mined, but no next token: not a DLA row
    U, k = 9, 3
    table = torch.from_numpy(rng.standard_normal((U, 37)).astype(np.float32))
    table[2, 5] = 0.0
    target = torch.from_numpy(rng.integers(0, U, toks.size).astype(np.int32))
    scale = torch.from_numpy(rng.uniform(0.3, 7.0, toks.size).astype(np.float32))
    top, bottom, mom = TopK(k), TopK(k, largest=False), Moments()
    r_top, r_bottom, r_mom = TopK(k), TopK(k, largest=False), Moments()
    caps = []
    for lo in range(0, 12, 4):
        sl, rows = slice(lo, lo + 4), slice(lo * 40, (lo + 4) * 40)
        tb = torch.from_numpy(np.ascontiguousarray(toks[sl]))
        layout = cuda_layer.Layout.of_grid(toks[sl], tb)
        caps.append(top.sparse_capacity(layout.total, 37))
        gain = cuda_layer.Gain(table, target[rows].contiguous(), scale[rows].contiguous())
        cuda_layer.layer_pass(x[sl].reshape(-1, 37).contiguous(), layout, top, bottom, None, None, mom, gain=gain)
        sel = np.flatnonzero(toks[sl].reshape(-1) >= 0)
        values = table[target[rows][sel].long()].mul_(x[sl].reshape(-1, 37)[sel]).div_(scale[rows][sel][:, None])
        r_top.update(values, tb.reshape(-1)[sel], check=False)
        r_bottom.update(values, tb.reshape(-1)[sel], check=False)
        r_mom.update(values)
    assert caps[0] is None and caps[-1] is not None
    assert not top.overflowed() and not bottom.overflowed()
    assert torch.equal(top.keys, r_top.keys) and torch.equal(bottom.keys, r_bottom.keys)
    a, b = mom.finalize(), r_mom.finalize()
    for key in ("count", "frac_active", "min", "max"):
        assert np.array_equal(a[key], b[key], equal_nan=True), key
    finite = np.isfinite(b["mean"]) & np.isfinite(b["std"])
    assert finite.sum() > 20
    for key in ("mean", "std", "skew", "kurtosis"):
        assert np.allclose(a[key][finite], b[key][finite], rtol=1e-7, atol=1e-9, equal_nan=True), key


def test_the_miner_with_the_kernel_equals_the_cpu_miner(tiny_job, monkeypatch):
    spec, loaded, shards = tiny_job
    shards = shards[:2]  # the second mined with the first's floors: sparse candidates from its first batch
    ref = mine_all(spec, loaded, shards)
    monkeypatch.setenv("MINING_DEVICE_PATH", "1")
    monkeypatch.setenv("MINING_CUDA_EMULATE", "1")
    calls = []  # whether each call reduced DLA fused into the read
    original = cuda_layer.layer_pass
    monkeypatch.setattr(cuda_layer, "layer_pass", lambda *a, **kw: calls.append("gain" in kw) or original(*a, **kw))
    same_results(mine_all(spec, loaded, shards), ref)
    assert True in calls and False in calls


@pytest.mark.slow
def test_the_miner_with_the_kernel_in_float16(tiny_job, monkeypatch):
    """A float16 model: its activations go through the kernel (not the torch ops) and mine what the CPU
    reducers mine from the same activations."""
    from dataclasses import replace

    from mining.models import load_model

    spec, _, shards = tiny_job
    spec = replace(spec, model=replace(spec.model, dtype="float16"))
    loaded = load_model(spec.model)
    shards = shards[:2]
    ref = mine_all(spec, loaded, shards)
    monkeypatch.setenv("MINING_DEVICE_PATH", "1")
    monkeypatch.setenv("MINING_CUDA_EMULATE", "1")
    dtypes = []
    original = cuda_layer.layer_pass
    monkeypatch.setattr(cuda_layer, "layer_pass", lambda x, *a, **kw: dtypes.append(x.dtype) or original(x, *a, **kw))
    same_results(mine_all(spec, loaded, shards), ref)
    assert torch.float16 in dtypes


def test_one_row_block(emulated, monkeypatch):
    """All contexts in one block down the rows (a large batch's bounded partials)."""
    monkeypatch.setattr(cuda_layer, "MAX_ROW_BLOCKS", 1)
    x, toks = data(4, 9, 20, 21, torch.bfloat16)
    batches = [slice(0, 9)]
    check_same(kernel_pass(x, toks, 2, batches)[0], reference(x, toks, 2, batches))


class Spy:
    """The library, with the histogram pointer of each layer_update call noted (0: no histogram in the kernel)."""

    def __init__(self, lib):
        self.lib, self.counts = lib, []

    def __getattr__(self, name):
        return getattr(self.lib, name)

    def layer_update(self, params, dtype, stream) -> int:
        self.counts.append(params._obj.counts or 0)
        return self.lib.layer_update(params, dtype, stream)


@pytest.mark.parametrize("limit, in_kernel", [(64 * 1024, False), (99 * 1024, True)])  # a T4's; an L4's
def test_bins_too_fine_for_the_device_go_apart(emulated, monkeypatch, limit, in_kernel):
    """1,285 bins (mantissa_bits 5) need 86 KB of shared memory a block: more than a T4 gives. There the
    histogram takes the torch ops and the rest stays in the kernel, with the same states; before, the launch
    failed and the job with it."""
    bins = HistogramBins(mantissa_bits=5)
    spy = Spy(cuda_layer.library())
    monkeypatch.setattr(cuda_layer, "library", lambda dev=None: spy)
    monkeypatch.setattr(cuda_layer, "smem_limit", lambda dev: limit)
    assert cuda_layer.histogram_fits(HistogramBins().n_bins, torch.device("cpu"))  # the default, 45 KB: any GPU
    assert cuda_layer.histogram_fits(bins.n_bins, torch.device("cpu")) == in_kernel
    x, toks = data(5, 15, 40, 21, torch.bfloat16)
    batches = [slice(lo, lo + 3) for lo in range(0, 15, 3)]
    got, caps = kernel_pass(x, toks, 2, batches, bins=bins)
    check_same(got, reference(x, toks, 2, batches, bins=bins))
    assert caps[-1] is not None and len(spy.counts) == 5  # the kernel ranked the last batches' candidates
    assert all(bool(c) == in_kernel for c in spy.counts)


def test_the_emulation_answers_as_an_h100(emulated):
    assert cuda_layer.smem_limit(torch.device("cpu")) == 232448


def wide_ranges(seed: int, B: int, T: int, N: int) -> torch.Tensor:
    """Columns a float32 pair cannot hold alone: heavy tails, a first value far out (a shift far from the mean),
    values within 2^-24 of the shift or 2^28 from it, and near-dead SiLU tails around -1e-9."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, N, generator=g) * torch.rand(N, generator=g) * 3
    x[..., 0] = torch.distributions.StudentT(1.5).sample((B, T)) * 10  # heavy-tailed
    x[:, 0, 1] = 1e4  # each context's shift far out
    x[..., 2] = 1.0 + torch.randint(-3, 4, (B, T), generator=g) * 2.0**-26  # within 2^-24 of the shift
    x[..., 3] = torch.randn(B, T, generator=g) * 1e9  # beyond 2^28
    x[..., 4] = -1e-9 * (1 + torch.rand(B, T, generator=g))  # dead SiLU tails
    x[..., 5] = torch.randn(B, T, generator=g) * 1e-30  # denormal-adjacent powers
    return x


def test_float_pairs_agree_with_float64(emulated, monkeypatch):
    """The float32-pair sums (GPUs with slow float64) against the float64 ones, on columns that push them: mean
    and std to 1e-9, skew and kurtosis to 1e-7, relative (absolute near zero)."""
    x = wide_ranges(7, 12, 40, 21)
    toks = (np.arange(12 * 40).reshape(12, 40) * 2 + 5).astype(np.int64)
    batches = [slice(lo, lo + 4) for lo in range(0, 12, 4)]
    states = {}
    for pairs in (False, True):
        monkeypatch.setattr(cuda_layer, "float_pairs", lambda dev, pairs=pairs: pairs)
        states[pairs] = kernel_pass(x, toks, 2, batches)[0][4].finalize()
    for key, tol in (("mean", 1e-9), ("std", 1e-9), ("skew", 1e-7), ("kurtosis", 1e-7)):
        a, b = states[False][key], states[True][key]
        assert np.isfinite(a).all(), key
        scale = np.maximum(np.abs(a), {"mean": 1e-12, "std": 1e-12}.get(key, 1e-6))
        assert (np.abs(a - b) / scale).max() < tol, (key, np.abs(a - b) / scale)
