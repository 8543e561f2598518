"""Shared fixtures: real weights load once per session; everything runs offline on the CPU."""

import atexit
import gc
import os
import sys

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


@pytest.fixture(scope="session")
def viewer_store(tmp_path_factory, smol_tokenizer):
    """A tiny Llama (SmolLM2's tokenizer) mined over hostile text with every table the viewer shows."""
    from mining.cli import main
    from mining.tiny import tiny_model

    root = tmp_path_factory.mktemp("viewer")
    model = root / "model"
    tiny_model("llama", vocab_size=len(smol_tokenizer), max_position_embeddings=256).save_pretrained(model)
    smol_tokenizer.save_pretrained(model)
    docs = root / "docs"
    docs.mkdir()
    prose = ("The parser reads a token, then the next one, and the value bound to a name is looked up "
             "in the enclosing scope before the call returns. ")
    for i in range(6):
        (docs / f"doc{i}.txt").write_text((HOSTILE + " " + prose) * 6, encoding="utf-8")
    job = root / "job.yaml"
    job.write_text(f"""
name: hostile
model: {{id: "{model}"}}
corpus: {{source: "files:{docs}/*.txt", context_length: 64}}
hooks: ["blocks.*.mlp.hook_post"]
stats: {{top_k: 8, quantile_samples: 2, dla: true, logit_lens: true, heads: true}}
compute: {{actors: 1, batch_size: 8, shard_tokens: 2048}}
""")
    assert main(["run", str(job), "--store", str(root / "store"), "--no-progress"]) == 0
    return root / "store"


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


# The modules that take longest, longest first (measured serially on 2 cores, 2026-12-06: test_runner.py 370 s down
# to test_end_to_end.py 40 s). The README's `-n 3` gives each worker a module at a time in this order; in file order
# test_runner.py started last and ran with the cores partly idle for its last minutes.
LONGEST_FIRST = ("test_runner.py", "test_bad_input.py", "test_faults.py", "test_submit.py", "test_bench.py",
                 "test_demo.py", "test_compute_auto.py", "test_object_store.py", "test_diff.py",
                 "test_viewer_browser.py", "test_quantize.py", "test_finetune_diff.py", "test_gpu_check.py",
                 "test_cuda_build.py", "test_patterns.py", "test_polysemanticity.py", "test_analyze.py",
                 "test_end_to_end.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the other modules keep their order


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

    def exit_now() -> None:  # registered last, so it runs first of the atexit handlers
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)

    atexit.register(exit_now)
