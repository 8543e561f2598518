"""`mine submit` / `mine jobs` against a real Ray head with its dashboard, on loopback.

The head is started with `ray start --head` in its own session and a private --temp-dir, and
torn down by killing exactly that session's processes (and their children). `ray stop` is never
used: it stops every Ray process on the machine, including other tests' embedded clusters, and
the private temp dir keeps this head out of /tmp/ray/ray_current_cluster, where a later
`ray.init()` would otherwise find it. Token authentication (Ray's default once a token exists)
is on, with a token of the test's own passed through RAY_AUTH_TOKEN, so ~/.ray is never read.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import uuid
import urllib.request
from pathlib import Path

import pytest

from mining.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.ray]

TOKEN = uuid.uuid4().hex + uuid.uuid4().hex

JOB = """
name: submit-test
model: {id: smollm2-135m}
corpus: {source: "builtin:python-docs", max_tokens: 300, context_length: 64}
hooks: ["blocks.3.mlp.hook_post"]
stats: {top_k: 4}
compute: {actors: 1, cpus_per_actor: 1, batch_size: 4, shard_tokens: 200}
"""


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _session_processes(sid: int):
    import psutil

    procs = set()
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                procs.add(p)
        except (OSError, psutil.Error):
            pass
    for p in list(procs):  # job drivers run in sessions of their own, under this head's workers
        try:
            procs.update(p.children(recursive=True))
        except psutil.Error:
            pass
    return procs


def _kill_session(sid: int) -> None:
    import psutil

    procs = _session_processes(sid)
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    deadline = time.monotonic() + 5  # SIGTERM grace, then SIGKILL
    while time.monotonic() < deadline and any(_alive(p) for p in procs):
        time.sleep(0.2)
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass


def _alive(p) -> bool:
    import psutil

    try:  # orphans stay zombies when nothing reaps them: they are gone all the same
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(HF_HUB_OFFLINE="1", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN)
    return env


@pytest.fixture(scope="module")
def head():
    gcs, dash, client, agent = _free_ports(4)
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's unix sockets live under it
    proc = subprocess.Popen(
        ["ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", "--include-dashboard=true", "--num-cpus=2", "--disable-usage-stats",
         f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}", f"--temp-dir={temp}"],
        env=_clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=90)
        assert proc.returncode == 0, out[-2000:]
        url = f"http://127.0.0.1:{dash}"
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(url + "/api/version", timeout=2)
                break
            except urllib.error.HTTPError:  # 401: up, and wants the token
                break
            except OSError:
                assert time.monotonic() < deadline, "the Ray dashboard never answered"
                time.sleep(0.5)
        yield {"url": url, "gcs": f"127.0.0.1:{gcs}"}
    finally:
        _kill_session(proc.pid)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def job_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("submit") / "job.yaml"
    path.write_text(JOB)
    return path


@pytest.fixture(scope="module")
def submitted(head, job_file, tmp_path_factory):
    """One job submitted with --wait; (job id, its output, store)."""
    store = tmp_path_factory.mktemp("stores") / "waited"
    # the job loads SmolLM2 on the cluster: 100-120 s with the suite's 3 workers beside it, more on a loaded host
    result = _cli(["submit", str(job_file), "--address", head["url"], "--store", str(store), "--wait"], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.splitlines()[0].strip(), result.stdout, store


def _cli(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mining.cli", *args], env=_clean_env(), capture_output=True,
                          text=True, timeout=timeout)


def _complete(store: Path) -> None:
    assert (store / "manifest.parquet").is_file()
    assert main(["query", str(store), "SELECT count(*) AS n FROM neurons", "--format", "csv"]) == 0


def test_bad_address_is_one_line(capsys):
    for address in ("http://127.0.0.1:1", "ray://127.0.0.1:10001", "http://host:notaport", "auto"):
        assert main(["jobs", "list", "--address", address]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), lines


def test_relative_store_is_refused(job_file):
    result = _cli(["submit", str(job_file), "--address", "http://127.0.0.1:1", "--store", "runs/x"], timeout=30)
    assert result.returncode == 2 and "absolute path" in result.stderr, result.stderr


def test_submit_wait_writes_complete_store(submitted, capsys):
    job_id, out, store = submitted
    assert job_id.startswith("raysubmit_")
    assert "mined 300 tokens" in out  # --wait streamed the run's own summary
    _complete(store)
    assert "1536" in capsys.readouterr().out


def test_status_logs_list(submitted, head):
    job_id, _, store = submitted
    status = _cli(["jobs", "status", job_id, "--address", head["url"]], timeout=30)
    assert status.returncode == 0 and status.stdout.startswith(f"{job_id} SUCCEEDED"), status.stdout + status.stderr
    logs = _cli(["jobs", "logs", job_id, "--address", head["url"]], timeout=30)
    assert logs.returncode == 0 and "mined 300 tokens in 2 shards (2 this run)" in logs.stdout, logs.stdout
    listed = _cli(["jobs", "list", "--address", head["url"]], timeout=30)
    assert job_id in listed.stdout and str(store) in listed.stdout


def test_unknown_job_id(head):
    for action in ("status", "logs", "stop"):
        result = _cli(["jobs", action, "raysubmit_nosuchjob", "--address", head["url"]], timeout=30)
        assert result.returncode == 2, result.stdout + result.stderr
        assert result.stderr.strip().splitlines() == [result.stderr.strip()]
        assert "no job 'raysubmit_nosuchjob'" in result.stderr


def test_run_joins_cluster_by_gcs_address(head, job_file, tmp_path):
    store = tmp_path / "joined"
    result = _cli(["run", str(job_file), "--address", head["gcs"], "--store", str(store), "--no-progress"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mined 300 tokens" in result.stdout
    _complete(store)


def test_stop_running_job(head, job_file, tmp_path):
    result = _cli(["submit", str(job_file), "--address", head["url"], "--store", str(tmp_path / "long"),
                   "--set", "corpus.max_tokens=500000", "--set", "hooks=[blocks.*.mlp.hook_post]"], timeout=60)
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip()
    deadline = time.monotonic() + 60
    while "RUNNING" not in (s := _cli(["jobs", "status", job_id, "--address", head["url"]], timeout=30).stdout):
        assert "PENDING" in s and time.monotonic() < deadline, s
        time.sleep(0.5)
    stopped = _cli(["jobs", "stop", job_id, "--address", head["url"]], timeout=60)
    assert stopped.returncode == 0 and stopped.stdout.strip() == f"{job_id} STOPPED", stopped.stdout + stopped.stderr
    status = _cli(["jobs", "status", job_id, "--address", head["url"]], timeout=30)
    assert status.stdout.startswith(f"{job_id} STOPPED")
