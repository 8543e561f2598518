"""conftest.py ends the test process with os._exit (skipping the interpreter's teardown): it must still
exit with pytest's own status, or CI would pass a failing suite."""

import os
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


def test_a_finished_run_unlocks_its_temporary_folder_so_the_next_can_remove_it(tmp_path):
    """conftest's os._exit skips pytest's atexit handler that unlocks the run's numbered temporary folder; a locked
    folder is never removed, so every run's stores stayed in /tmp. Two runs keeping one folder leave one, unlocked."""
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "pytest.ini").write_text("[pytest]\ntmp_path_retention_count = 1\n")
    (tmp_path / "test_one.py").write_text("def test_one(tmp_path):\n    (tmp_path / 'x').write_text('x')\n")
    root = tmp_path / "temproot"
    root.mkdir()
    for _ in range(2):
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                              capture_output=True, text=True, timeout=120, cwd=tmp_path,
                              env={**os.environ, "PYTEST_DEBUG_TEMPROOT": str(root)})
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    runs = sorted(p for p in root.glob("pytest-of-*/pytest-*") if not p.is_symlink())
    assert [p.name for p in runs] == ["pytest-1"] and not (runs[0] / ".lock").exists()
