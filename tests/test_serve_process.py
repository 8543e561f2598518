"""`mine serve` as a user runs it: a process that answers pages (a neuron page replays its contexts through the
model on a handler thread) and stops cleanly on Ctrl-C, with status 0 and nothing on stderr."""

import os
import re
import signal
import subprocess
import sys
import urllib.request

import pyarrow.parquet as pq


def test_serve_answers_and_stops_cleanly_on_ctrl_c(viewer_store):
    # as from a terminal: a suite started in the background by a shell without job control (`pytest ... &`) ignores
    # SIGINT, and a child that inherits that never sees the Ctrl-C (Python installs KeyboardInterrupt only over the
    # default disposition); so did the CI runs that hung here
    proc = subprocess.Popen([sys.executable, "-m", "mining.cli", "serve", str(viewer_store), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONFAULTHANDLER": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        first = proc.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+/", first)
        assert url, first + proc.stderr.read() if proc.poll() is not None else first
        neuron = pq.read_table(viewer_store / "neurons.parquet", columns=["layer", "neuron"]).slice(0, 1).to_pylist()[0]
        for path in ("", "?by=max&limit=3", f"neuron/mlp.hook_post/{neuron['layer']}/{neuron['neuron']}", "head/1/0"):
            with urllib.request.urlopen(url.group(0) + path, timeout=120) as page:
                assert page.status == 200 and b"</html>" in page.read()
        proc.send_signal(signal.SIGINT)
        try:
            status = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:  # where it hangs: faulthandler prints every thread's stack on SIGABRT
            proc.send_signal(signal.SIGABRT)
            proc.wait(timeout=30)
            raise AssertionError("mine serve did not stop within 60 s of Ctrl-C:\n" + proc.stderr.read()[-6000:])
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read()
    assert status == 0, err[-3000:]
    assert "Traceback" not in err and "Fatal Python error" not in err, err[-3000:]
