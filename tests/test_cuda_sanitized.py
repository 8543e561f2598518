"""The GPU kernel's emulated tests again, with the emulation built under AddressSanitizer and UBSan.

The kernel has not run on a GPU since session 6, and the exactness checks of test_cuda_layer.py cannot see a read
past the end of a buffer whose value is then skipped (a row past the last context, say): on the CPU such a read
returns garbage that no result uses; on a GPU it can be an illegal address, which kills the CUDA context and the
actor with it. Built with -fsanitize=address,undefined (MINING_CUDA_EMULATE_FLAGS), every access the emulated kernel
makes to the tensors (torch allocates them with malloc, which ASan intercepts once preloaded), to its shared memory
and to its stacks is checked, and so is undefined arithmetic (signed overflow, shifts out of range, misaligned
loads). The run also flips the emulation's order (MINING_CUDA_EMULATE_FLIP=1: blocks in reverse, and the phases
that ran forwards run backwards), so that with test_cuda_layer.py's own run every phase is seen in both thread
orders. Verified to fail on an injected one-row overread in the layer kernel's loads, and without the barrier after
cand_scan's first write to shared memory, which the unflipped order cannot see."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("g++") is None, reason="the emulated kernel needs g++")]

ROOT = Path(__file__).resolve().parents[1]
CASES = ("equals_the_reducers or dla_fused_into_the_read or one_row_block or full_candidate_list or "
         "dla_rows_without_contexts or bins_too_fine or the_miner_with_the_kernel")


def runtime(name: str) -> str:
    """g++'s own copy of a sanitizer runtime (libasan.so), which must be loaded before anything else."""
    path = subprocess.run(["g++", f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(path) or not os.path.exists(path):
        if os.environ.get("MINING_REQUIRE_NVCC"):  # CI: the kernel's build checks may not be skipped there
            pytest.fail(f"g++ has no {name}")
        pytest.skip(f"g++ has no {name}")
    return path


def test_the_emulated_kernel_under_sanitizers_in_the_other_thread_order(tmp_path):
    env = {**os.environ,
           "LD_PRELOAD": f"{runtime('libasan.so')} {runtime('libubsan.so')}",
           "ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1:abort_on_error=0",
           "UBSAN_OPTIONS": "print_stacktrace=1",
           "MINING_CUDA_EMULATE_FLAGS": "-g -fsanitize=address,undefined -fno-sanitize-recover=undefined "
                                        "-fno-omit-frame-pointer",
           "MINING_CUDA_EMULATE_FLIP": "1",
           "MINING_CACHE_DIR": str(tmp_path / "cache")}  # the sanitized build apart from the usual one
    # -s: a sanitizer report goes to the process's stderr, which pytest's capture would drop when the process exits
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "--basetemp",
                           str(tmp_path / "basetemp"), "-k", CASES, "tests/test_cuda_layer.py"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    report = done.stdout[-4000:] + done.stderr[-8000:]
    assert done.returncode == 0, report
    assert " passed" in done.stdout and " failed" not in done.stdout, report
    built = list((tmp_path / "cache" / "cuda").glob("layer-emulate-*.so"))
    assert built and all(b"libasan" in lib.read_bytes() for lib in built)  # the runs used the sanitized build
