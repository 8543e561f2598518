"""Shared fixtures: real weights load once per session; everything runs offline on the CPU."""

import atexit
import gc
import os
import shutil
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests must never reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# OpenMP workers (torch's libgomp and numba's) sleep when idle instead of spinning. Each process's runtime spins after
# every parallel region as if it had the cores to itself; the suite runs 3 workers on 2 cores, each with its Ray
# actors and `mine` processes, so those spins took the cores from the others' work. Read when each runtime loads:
# set before any test module imports torch, inherited by the subprocesses and the Ray clusters the tests start. The
# same 47 Ray tests with `-n 3`, the two settings alternately: 273 s spinning, 234 s passive; 198 s passive, 220 s
# spinning (2026-12-06). A lone process is faster spinning (BENCHMARKS.md, session 22), so `mine` keeps the default.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")


@pytest.fixture(scope="session")
def smollm2():
    from mining.models import load_model
    from mining.spec import ModelSpec

    return load_model(ModelSpec(id="smollm2-135m"))


@pytest.fixture(scope="session")
def smol_tokenizer():
    from mining.models import load_tokenizer
    from mining.spec import ModelSpec

    return load_tokenizer(ModelSpec(id="smollm2-135m"))


@pytest.fixture(scope="session")
def minilm_tokenizer():
    from mining.models import load_tokenizer
    from mining.spec import ModelSpec

    return load_tokenizer(ModelSpec(id="minilm-l6"))


# A corpus whose text tries to break out of HTML: every context the viewer shows contains it.
HOSTILE = ('<script>alert("x")</script> "><img src=x onerror=alert(1)> '
           "\u202eevil\u202c zero\u200bwidth caf\u00e9 \U0001f600 &amp; </textarea>")


def shared_dir(tmp_path_factory: pytest.TempPathFactory, name: str, build) -> Path:
    """A folder built once for the whole run, by whichever xdist worker asks first; the others wait for it.

    Each worker is a process with its own session fixtures, so a session fixture is built once a worker: the
    viewer's store (a Ray job) three times under `-n 3`. `build(folder)` fills a fresh folder; a marker written
    after it says the folder is complete, and a build that failed is started over by the next worker asking."""
    from filelock import FileLock

    if not os.environ.get("PYTEST_XDIST_WORKER"):
        folder = tmp_path_factory.mktemp(name)
        build(folder)
        return folder
    runs = tmp_path_factory.getbasetemp().parent  # shared by the run's workers (pytest-of-USER/pytest-N)
    folder, done = runs / f"shared-{name}", runs / f"shared-{name}.done"
    with FileLock(str(runs / f"shared-{name}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def hostile_job(tmp_path_factory, smol_tokenizer) -> Path:
    """A tiny Llama (SmolLM2's tokenizer) and a job over hostile text with every table the viewer shows; the
    job file is `job.yaml` beside `model/` and `docs/`."""
    from mining.tiny import tiny_model

    def build(root: Path) -> None:
        model = root / "model"
        tiny_model("llama", vocab_size=len(smol_tokenizer), max_position_embeddings=256).save_pretrained(model)
        smol_tokenizer.save_pretrained(model)
        docs = root / "docs"
        docs.mkdir()
        prose = ("The parser reads a token, then the next one, and the value bound to a name is looked up "
                 "in the enclosing scope before the call returns. ")
        for i in range(6):
            (docs / f"doc{i}.txt").write_text((HOSTILE + " " + prose) * 6, encoding="utf-8")
        (root / "job.yaml").write_text(f"""
name: hostile
model: {{id: "{model}"}}
corpus: {{source: "files:{docs}/*.txt", context_length: 64}}
hooks: ["blocks.*.mlp.hook_post"]
stats: {{top_k: 8, quantile_samples: 2, dla: true, logit_lens: true, heads: true}}
compute: {{actors: 1, batch_size: 8, shard_tokens: 2048}}
""")

    return shared_dir(tmp_path_factory, "hostile-job", build) / "job.yaml"


@pytest.fixture(scope="session")
def viewer_store(tmp_path_factory, hostile_job) -> Path:
    """hostile_job mined: a store every worker reads and none writes (the `store/` beside its job.yaml)."""
    from mining.cli import main

    def build(folder: Path) -> None:
        assert main(["run", str(hostile_job), "--store", str(folder / "store"), "--no-progress"]) == 0

    return shared_dir(tmp_path_factory, "viewer-store", build) / "store"


@pytest.fixture(scope="session")
def tiny_job(tmp_path_factory, smol_tokenizer):
    """A tiny random Llama, its spec (mining, DLA, token table, gate cases, a dense hook) and planned shards."""
    from mining.models import load_model
    from mining.runner import plan
    from mining.spec import spec_from_dict
    from mining.tiny import tiny_model

    folder = tmp_path_factory.mktemp("tiny-llama-device")
    tiny_model("llama", vocab_size=len(smol_tokenizer)).save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    spec = spec_from_dict({
        "name": "device", "model": {"id": str(folder)},
        "corpus": {"source": "builtin:python-docs", "max_tokens": 1500, "context_length": 64},
        "hooks": ["blocks.*.mlp.hook_post"],
        "stats": {"top_k": 6, "dla": True, "token_table": True, "gate_cases": True},
        "dense": {"hooks": ["blocks.1.mlp.hook_post"], "token_fraction": 0.3},
        "compute": {"batch_size": 4, "shard_tokens": 512},
    })
    loaded = load_model(spec.model)
    shards, _ = plan(spec, loaded.tokenizer)
    return spec, loaded, shards


# The modules that take longest, longest first (their tests' durations summed under `-n 3`, 2026-12-07: test_runner.py
# 436 s down to test_encoder.py 14 s). The README's `-n 3` gives each worker a module at a time in this order; in
# file order test_runner.py started last and ran with the cores partly idle for its last minutes.
LONGEST_FIRST = ("test_runner.py", "test_faults.py", "test_bad_input.py", "test_compute_auto.py", "test_diff.py",
                 "test_submit.py", "test_demo.py", "test_polysemanticity.py", "test_end_to_end.py",
                 "test_object_store.py", "test_bench.py", "test_quantize.py", "test_kernels_boundscheck.py",
                 "test_finetune_diff.py", "test_dla_archs.py", "test_patterns.py", "test_sae.py",
                 "test_viewer_browser.py", "test_cuda_sanitized.py", "test_gpu_check.py", "test_cuda_build.py",
                 "test_export.py", "test_analyze.py", "test_dla.py", "test_encoder.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the other modules keep their order


def _release_temp(config: pytest.Config, basetemp: Path) -> None:
    """What pytest's atexit handlers do for the run's numbered temporary folder (pytest-of-USER/pytest-N), which
    os._exit skips: unlock it, and remove older runs' beyond tmp_path_retention_count. Skipped, every run's stores
    stayed in /tmp until their locks were three days old (59 GB at session 34's start)."""
    (basetemp / ".lock").unlink(missing_ok=True)
    try:
        from _pytest.pathlib import cleanup_numbered_dir
        from _pytest.tmpdir import LOCK_TIMEOUT

        keep = int(config.getini("tmp_path_retention_count"))
        cleanup_numbered_dir(basetemp.parent, "pytest-", keep, basetemp.stat().st_mtime - LOCK_TIMEOUT)
    except (ImportError, OSError, ValueError):  # another pytest's internals: its own atexit cleanup was skipped too
        pass


@pytest.hookimpl(trylast=True)  # after pytest's own, which tears the session's fixtures down
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """End the run's native machinery while the interpreter is whole, then skip its teardown.

    The test process, unlike a `mine` command, ends holding an in-process Ray driver, two OpenMP runtimes'
    thread pools (torch's and numba's), DuckDB connections used from server threads, zarr's and fsspec's
    event-loop threads and dozens of models. A CI run (session 18's) segfaulted after "525 passed", in the
    interpreter's teardown of that mix (exit 139); no local run has reproduced it. So Ray shuts down and the
    garbage is collected here, where a crash still fails loudly with pytest's traceback, and the process then
    exits with pytest's status before the interpreter tears down modules and threads. Every `mine` process
    the tests start exits the normal way, and its exit status is checked (tests/test_exit_status.py checks
    this hook keeps pytest's)."""
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    gc.collect()
    status = int(exitstatus)
    factory = getattr(session.config, "_tmp_path_factory", None)
    basetemp = getattr(factory, "_basetemp", None)
    if basetemp is not None and getattr(factory, "_given_basetemp", None) is None:
        _release_temp(session.config, Path(basetemp))

    def exit_now() -> None:  # registered last, so it runs first of the atexit handlers
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)

    atexit.register(exit_now)
