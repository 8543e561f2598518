"""conftest.py ends the test process with os._exit (skipping the interpreter's teardown): it must still
exit with pytest's own status, or CI would pass a failing suite."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize("body, status", [("assert True", 0), ("assert False", 1)])
def test_the_suite_exits_with_pytests_status(tmp_path, body, status):
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_one.py").write_text(f"def test_one():\n    {body}\n")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == status, done.stdout[-2000:] + done.stderr[-2000:]
    assert ("1 passed" if status == 0 else "1 failed") in done.stdout  # the summary is flushed before the exit
