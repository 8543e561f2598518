"""Bad input: one clear line, a non-zero exit, no traceback, and no store left behind."""

import subprocess
import sys

import pytest

GOOD = """name: bad
model: {id: smollm2-135m}
corpus: {source: "builtin:python-docs", max_tokens: 200, context_length: 32}
hooks: ["blocks.1.mlp.hook_post"]
"""

CASES = {
    "malformed-yaml": ("name: [oops\n", "malformed YAML"),
    "unknown-key": (GOOD + "colour: blue\n", "colour: unknown key"),
    "missing-corpus-file": (GOOD.replace("builtin:python-docs", "files:/nonexistent/*.txt"), "no files match"),
    "bad-hook": (GOOD.replace("blocks.1.mlp.hook_post", "blocks.1.mlp.hook_postt"), "hook"),
    "layer-out-of-range": (GOOD.replace("blocks.1.", "blocks.99."), "layer"),
    "unknown-model": (GOOD.replace("smollm2-135m", "./no/such/model"), "model.id"),
    "missing-gguf": (GOOD.replace("smollm2-135m", "/tmp/none.gguf"), "GGUF file"),
    "context-too-long": (GOOD.replace("context_length: 32", "context_length: 100000"), "exceeds the model's maximum"),
    "zero-batch": (GOOD + "compute: {batch_size: 0}\n", "compute.batch_size"),
}


def mine(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "mining.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(__import__("pathlib").Path.home())},
                          timeout=300)


def one_line_error(r, needle):
    assert r.returncode != 0, r.stdout
    assert "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert needle.lower() in lines[0].lower(), lines[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_job_specs(tmp_path, case):
    text, needle = CASES[case]
    (tmp_path / "job.yaml").write_text(text)
    r = mine("run", str(tmp_path / "job.yaml"), "--store", str(tmp_path / "store"), "--no-progress")
    one_line_error(r, needle)
    assert not (tmp_path / "store").exists()


def test_cli_usage_errors(tmp_path):
    one_line_error(mine("run", str(tmp_path / "missing.yaml")), "not found")
    one_line_error(mine("query", str(tmp_path / "nostore"), "SELECT 1"), "")
    one_line_error(mine("query", str(tmp_path), "--named", "nope"), "")
    r = mine("queries")
    assert r.returncode == 0 and "top-activations" in r.stdout and "heavy-tailed" in r.stdout


def test_bad_sql_on_a_store(tmp_path):
    from synthetic_store import make_synthetic_store

    store = str(make_synthetic_store(tmp_path / "s"))
    one_line_error(mine("query", store, "SELEC nonsense"), "")
    one_line_error(mine("query", store, "SELECT * FROM read_csv('/etc/passwd')"), "")
    r = mine("query", store, "SELECT count(*) AS n FROM neurons", "--format", "csv")
    assert r.returncode == 0 and r.stdout.splitlines()[0] == "n"


def test_unreachable_cluster_address(tmp_path):
    (tmp_path / "job.yaml").write_text(GOOD)
    r = mine("run", str(tmp_path / "job.yaml"), "--store", str(tmp_path / "store"), "--address", "127.0.0.1:1")
    one_line_error(r, "nothing answers")
    assert not (tmp_path / "store").exists()
