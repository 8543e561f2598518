"""The Ray runner: the same tables whatever the actor count, finishing order, worker deaths, driver
deaths, failing shards or lost nodes. Every scenario runs real Ray and real SmolLM2 weights and is
compared byte for byte against a clean one-actor run."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mining.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.ray]

JOB = """
name: runner
model: {id: smollm2-135m}
corpus: {source: "builtin:python-docs", max_tokens: 800, context_length: 64}
hooks: ["blocks.3.mlp.hook_post"]
stats: {top_k: 4}
compute: {actors: ACTORS, batch_size: 4, shard_tokens: 160, max_retries: 1}
"""
N_SHARDS = 5


def write_job(tmp: Path, actors: int) -> Path:
    path = tmp / f"job-{actors}.yaml"
    path.write_text(JOB.replace("ACTORS", str(actors)))
    return path


def content(store: Path) -> dict[str, object]:
    """What must not depend on how the job ran: every final table and token file, byte for byte, each
    shard's status, and the merged states once all shards are complete. A shard's own states may differ:
    an actor floors its later shards' top-k with the shards it already stored (reducers/topk.py), which
    depends on scheduling but never on the merge."""
    out: dict[str, object] = {p.name: p.read_bytes() for p in store.glob("*.parquet") if p.name != "manifest.parquet"}
    merged = store / "_shards" / "merged.states.zst"
    out["merged_states"] = merged.read_bytes() if merged.exists() else None
    out.update({f"tokens/{p.name}": p.read_bytes() for p in (store / "tokens").glob("*.parquet")})
    manifest = pq.read_table(store / "manifest.parquet").to_pydict()
    out["manifest"] = list(zip(manifest["shard"], manifest["status"]))
    return out


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mining.cli", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


def markers(store: Path) -> list[dict]:
    out = []
    for p in sorted((store / "_shards").glob("shard-*.json")) if (store / "_shards").exists() else []:
        try:
            out.append(json.loads(p.read_text()))
        except ValueError:
            pass
    return out


def wait_for(predicate, timeout: float = 240.0) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise TimeoutError
        time.sleep(0.2)


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> dict[str, object]:
    tmp = tmp_path_factory.mktemp("clean")
    assert main(["run", str(write_job(tmp, 1)), "--store", str(tmp / "store"), "--no-progress"]) == 0
    result = content(tmp / "store")
    assert len(result["manifest"]) == N_SHARDS and all(s == "complete" for _, s in result["manifest"])
    return result


def test_two_actors_give_identical_tables(clean, tmp_path):
    assert main(["run", str(write_job(tmp_path, 2)), "--store", str(tmp_path / "store"), "--no-progress"]) == 0
    assert content(tmp_path / "store") == clean
    workers = {m["worker"] for m in markers(tmp_path / "store")}
    assert len(workers) == 2  # both actors took shards from the queue


def test_two_calls_in_flight_per_actor_give_identical_tables(clean, tmp_path, monkeypatch):
    """A GPU actor takes two shards at a time (one mines while the other's files are written); forced
    here on the CPU. A crash with both in flight retries both and replaces the actor once."""
    monkeypatch.setenv("MINING_ACTOR_SLOTS", "2")
    monkeypatch.setenv("MINING_INJECT_FAULT", "crash:1")
    assert main(["run", str(write_job(tmp_path, 1)), "--store", str(tmp_path / "store"), "--no-progress"]) == 0
    assert content(tmp_path / "store") == clean
    assert any(m["attempts"] == 2 for m in markers(tmp_path / "store"))


def test_worker_killed_mid_shard_is_retried(clean, tmp_path):
    store = tmp_path / "store"
    proc = subprocess.Popen([sys.executable, "-m", "mining.cli", "run", str(write_job(tmp_path, 2)), "--store",
                             str(store), "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, start_new_session=True)
    try:
        wait_for(lambda: markers(store))
        victim = markers(store)[0]["worker"]  # that actor has moved on to its next shard
        os.kill(victim, signal.SIGKILL)
        out, err = proc.communicate(timeout=300)
    finally:
        _reap(proc)
    assert proc.returncode == 0, err
    assert "retried" in out
    assert content(store) == clean
    assert any(m["attempts"] == 2 for m in markers(store))  # the shard it was mining ran again


def test_driver_killed_then_resumed(clean, tmp_path):
    store = tmp_path / "store"
    job = write_job(tmp_path, 2)
    proc = subprocess.Popen([sys.executable, "-m", "mining.cli", "run", str(job), "--store", str(store),
                             "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, start_new_session=True)
    try:
        wait_for(lambda: len(markers(store)) >= 1)
        proc.send_signal(signal.SIGKILL)  # the driver dies; then its whole local cluster with it
        proc.wait()
    finally:
        _reap(proc)
    done_before = _settled(lambda: len(markers(store)))  # workers mid-write may still finish theirs
    assert not (store / "manifest.parquet").exists()  # nothing reads as complete
    assert done_before < N_SHARDS
    r = cli("run", str(job), "--store", str(store), "--resume", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert f"({N_SHARDS - done_before} this run)" in r.stdout
    assert content(store) == clean


def test_failing_shard_is_recorded_then_resumed(clean, tmp_path):
    store = tmp_path / "store"
    job = write_job(tmp_path, 2)
    faults = {"MINING_INJECT_FAULT": "fail:2,crash:3"}  # shard 2 fails every time; shard 3's worker dies once
    r = cli("run", str(job), "--store", str(store), "--no-progress", env=faults)
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "1 of 5 shards failed" in lines[0] and "injected failure of shard 2" in lines[0]
    manifest = {row["shard"]: row for row in pq.read_table(store / "manifest.parquet").to_pylist()}
    assert manifest[2]["status"] == "failed" and manifest[2]["attempts"] == 2 and "injected" in manifest[2]["error"]
    assert manifest[3]["status"] == "complete" and manifest[3]["attempts"] == 2
    assert [m["status"] for s, m in sorted(manifest.items()) if s != 2] == ["complete"] * 4
    assert cli("verify", str(store)).returncode == 2
    tokens = pq.read_table(store / "neurons.parquet").column("count").to_pylist()
    assert set(tokens) == {800 - manifest[2]["tokens"]}  # the failed shard's tokens are in no table
    # with a shard missing, every complete shard keeps its states, so that the resume folds them in shard order
    assert sorted(p.name for p in (store / "_shards").glob("*.zst")) == [f"shard-0000{i}.states.zst" for i in (0, 1, 3, 4)]

    allowed = cli("run", str(job), "--store", str(tmp_path / "allowed"), "--no-progress", "--allow-failed-shards",
                  env={"MINING_INJECT_FAULT": "fail:2"})
    assert allowed.returncode == 0 and "shard 2: RuntimeError: injected failure" in allowed.stdout

    states = store / "_shards" / "shard-00000.states.zst"  # damaged while waiting for the resume
    states.write_bytes(states.read_bytes()[:-10])
    r = cli("run", str(job), "--store", str(store), "--resume", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "(2 this run)" in r.stdout  # the failed shard and the damaged one
    assert content(store) == clean
    assert sorted(p.name for p in (store / "_shards").glob("*.zst")) == ["merged.states.zst"]
    r = cli("verify", str(store))
    assert r.returncode == 0, r.stderr[-6000:]


def test_node_removed_mid_job(clean, tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    from mining.ray_pool import _loopback_only
    from mining.runner import run_job
    from mining.spec import load_spec

    ray.shutdown()
    _loopback_only()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    store = tmp_path / "store"
    removed = threading.Event()

    def remove_a_node():  # once mining is under way, a node (and the actor on it) goes away
        wait_for(lambda: markers(store))
        cluster.remove_node(nodes[1])
        removed.set()

    thread = threading.Thread(target=remove_a_node, daemon=True)
    try:
        ray.init(address=cluster.address)
        thread.start()
        summary = run_job(load_spec(write_job(tmp_path, 2)), store, address=cluster.address, progress=False)
        thread.join(timeout=60)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert removed.is_set()
    assert summary.retried >= 1 and not summary.failed
    assert content(store) == clean


def _settled(count, quiet: float = 3.0) -> int:
    last, since = count(), time.time()
    while time.time() - since < quiet:
        time.sleep(0.3)
        now = count()
        if now != last:
            last, since = now, time.time()
    return last


def _reap(proc: subprocess.Popen) -> None:
    """Kill what is left of a subprocess's embedded cluster (its session = its process group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
