"""cuda_layer.cu built by a real nvcc (the nvidia-cuda-nvcc wheel, part of the test extra) for the GPUs the
service targets. The emulated tests compile the same file with g++, which never sees the device-only code
(intrinsics, atomics, the launches, templates as nvcc's front end reads them). Here ptxas must report every
activation dtype's layer kernel (each with float64 and float32-pair sums) and no kernel using the stack (spills,
or a parameter copied to local memory), and the library must export what cuda_layer.py calls. `.ci/run` sets
MINING_REQUIRE_NVCC, so there a missing nvcc fails instead of skipping."""

import ctypes
import os
import re
import shutil
import subprocess

import pytest

from mining.reducers import HistogramBins, cuda_layer

ARCHES = ("sm_75", "sm_80", "sm_89", "sm_90")  # T4; A100; L4, RTX 40xx, L40S; H100 and H200
WHEEL_CUDA = "13"  # the [cuda] extra's nvidia-cuda-nvcc major version


def wheel_nvcc(monkeypatch) -> str:
    """The nvidia-cuda-nvcc wheel's nvcc, as cuda_layer.nvcc finds it on a machine without a system one."""
    monkeypatch.setattr(cuda_layer.shutil, "which", lambda *a, **k: None)
    found = cuda_layer.nvcc(cuda=WHEEL_CUDA + ".0")
    monkeypatch.undo()
    if found is None:
        if os.environ.get("MINING_REQUIRE_NVCC"):
            pytest.fail("no nvcc from the nvidia-cuda-nvcc wheel: pip install -e .[cuda]")
        pytest.skip("no nvcc from the nvidia-cuda-nvcc wheel (pip install -e .[cuda])")
    return found


@pytest.fixture(params=["wheel", "system"])
def compiler(request, monkeypatch) -> str:
    if request.param == "wheel":
        return wheel_nvcc(monkeypatch)
    found = shutil.which("nvcc") or shutil.which("nvcc", path="/usr/local/cuda/bin")
    if found is None:
        pytest.skip("no system nvcc")
    return found


def ptxas_report(stderr: str) -> dict[str, tuple[int, int, int, int]]:
    """ptxas -v's lines, per kernel: (registers, stack frame bytes, spill store bytes, spill load bytes)."""
    report, name = {}, None
    spills = (0, 0, 0)
    for line in stderr.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)'", line):
            name = m.group(1)
        elif m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line):
            spills = (int(m.group(1)), int(m.group(2)), int(m.group(3)))
        elif (m := re.search(r"Used (\d+) registers", line)) and name:
            report[name] = (int(m.group(1)), *spills)
            name = None
    return report


@pytest.mark.parametrize("arch", ARCHES)
def test_nvcc_builds_the_kernel(compiler, arch, tmp_path):
    out = tmp_path / "layer.so"
    flags = cuda_layer.nvcc_flags(arch) + ["-Xptxas", "-v"]
    done = subprocess.run(cuda_layer.compile_command(compiler, flags, out), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    report = ptxas_report(done.stderr)
    for code in cuda_layer.X_DTYPES.values():  # float32, bfloat16, float16, each with both ways of summing,
        for sums in ("11Float64Sums", "13FloatPairSums"):  # reading activations (b0) or their DLA (b1)
            for gain in (0, 1):
                assert f"_Z12layer_kernelILi{code}E{sums}Lb{gain}EEv6Params" in report, sorted(report)
    for kernel in ("hist_reduce", "moments_combine", "cand_count", "cand_scan", "cand_scatter", "keys_insert"):
        assert any(kernel in name for name in report), (kernel, sorted(report))
    on_stack = {name: r for name, r in report.items() if any(r[1:])}  # local memory: spills, or a copied param
    assert not on_stack, on_stack
    # the host side needs no GPU to load (the CUDA runtime is linked statically) or to plan a launch
    so = ctypes.CDLL(str(out))
    so.layer_row_blocks.argtypes = [ctypes.c_int64, ctypes.c_int64]
    so.layer_row_blocks.restype = ctypes.c_int64
    assert so.layer_update is not None
    assert [so.layer_row_blocks(c, 4) for c in (1, 4, 5, 64, 65)] == [1, 1, 2, 16, 17]
    so.layer_smem_bytes.restype = so.layer_smem_limit.restype = ctypes.c_int64
    assert so.layer_fp64_ratio(0) == 2  # no device to ask: float64 sums, the choice that is exact everywhere
    # the default bins' block (645 bins, 45 KB) fits the 48 KB every GPU gives without opting in, which is
    # also what the library answers where it cannot ask a device
    assert so.layer_smem_bytes(HistogramBins().n_bins) <= 48 * 1024 == so.layer_smem_limit(0)


def test_the_wheel_nvcc_only_for_torch_cuda_major(monkeypatch):
    """With no system nvcc, the wheel's is taken for its own CUDA major version only: the library links the
    runtime statically, so a CUDA 13 build under a CUDA 12 torch could need a newer driver than the machine's."""
    wheel = wheel_nvcc(monkeypatch)
    assert "nvidia" in wheel and os.access(wheel, os.X_OK)
    monkeypatch.setattr(cuda_layer.shutil, "which", lambda *a, **k: None)
    assert cuda_layer.nvcc(cuda=WHEEL_CUDA + ".2") == wheel
    assert cuda_layer.nvcc(cuda="12.4") is None
    assert cuda_layer.nvcc(cuda=None) is None  # a CPU torch
