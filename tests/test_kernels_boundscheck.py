"""The CPU kernels' tests again with numba's bounds checks on (NUMBA_BOUNDSCHECK=1).

The kernels (reducers/kernels.py, layer_kernel.py, byteshuffle.py) are compiled with boundscheck=False: an index
past an array's end reads or writes whatever memory is there, silently. With the checks on, such an index raises
IndexError; inside a prange body the exception ends that thread's part early, and the tests see its columns left
undone. This found the layer kernel taking its part's view of the histogram scratch, past the end of the
one-part scratch it was given when there is no histogram (direct logit attribution's ranked pass, two parts or
more). Compiled afresh into a cache of its own, about a minute."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def test_the_cpu_kernels_with_numbas_bounds_checks(tmp_path):
    env = {**os.environ, "NUMBA_BOUNDSCHECK": "1", "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    # --basetemp: the run's folders inside this test's, not a numbered one beside the suite's (conftest keeps the last)
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp",
                           str(tmp_path / "basetemp"), "tests/test_kernels.py", "tests/test_dla_defer.py",
                           "tests/test_states_format.py"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    report = done.stdout[-6000:] + done.stderr[-3000:]
    assert done.returncode == 0, report
    assert " passed" in done.stdout and " failed" not in done.stdout and " skipped" not in done.stdout, report
