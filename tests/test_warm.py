"""`python3 -m mining.warm`, which scripts/setup.sh runs so that no process of a fresh install compiles the CPU
kernels again. Apart from test_kernels.py, which test_kernels_boundscheck.py reruns with a cache of its own."""

import subprocess
import sys


def test_the_install_time_warm_up_compiles_every_cached_kernel():
    """scripts/setup.sh runs `python3 -m mining.warm` so that no process of a fresh install compiles the kernels
    again; a kernel the warm-up does not reach would be compiled by every actor of the first job. In a fresh
    process, after warm(): every kernel cached on disk has a compiled signature and its cache index exists
    (layer_kernel._count_part only inside _layer, its one caller, which compiles it when it compiles)."""
    script = """
from pathlib import Path
from numba.core.registry import CPUDispatcher
import mining.byteshuffle, mining.reducers.kernels, mining.reducers.layer_kernel
from mining.warm import warm
warm()
for module in (mining.byteshuffle, mining.reducers.kernels, mining.reducers.layer_kernel):
    for name, f in vars(module).items():
        if isinstance(f, CPUDispatcher) and type(f._cache).__name__ != "NullCache":
            index = Path(f._cache._cache_file._index_path)
            print(module.__name__, name, len(f.signatures), index.is_file())
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    kernels_seen = [line.split() for line in out.stdout.splitlines()]
    assert len(kernels_seen) >= 15, out.stdout  # byteshuffle's 4, kernels.py's 8, layer_kernel.py's 3
    callees = {"_count_part"}
    assert [k for k in kernels_seen if (k[2] == "0" and k[1] not in callees) or k[3] != "True"] == [], out.stdout
