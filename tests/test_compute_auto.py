"""compute.batch_size: auto and compute.shard_tokens: auto. The memory fit against synthetic peak-memory
curves and a simulated allocator (no device needed), the CPU rule on a real tiny model, and Ray jobs that
record their choice in job.yaml, mine exactly what the same job with that number given mines, and keep
the recorded number on --resume."""

import json

import numpy as np
import pytest
import yaml

from mining.batch_fit import CPU_BATCH_TOKENS, fit_batch_size, fit_to_memory
from mining.engine import ShardMiner
from mining.spec import spec_from_dict

MB = 1 << 20


def linear(fixed: int, per_context: int, calls: list | None = None):
    def peak(b: int) -> int:
        if calls is not None:
            calls.append(b)
        return fixed + per_context * b
    return peak


def test_linear_memory_fills_the_budget_in_multiples_of_eight():
    peak = linear(300 * MB, 7 * MB)
    b, how = fit_to_memory(peak, budget=2000 * MB, limit=10_000)
    assert b % 8 == 0 and peak(b) <= 2000 * MB < peak(b + 8)
    assert how["bytes_per_context"] == 7 * MB and how["fixed_bytes"] == 300 * MB
    assert how["tried"] == [[b, peak(b)]] and how["peak_bytes"] == peak(b)


def test_the_shard_caps_the_batch():
    b, _ = fit_to_memory(linear(0, MB), budget=10_000 * MB, limit=37)
    assert b == 37
    b, how = fit_to_memory(linear(0, MB), budget=10_000 * MB, limit=3)  # too small to probe: all of it
    assert b == 3 and how["rule"] == "the whole shard in one batch"


def test_memory_that_grows_faster_than_the_probes_show_is_halved_until_it_fits():
    def peak(b: int) -> int:  # linear at small batches, then a quadratic term the probes cannot see
        return 100 * MB + 4 * MB * b + (0 if b < 16 else (b * b) * MB // 8)

    b, how = fit_to_memory(peak, budget=1000 * MB, limit=4096)
    assert peak(b) <= 1000 * MB
    assert len(how["tried"]) > 1 and how["tried"][0][1] > 1000 * MB
    assert [t[0] for t in how["tried"]] == [how["tried"][0][0] // 2 ** i for i in range(len(how["tried"]))]


def test_out_of_memory_while_confirming_halves_the_batch():
    def peak(b: int) -> int:
        if b > 40:
            raise MemoryError
        return b * MB

    b, how = fit_to_memory(peak, budget=1000 * MB, limit=4096)
    assert b <= 40 and how["tried"][0] == [how["tried"][0][0], None]


def test_one_context_that_runs_is_taken_and_one_that_does_not_is_an_error():
    b, _ = fit_to_memory(linear(10 * MB, 10 * MB), budget=5 * MB, limit=64)  # over the margin, but it ran
    assert b == 1

    def out_of_memory(b: int) -> int:
        raise MemoryError

    with pytest.raises(MemoryError, match="even one context"):
        fit_to_memory(out_of_memory, budget=5 * MB, limit=64)


def test_cpu_rule_on_a_real_model(tiny_job):
    spec, loaded, shards = tiny_job
    auto = spec.to_dict()
    auto["compute"]["batch_size"] = "auto"
    miner = ShardMiner(spec_from_dict(auto), loaded)
    assert miner.batch_size is None
    with pytest.raises(ValueError, match="auto"):
        miner.mine(shards[0])
    b, how = fit_batch_size(miner, shards[0])
    contexts, T = shards[0].ids.shape
    assert b == min(contexts, CPU_BATCH_TOKENS // T) and how["device"] == "cpu"
    assert fit_batch_size(miner, shards[0].head(2))[0] == 2


def test_probe_shards_hold_the_longest_contexts_with_their_text(tiny_job):
    _, _, shards = tiny_job
    shard = shards[-1]
    assert len(set(shard.length.tolist())) > 1  # the corpus' last shard ends with a short context
    probe = shard.longest(3)
    assert sorted(probe.length.tolist()) == sorted(shard.length.tolist(), reverse=True)[:3]
    assert list(probe.ctx) == sorted(probe.ctx)
    starts = np.concatenate([[0], np.cumsum(shard.mined)])
    rows = [int(np.flatnonzero(shard.ctx == c)[0]) for c in probe.ctx]
    assert list(probe.token_text) == [t for r in rows for t in shard.token_text[starts[r]:starts[r + 1]]]
    head = shard.head(2)
    assert list(head.token_text) == list(shard.token_text[: int(shard.mined[:2].sum())])


def test_auto_matches_the_number_it_chose_when_resuming():
    from mining.store import spec_difference

    def job(batch, shards):
        return spec_from_dict({"name": "x", "model": {"id": "gpt2"}, "corpus": {"source": "builtin:python-docs"},
                               "compute": {"batch_size": batch, "shard_tokens": shards}}).to_dict()

    assert spec_difference(job(16, 65536), job("auto", "auto")) is None
    assert spec_difference(job("auto", 65536), job(8, 65536)) is None  # stopped before choosing: nothing mined
    assert spec_difference(job(16, 65536), job(8, 65536)) == "compute.batch_size"
    assert spec_difference(job(16, 65536), job(16, 4096)) == "compute.shard_tokens"


# ------------------------------------------------------------------ a real job on Ray


@pytest.fixture(scope="module")
def job(hostile_job, tmp_path_factory):
    """The tiny model over the hostile corpus, batch size auto, in shards of about 16 contexts."""
    tmp = tmp_path_factory.mktemp("batch-auto")
    text = hostile_job.read_text()
    text = text.replace("compute: {actors: 1, batch_size: 8, shard_tokens: 2048}",
                        "compute: {actors: 1, batch_size: auto, shard_tokens: 1008}")
    assert "batch_size: auto" in text
    path = tmp / "job.yaml"
    path.write_text(text)
    return path


def tables(store) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in store.glob("*.parquet") if p.name != "manifest.parquet"}


@pytest.mark.slow
@pytest.mark.ray
def test_auto_is_recorded_and_mines_what_the_number_mines(job, tmp_path, capsys):
    """Shards of about 40 contexts, so the chosen 32 splits them into batches; two actors, then one."""
    from mining.cli import main

    larger = ["--set", "compute.shard_tokens=2048"]
    assert main(["run", str(job), "--store", str(tmp_path / "auto"), "--no-progress", *larger,
                 "--set", "compute.actors=2"]) == 0
    recorded = yaml.safe_load((tmp_path / "auto" / "job.yaml").read_text())["compute"]["batch_size"]
    provenance = json.loads((tmp_path / "auto" / "provenance.json").read_text())
    assert recorded == CPU_BATCH_TOKENS // 64 < provenance["shards"][0]["contexts"]
    how = provenance["batch_size"]
    assert how["requested"] == "auto" and how["chosen"] == recorded and how["device"] == "cpu"
    out = capsys.readouterr().out
    assert f", batch {recorded})" in out and "retried" not in out

    assert main(["run", str(job), "--store", str(tmp_path / "fixed"), "--no-progress", *larger,
                 "--set", f"compute.batch_size={recorded}"]) == 0
    assert tables(tmp_path / "auto") == tables(tmp_path / "fixed")
    assert main(["run", str(job), "--store", str(tmp_path / "other"), "--no-progress", *larger,
                 "--set", "compute.batch_size=7"]) == 0
    assert tables(tmp_path / "auto") != tables(tmp_path / "other")  # the batch does reach the moments' bits


@pytest.mark.slow
@pytest.mark.ray
def test_a_failed_measurement_is_one_line_and_a_number_resumes(job, tmp_path, capsys, monkeypatch):
    from mining.cli import main

    store = tmp_path / "store"
    monkeypatch.setenv("MINING_INJECT_FAULT", "fail:fit")
    assert main(["run", str(job), "--store", str(store), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "compute.batch_size: auto could not be measured" in err[0], err
    assert not list((store / "_shards").glob("shard-*.json"))  # nothing was mined
    monkeypatch.delenv("MINING_INJECT_FAULT")
    assert main(["run", str(job), "--store", str(store), "--no-progress", "--resume",
                 "--set", "compute.batch_size=4"]) == 0
    assert yaml.safe_load((store / "job.yaml").read_text())["compute"]["batch_size"] == 4


@pytest.mark.slow
@pytest.mark.ray
def test_resume_keeps_the_recorded_batch_size(job, tmp_path, capsys):
    from mining.cli import main

    store = tmp_path / "store"
    assert main(["run", str(job), "--store", str(store), "--no-progress", "--set", "compute.batch_size=3"]) == 0
    before = tables(store)
    (store / "_shards" / "shard-00001.json").unlink()
    capsys.readouterr()
    assert main(["run", str(job), "--store", str(store), "--no-progress", "--resume"]) == 0  # the job says auto
    assert ", batch 3)" in capsys.readouterr().out
    assert yaml.safe_load((store / "job.yaml").read_text())["compute"]["batch_size"] == 3
    assert "batch_size" not in json.loads((store / "provenance.json").read_text())  # a number, not auto
    assert tables(store) == before
    # an explicit different number is still refused: the shards were mined with 3
    assert main(["run", str(job), "--store", str(store), "--no-progress", "--resume",
                 "--set", "compute.batch_size=5"]) != 0


# ------------------------------------------------------------------ the CUDA probe, on a simulated allocator


class FakeAllocator:
    """torch.cuda's memory counters over a simulated device: what a miner's mine() allocates."""

    def __init__(self, free: int):
        self.free, self.allocated, self.peak = free, 0, 0

    def install(self, monkeypatch):
        import torch

        for name, fn in (("synchronize", lambda *a: None), ("empty_cache", lambda: None),
                         ("reset_peak_memory_stats", lambda *a: setattr(self, "peak", self.allocated)),
                         ("memory_allocated", lambda *a: self.allocated),
                         ("max_memory_allocated", lambda *a: self.peak),
                         ("mem_get_info", lambda *a: (self.free, 2 * self.free)),
                         ("get_device_name", lambda *a: "simulated")):
            monkeypatch.setattr(torch.cuda, name, fn)


class FakeMiner:
    """Mines a shard in batches of `batch_size`; each batch holds 3 MB a context on top of 50 MB."""

    def __init__(self, allocator: FakeAllocator, oom_above: int):
        import types

        import torch

        self.alloc, self.oom_above, self.batch_size, self.seen = allocator, oom_above, None, []
        self.loaded = types.SimpleNamespace(device=torch.device("cuda"))

    def mine(self, shard):
        import torch

        contexts = len(shard.ids)
        self.seen.append((contexts, self.batch_size))
        step = 50 * MB + 3 * MB * min(self.batch_size, contexts)
        if min(self.batch_size, contexts) > self.oom_above:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        self.alloc.peak = max(self.alloc.peak, self.alloc.allocated + step)


def test_cuda_fit_measures_each_probe_as_one_batch_and_restores_the_miner(monkeypatch, tiny_job):
    _, _, shards = tiny_job
    shard = shards[0]
    assert len(shard.ids) == 9  # 512 tokens of 63
    # memory-bound: (0.85 * 70 MB - 50 MB) // 3 MB = 3 contexts
    alloc = FakeAllocator(70 * MB)
    alloc.install(monkeypatch)
    miner = FakeMiner(alloc, oom_above=10_000)
    b, how = fit_batch_size(miner, shard)
    assert b == 3 and how["bytes_per_context"] == 3 * MB and how["fixed_bytes"] == 50 * MB
    assert how["peak_bytes"] == 59 * MB <= how["budget_bytes"] and how["device"] == "simulated"
    assert miner.batch_size is None  # the probes' batch sizes are not left behind
    assert [c for c, _ in miner.seen] == [2, 4, 3] and all(c == batch for c, batch in miner.seen)  # one batch each
    # room for the whole shard, but out of memory above 5 contexts: 9 fails, 4 runs
    alloc = FakeAllocator(10_000 * MB)
    alloc.install(monkeypatch)
    b, how = fit_batch_size(FakeMiner(alloc, oom_above=5), shard)
    assert b == 4 and how["tried"] == [[9, None], [4, 62 * MB]]


@pytest.mark.slow
@pytest.mark.ray
def test_shard_tokens_auto_follows_the_actors_device_and_resume_keeps_it(job, tmp_path, monkeypatch, capsys):
    import mining.ray_pool
    from mining.cli import main
    from mining.spec import CPU_SHARD_TOKENS, GPU_SHARD_TOKENS

    def recorded(store):
        return yaml.safe_load((store / "job.yaml").read_text())["compute"]

    assert main(["run", str(job), "--store", str(tmp_path / "cpu"), "--no-progress",
                 "--set", "compute.shard_tokens=auto"]) == 0
    assert recorded(tmp_path / "cpu")["shard_tokens"] == CPU_SHARD_TOKENS
    # on GPUs the shards are 16 times longer (the driver's view of the actors is all that changes here)
    monkeypatch.setattr(mining.ray_pool, "actors_on_gpus", lambda spec, address: True)
    store = tmp_path / "gpu"
    assert main(["run", str(job), "--store", str(store), "--no-progress", "--set", "compute.shard_tokens=auto"]) == 0
    assert recorded(store)["shard_tokens"] == GPU_SHARD_TOKENS
    monkeypatch.undo()
    (store / "_shards" / "shard-00000.json").unlink()
    capsys.readouterr()
    assert main(["run", str(job), "--store", str(store), "--no-progress", "--resume",
                 "--set", "compute.shard_tokens=auto"]) == 0  # the driver now sees CPUs: the recorded size stays
    assert recorded(store)["shard_tokens"] == GPU_SHARD_TOKENS
    assert "in 1 shards (1 this run)" in capsys.readouterr().out
