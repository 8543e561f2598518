"""Stores in object storage: Store over fsspec's memory:// (fast, no server), then `mine run`,
`mine query` and `mine verify` against a local S3-compatible server (moto) bound to 127.0.0.1,
compared with the same job mined to a local directory."""

import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mining.cli import main
from mining.errors import UserError
from mining.store import Store

# ---------------------------------------------------------------- Store on memory:// (no server)


class FakeStats:
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"count": torch.tensor([3]), "top": torch.arange(6, dtype=torch.float32).reshape(2, 3)}


def fake_result(index: int, dense: bool = True) -> SimpleNamespace:
    tokens = pa.table({"tok": pa.array([index * 10 + i for i in range(4)], pa.int64()), "ctx": [index] * 4,
                       "pos": list(range(4)), "token": list("abcd"), "shard": [index] * 4})
    values = np.arange(12, dtype=np.float16).reshape(4, 3)
    return SimpleNamespace(index=index, stats={"blocks.0.mlp.hook_post": FakeStats()}, tokens=tokens,
                           dense={"blocks.0.mlp.hook_post": (tokens["tok"].to_numpy(), values)} if dense else {},
                           n_tokens=4, seconds=0.1)


@pytest.fixture
def mem_store() -> Store:
    return Store(f"memory://bucket/{uuid.uuid4().hex}")


def test_memory_store_shards_tables_and_verify(mem_store):
    s = mem_store
    assert s.remote and s.location.startswith("memory://") and str(s.root) == s.location
    s.prepare({"name": "x"}, resume=False, overwrite=False)  # nothing there yet: fine
    s.begin({"name": "x"}, {"p": 1}, resume=False)
    assert not s.shard_done(0)
    marker = s.write_shard(fake_result(0), {"first_tok": 0})
    assert set(marker["files"]) == {"_shards/shard-00000.states.zst", "tokens/shard-00000.parquet",
                                    "activations.zarr/blocks.0.mlp.hook_post/shard-00000"}
    assert s.shard_done(0) and s.read_marker(0)["status"] == "complete"
    assert s.load_states(0)["blocks.0.mlp.hook_post"]["count"].item() == 3
    assert (s.root / "tokens" / "shard-00000.parquet").exists() and s.exists("job.yaml")

    from mining.dense import dense_hooks, read_dense

    assert dense_hooks(s) == ["blocks.0.mlp.hook_post"]
    toks, values = read_dense(s.location, "blocks.0.mlp.hook_post")
    assert toks.tolist() == [0, 1, 2, 3] and values.dtype == np.float16 and values[3, 2] == 11

    assert not s.complete
    from mining.merge import manifest_table

    s.write_table("neurons", pa.table({"neuron": [0, 1]}))
    s.seal(manifest_table([marker]))  # the manifest, with every other file's checksum
    assert s.complete and s.read_table("neurons").num_rows == 2
    assert s.verify() == []

    s.files.write_bytes("tokens/shard-00000.parquet", b"corrupt")  # a changed object fails its checksum
    assert not s.shard_done(0)
    assert s.verify() == ["tokens/shard-00000.parquet does not match its checksum (altered or truncated)"]
    s.files.write_bytes("stray.txt", b"?")
    assert "stray.txt is not in the manifest" in s.verify()
    s.files.fs.rm(s.files.full("activations.zarr"), recursive=True)
    assert "activations.zarr/blocks.0.mlp.hook_post/shard-00000 is missing" in s.verify()


def test_memory_store_checksums_match_a_local_store(mem_store, tmp_path):
    """The same shard written locally and remotely records the same checksums (dense groups included)."""
    local = Store(tmp_path / "store")
    local.begin({}, {}, resume=False)
    mem_store.begin({}, {}, resume=False)
    assert local.write_shard(fake_result(1), {})["files"] == mem_store.write_shard(fake_result(1), {})["files"]


def test_memory_store_failed_marker_and_prepare(mem_store):
    s = mem_store
    s.begin({"name": "x", "hooks": ["a"]}, {}, resume=False)
    s.write_failed(SimpleNamespace(index=2, n_tokens=5, first_tok=10, ids=[1]), "boom", 3)
    assert not s.shard_done(2) and s.read_marker(2)["error"] == "boom"
    with pytest.raises(UserError, match="already exists"):
        s.prepare({"name": "x", "hooks": ["a"]}, resume=False, overwrite=False)
    with pytest.raises(UserError, match="different hooks"):
        s.prepare({"name": "x", "hooks": ["b"]}, resume=True, overwrite=False)
    s.prepare({"name": "x", "hooks": ["a"]}, resume=True, overwrite=False)
    s.write_table("manifest", pa.table({"x": [1]}))
    s.begin({"name": "x", "hooks": ["a"]}, {}, resume=True)
    assert not s.complete  # a resumed store reads as incomplete until it is finalized again
    s.prepare({}, resume=False, overwrite=True)
    assert not s.exists()


def test_memory_overwrite_refuses_what_is_not_a_store(mem_store):
    mem_store.files.write_bytes("precious.txt", b"keep me")
    with pytest.raises(UserError, match="not a store"):
        mem_store.prepare({}, resume=False, overwrite=True)
    assert mem_store.files.read_bytes("precious.txt") == b"keep me"


def test_memory_store_is_queried_through_a_local_mirror(mem_store, tmp_path, monkeypatch):
    from mining.merge import manifest_table
    from mining.query import connect, run_sql

    monkeypatch.setenv("MINING_CACHE_DIR", str(tmp_path / "cache"))
    s = mem_store
    s.begin({"name": "x"}, {}, resume=False)
    marker = s.write_shard(fake_result(0), {"first_tok": 0})
    s.write_table("things", pa.table({"neuron": [0, 1, 2]}))
    s.write_table("manifest", manifest_table([marker]))
    con = connect(s.location)
    assert run_sql(con, "SELECT count(*) AS n FROM things").to_pylist() == [{"n": 3}]
    assert run_sql(con, "SELECT sum(tok) AS t FROM tokens").to_pylist() == [{"t": 6}]
    mirrored = {p.relative_to(tmp_path / "cache").parts[2:] for p in (tmp_path / "cache").rglob("*") if p.is_file()}
    assert mirrored == {("job.yaml",), ("provenance.json",), ("things.parquet",), ("manifest.parquet",),
                        ("tokens", "shard-00000.parquet"), (".source",)}  # no _shards/, no activations.zarr


def test_store_path_keeps_urls(tmp_path):
    from mining.spec import spec_from_dict, store_path

    spec = spec_from_dict({"name": "n", "model": {"id": "smollm2-135m"}, "corpus": {"source": "builtin:python-docs"},
                           "hooks": ["blocks.0.mlp.hook_post"]})
    assert store_path(spec, "s3://bucket/run1") == "s3://bucket/run1"
    assert store_path(spec, str(tmp_path)) == tmp_path
    assert Store("file://" + str(tmp_path)).root == tmp_path  # file:// is a local directory


# ---------------------------------------------------------------- end to end on a local S3 server

JOB = """
name: s3
model: {id: smollm2-135m}
corpus: {source: "builtin:python-docs", max_tokens: 400, context_length: 64}
hooks: ["blocks.3.mlp.hook_post"]
stats: {top_k: 4}
dense: {hooks: ["blocks.3.mlp.hook_post"], token_fraction: 0.1}
compute: {actors: 2, batch_size: 4, shard_tokens: 160}
"""
BUCKET = "mining-test"
URL = f"s3://{BUCKET}/run1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on loopback, and the environment every process (driver, Ray workers) needs."""
    pytest.importorskip("boto3")
    ThreadedMotoServer = pytest.importorskip("moto.server").ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",  # read by botocore, hence s3fs, in every process
           "MINING_CACHE_DIR": str(tmp_path_factory.mktemp("cache")), "HF_HUB_OFFLINE": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3

    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=BUCKET)
    try:
        yield SimpleNamespace(env={**os.environ, **env}, client=boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def mine(*args: str, env: dict) -> subprocess.CompletedProcess:
    # a fresh process: its embedded Ray starts with (and its workers inherit) the S3 environment
    return subprocess.run([sys.executable, "-m", "mining.cli", *args], capture_output=True, text=True,
                          timeout=300, env=env, check=False)


@pytest.fixture(scope="module")
def mined(s3, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("s3job")
    job = tmp / "job.yaml"
    job.write_text(JOB)
    remote = mine("run", str(job), "--store", URL, "--no-progress", env=s3.env)
    assert remote.returncode == 0, remote.stderr[-3000:]
    local = mine("run", str(job), "--store", str(tmp / "local"), "--no-progress", env=s3.env)
    assert local.returncode == 0, local.stderr[-3000:]
    return SimpleNamespace(job=job, local=tmp / "local", tmp=tmp)


def _keys(s3) -> set[str]:
    pages = s3.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="run1/")
    return {o["Key"][len("run1/"):] for page in pages for o in page.get("Contents", [])}


@pytest.mark.slow
@pytest.mark.ray
def test_s3_store_matches_a_local_one(s3, mined):
    keys = _keys(s3)
    local = {p.relative_to(mined.local).as_posix() for p in mined.local.rglob("*") if p.is_file()}
    assert {"manifest.parquet", "job.yaml", "provenance.json", "docs.parquet", "neurons.parquet",
            "top_examples.parquet", "histograms.parquet"} <= keys
    assert any(k.startswith("tokens/shard-") for k in keys) and any(k.startswith("activations.zarr/") for k in keys)
    assert keys == local  # the same files: no temporary names left behind in either
    for name in ("top_examples", "neurons", "histograms", "bottom_examples", "docs"):
        body = s3.client.get_object(Bucket=BUCKET, Key=f"run1/{name}.parquet")["Body"].read()
        assert body == (mined.local / f"{name}.parquet").read_bytes(), name
    for key in sorted(k for k in keys if k.startswith("tokens/")):
        body = s3.client.get_object(Bucket=BUCKET, Key=f"run1/{key}")["Body"].read()
        assert pq.read_table(pa.BufferReader(body)).equals(pq.read_table(mined.local / key)), key
    markers = sorted(k for k in keys if k.startswith("_shards/shard-") and k.endswith(".json"))
    assert len(markers) == 3
    for key in markers:  # same checksums, remote and local (the timing fields differ); states are merged
        body = json.loads(s3.client.get_object(Bucket=BUCKET, Key=f"run1/{key}")["Body"].read())
        assert body["files"] == json.loads((mined.local / key).read_text())["files"]
        assert not any(k.endswith(".states.zst") for k in body["files"])
    # the merged states do not depend on which shards an actor stored first (the per-shard ones did)
    body = s3.client.get_object(Bucket=BUCKET, Key="run1/_shards/merged.json")["Body"].read()
    assert json.loads(body) == json.loads((mined.local / "_shards" / "merged.json").read_text())

    from mining.dense import read_dense

    hook = "blocks.3.mlp.hook_post"
    rt, rv = read_dense(URL, hook)
    lt, lv = read_dense(mined.local, hook)
    assert len(rt) > 0 and np.array_equal(rt, lt) and np.array_equal(rv, lv)


@pytest.mark.slow
@pytest.mark.ray
def test_s3_store_query_and_verify(s3, mined, capsys):
    r = mine("query", URL, "SELECT count(*) AS n FROM neurons", "--format", "csv", env=s3.env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["n", "1536"]  # SmolLM2-135M: 1536 MLP neurons in layer 3
    capsys.readouterr()
    assert main(["query", URL, "SELECT count(*) AS n FROM tokens", "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines() == ["n", "400"]
    # the sandbox holds: the local mirror is the only readable directory
    assert main(["query", URL, "SELECT * FROM read_text('/etc/hostname')"]) == 2
    assert "query failed" in capsys.readouterr().err

    assert main(["verify", URL]) == 0
    key = next(k for k in sorted(_keys(s3)) if k.startswith("tokens/"))
    original = s3.client.get_object(Bucket=BUCKET, Key=f"run1/{key}")["Body"].read()
    s3.client.put_object(Bucket=BUCKET, Key=f"run1/{key}", Body=original[:-10] + b"0123456789")
    try:
        capsys.readouterr()
        assert main(["verify", URL]) == 2
        out = capsys.readouterr()
        assert f"{key} does not match its checksum" in out.out and "1 problem(s)" in out.err
    finally:
        s3.client.put_object(Bucket=BUCKET, Key=f"run1/{key}", Body=original)


@pytest.mark.slow
@pytest.mark.ray
def test_s3_mirror_is_refreshed_when_the_store_changes(s3, mined):
    from mining.mirror import mirror
    from mining.query import connect, run_sql

    first = mirror(URL)
    assert mirror(URL) == first  # unchanged store: reused
    assert not (first / "_shards").exists() and not (first / "activations.zarr").exists()
    assert (first / "tokens").is_dir() and (first / "job.yaml").is_file()
    manifest = s3.client.get_object(Bucket=BUCKET, Key="run1/manifest.parquet")["Body"].read()
    neurons = pq.read_table(mined.local / "neurons.parquet")
    try:
        s3.client.put_object(Bucket=BUCKET, Key="run1/neurons.parquet", Body=_parquet(neurons.slice(0, 5)))
        s3.client.put_object(Bucket=BUCKET, Key="run1/manifest.parquet", Body=manifest)  # a re-finalized store
        assert run_sql(connect(URL), "SELECT count(*) AS n FROM neurons").to_pylist() == [{"n": 5}]
        assert not first.exists()  # the superseded version is gone
    finally:
        s3.client.put_object(Bucket=BUCKET, Key="run1/neurons.parquet",
                             Body=(mined.local / "neurons.parquet").read_bytes())


@pytest.mark.slow
@pytest.mark.ray
def test_s3_export_matches_local(s3, mined):
    from mining.export import export_examples

    out = {}
    for name, store in (("remote", URL), ("local", mined.local)):
        out[name] = mined.tmp / f"{name}.jsonl"
        assert export_examples(store, "mlp.hook_post", [(3, 7)], 2, "jsonl", out[name]) == 2
    assert out["remote"].read_text() == out["local"].read_text()


@pytest.mark.slow
@pytest.mark.ray
def test_existing_s3_store_is_refused_without_flags(s3, mined, capsys):
    # refused in prepare(), before Ray or a model is started, so in-process is safe
    assert main(["run", str(mined.job), "--store", URL, "--no-progress"]) == 2
    assert "store already exists; pass --resume" in capsys.readouterr().err
    assert main(["run", str(mined.job), "--store", "s3://no-such-bucket/x", "--no-progress"]) == 2
    assert "bucket 'no-such-bucket' does not exist" in capsys.readouterr().err
    assert "manifest.parquet" in _keys(s3)  # refusing touched nothing


def _parquet(table: pa.Table) -> bytes:
    from mining.storage import parquet_bytes

    return parquet_bytes(table)


def test_local_paths_are_unchanged(tmp_path):
    s = Store(str(tmp_path / "x"))
    assert isinstance(s.root, Path) and not s.remote and s.location == str((tmp_path / "x").resolve())
