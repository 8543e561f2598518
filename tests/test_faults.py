"""Faults beyond test_runner.py's (actor killed, driver killed, node removed, failing shard), each
compared with a clean run of the same job: a final-table write interrupted by SIGKILL, a shard file
corrupted after it was written (found at merge and at resume, then mined again), and readers
querying a store while a job writes it (they see nothing, or all of it)."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mining.errors import UserError
from mining.query import connect, run_sql
from mining.store import Store

pytestmark = [pytest.mark.ray]

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def cli(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "mining.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**ENV, **(env or {})}, start_new_session=True)


def content(store: Path) -> dict[str, bytes]:
    """Every final table and token file, byte for byte."""
    out = {p.name: p.read_bytes() for p in store.glob("*.parquet") if p.name != "manifest.parquet"}
    out.update({f"tokens/{p.name}": p.read_bytes() for p in (store / "tokens").glob("*.parquet")})
    return out


@pytest.fixture(scope="module")
def job(hostile_job, tmp_path_factory):
    """The tiny model over the hostile corpus in 4 shards, 2 actors."""
    tmp = tmp_path_factory.mktemp("faults")
    text = hostile_job.read_text()
    text = text.replace("compute: {actors: 1, batch_size: 8, shard_tokens: 2048}",
                        "compute: {actors: 2, batch_size: 4, shard_tokens: 700}")
    path = tmp / "job.yaml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def clean_store(job, tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("clean") / "store"
    r = cli("run", job, "--store", store, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert len(list((store / "_shards").glob("shard-*.json"))) == 4
    # the shards' states are folded into one file once all are complete: the store does not grow with them
    assert sorted(p.name for p in (store / "_shards").glob("*.zst")) == ["merged.states.zst"]
    return store


@pytest.fixture(scope="module")
def clean(clean_store) -> dict[str, bytes]:
    return content(clean_store)


@pytest.fixture
def mined(clean_store, tmp_path) -> Path:
    """A copy of the clean run's complete store, to damage."""
    shutil.copytree(clean_store, tmp_path / "store")
    return tmp_path / "store"


def test_final_table_write_killed_then_resumed(job, clean, tmp_path):
    store = tmp_path / "store"
    proc = subprocess.Popen([sys.executable, "-m", "mining.cli", "run", str(job), "--store", str(store),
                             "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**ENV, "MINING_INJECT_FAULT": "kill-writing:histograms.parquet"})
    try:
        proc.wait(timeout=300)
    finally:
        try:  # the driver is gone; its embedded cluster (same session) goes too
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == -signal.SIGKILL
    assert not (store / "manifest.parquet").exists() and not (store / "histograms.parquet").exists()
    assert list(store.glob(".histograms.parquet.*.tmp"))  # the half-written temporary is there
    r = cli("query", store, "SELECT count(*) FROM neurons")
    assert r.returncode == 2 and "not a complete store" in r.stderr  # nothing reads as complete
    r = cli("run", job, "--store", store, "--resume", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "(0 this run)" in r.stdout  # every shard was kept; only the merge ran again
    assert content(store) == clean
    assert not list(store.rglob("*.tmp"))
    assert cli("verify", store).returncode == 0


def test_corrupted_merged_states_are_found_and_mined_again(job, clean, mined):
    store = mined
    states = store / "_shards" / "merged.states.zst"
    blob = bytearray(states.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    states.write_bytes(bytes(blob))
    r = cli("verify", store)
    assert r.returncode == 2 and "_shards/merged.states.zst does not match its checksum" in r.stdout
    # at merge: refused with one line, and the markers of the shards it held go, so that a resume mines them again
    from mining.merge import merge_shards
    from mining.spec import load_spec

    with pytest.raises(UserError, match="merged.states.zst does not match its checksum"):
        merge_shards(Store(store), load_spec(job), [0, 1, 2, 3])
    assert not list((store / "_shards").glob("shard-*.json")) and not (store / "_shards" / "merged.json").exists()
    r = cli("run", job, "--store", store, "--resume", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "(4 this run)" in r.stdout
    assert content(store) == clean
    r = cli("verify", store)
    assert r.returncode == 0, r.stderr[-6000:]


def test_corrupted_shard_found_by_resume(job, clean, mined):
    store = mined
    tokens = store / "tokens" / "shard-00001.parquet"
    tokens.write_bytes(tokens.read_bytes()[:-100])  # truncated
    assert "tokens/shard-00001.parquet does not match" in cli("verify", store).stdout
    r = cli("run", job, "--store", store, "--resume", "--no-progress")
    assert r.returncode == 0 and "(1 this run)" in r.stdout
    assert content(store) == clean  # the shard's states were in the merged file already: not counted twice
    assert sorted(p.name for p in (store / "_shards").glob("*.zst")) == ["merged.states.zst"]
    assert cli("verify", store).returncode == 0


def test_verify_reports_missing_altered_and_unlisted_files(mined):
    store = mined
    assert cli("verify", store).returncode == 0
    (store / "job.yaml").write_text((store / "job.yaml").read_text() + "# edited\n")
    (store / "logit_lens.parquet").unlink()
    (store / "neurons.parquet").write_bytes((store / "neurons.parquet").read_bytes()[:50])
    (store / "extra.parquet").write_bytes(b"not mine")
    r = cli("verify", store)
    assert r.returncode == 2
    assert "job.yaml does not match its checksum" in r.stdout
    assert "logit_lens.parquet is missing" in r.stdout
    assert "neurons.parquet does not match its checksum" in r.stdout
    assert "extra.parquet is not in the manifest" in r.stdout
    assert r.stderr.strip() == f"error: {store}: 4 problem(s) found"


def test_readers_see_nothing_or_everything_while_a_job_writes(job, clean, tmp_path):
    store = tmp_path / "store"
    final = None
    proc = subprocess.Popen([sys.executable, "-m", "mining.cli", "run", str(job), "--store", str(store),
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            start_new_session=True)
    seen = {"incomplete": 0, "complete": 0}
    try:
        while proc.poll() is None or final is None:
            try:
                con = connect(store)
                row = run_sql(con, "SELECT count(*) AS n, sum(count) AS tokens FROM neurons").to_pylist()[0]
                con.close()
                seen["complete"] += 1
                final = final or row
                assert row == final  # never a partial table
            except UserError as e:
                assert "not a complete store" in str(e)
                seen["incomplete"] += 1
                assert proc.poll() is None, "the job ended without completing the store"
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == 0
    assert seen["incomplete"] > 0 and seen["complete"] > 0
    assert content(store) == clean
