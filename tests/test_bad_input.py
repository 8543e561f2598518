"""The bad-input matrix: every case is a real `mine` command in a subprocess that must fail with one
line (`error: ...` naming what is wrong and what to do), a non-zero exit and no traceback, and leave
the store it touched byte for byte as it was (checksums of every file before and after) or, for a
new store, nothing behind."""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from sae_files import write_saelens

pytestmark = [pytest.mark.ray]

ENV = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "TOKENIZERS_PARALLELISM": "false"}


def mine(*args, cwd=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "mining.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=ENV, timeout=timeout)


def one_line_error(r, needle, case=""):
    assert r.returncode != 0, r.stdout
    assert "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert needle.lower() in lines[0].lower(), lines[0]
    if os.environ.get("MINING_MATRIX_LOG"):  # RELIABILITY.md's table is made from these lines
        with open(os.environ["MINING_MATRIX_LOG"], "a") as f:
            f.write(f"{case}\t{lines[0]}\n")


def tree_checksums(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(viewer_store, hostile_job, tmp_path_factory):
    """A complete store, its job spec, the tiny model's directory and a scratch folder of bad inputs."""
    root = tmp_path_factory.mktemp("bad")
    job = hostile_job
    model = hostile_job.parent / "model"
    good = job.read_text()
    docs = root / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("plain words for a tiny corpus. " * 40)
    base = good.split("corpus:")[0] + f'corpus: {{source: "files:{docs}/*.txt", context_length: 32}}\n' + \
        'hooks: ["blocks.*.mlp.hook_post"]\ncompute: {actors: 1, batch_size: 4, shard_tokens: 512}\n'
    return {"store": viewer_store, "job": job, "model": model, "root": root, "base": base, "docs": docs}


# ---------------------------------------------------------------- job specs: nothing is created

def _spec_cases(w):
    base, root, model = w["base"], w["root"], w["model"]
    truncated = root / "truncated-model"
    if not truncated.exists():
        shutil.copytree(model, truncated)
        weights = truncated / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: 4096])
    pickled = root / "pickled-model"
    if not pickled.exists():
        shutil.copytree(model, pickled)
        (pickled / "model.safetensors").unlink()
        (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04 not really a pickle")
    bad_gguf = root / "garbage.gguf"
    bad_gguf.write_bytes(b"GGUF" + os.urandom(256))
    latin1 = root / "latin1"
    latin1.mkdir(exist_ok=True)
    (latin1 / "a.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    narrow_sae = root / "narrow-sae"  # an SAE of another model: it reads 16 features, the tiny Llama's stream has 32
    if not narrow_sae.exists():
        write_saelens(narrow_sae, 16, 64)
    empty = root / "empty"
    empty.mkdir(exist_ok=True)
    (empty / "a.txt").write_text("")
    (empty / "b.txt").write_text("")

    def corpus(source):
        return base.replace(f"files:{w['docs']}/*.txt", source)

    return {
        "malformed-yaml": ("name: [oops\n", "malformed YAML"),
        "not-a-mapping": ("- just\n- a list\n", "mapping"),
        "unknown-key": (base + "colour: blue\n", "colour: unknown key"),
        "mistyped-nested-key": (base + "stats: {topk: 5}\n", "stats.topk"),
        "wrong-type": (base + "stats: {top_k: many}\n", "stats.top_k"),
        "zero-top-k": (base + "stats: {top_k: 0}\n", "stats.top_k"),
        "zero-batch": (base.replace("batch_size: 4", "batch_size: 0"), "compute.batch_size"),
        "token-fraction-over-one": (base + 'dense: {hooks: ["blocks.0.mlp.hook_post"], token_fraction: 2.0}\n',
                                    "dense.token_fraction"),
        "context-longer-than-model": (base.replace("context_length: 32", "context_length: 100000"),
                                      "exceeds the model's maximum"),
        "unknown-model": (base.replace(str(model), "./no/such/model"), "model.id"),
        "package-name-for-an-alias": (base.replace(str(model), "all-minilm-l6-v2"),
                                      "did you mean the alias 'minilm-l6'?"),
        "dla-on-an-encoder": (base.replace(str(model), "minilm-l6") + "stats: {dla: true}\n",
                              "stats.dla: needs a causal LM"),
        "head-ablation-on-an-encoder": (base.replace(str(model), "minilm-l6") + "stats: {head_ablation: true}\n",
                                        "stats.head_ablation: needs a causal LM"),
        "dla-without-neurons": (base.replace("blocks.*.mlp.hook_post", "blocks.*.hook_resid_post")
                                + "stats: {dla: true}\n", "stats.dla: it reads blocks.*.mlp.hook_post neurons"),
        "missing-gguf": (base.replace(str(model), "/tmp/none.gguf"), "GGUF file"),
        "corrupt-gguf": (base.replace(str(model), str(bad_gguf)), "model.id"),
        "truncated-weights": (base.replace(str(model), str(truncated)), "model.id"),
        "pickled-weights": (base.replace(str(model), str(pickled)), "allow_pickle"),
        "non-utf8-corpus": (corpus(f"files:{latin1}/*.txt"), "not UTF-8"),
        "empty-corpus": (corpus(f"files:{empty}/*.txt"), "no tokens"),
        "corpus-glob-matches-nothing": (corpus("files:/nonexistent/*.txt"), "no files match"),
        "unknown-corpus-scheme": (corpus("ftp://x"), "corpus.source"),
        "hook-matches-nothing": (base.replace("blocks.*.mlp.hook_post", "blocks.*.mlp.hook_nothing"), "hook"),
        "layer-out-of-range": (base.replace("blocks.*.mlp.hook_post", "blocks.99.mlp.hook_post"), "layer"),
        "no-hooks": (base.replace('hooks: ["blocks.*.mlp.hook_post"]', "hooks: []"), "hooks"),
        "sae-of-another-width": (base.replace('hooks: ["blocks.*.mlp.hook_post"]',
                                              'hooks: ["blocks.1.hook_resid_post.hook_sae_acts_post"]')
                                 + f"saes: {{blocks.1.hook_resid_post: {narrow_sae}}}\n", "the SAE reads 16 features"),
    }


SPEC_CASES = ["malformed-yaml", "not-a-mapping", "unknown-key", "mistyped-nested-key", "wrong-type", "zero-top-k",
              "zero-batch", "token-fraction-over-one", "context-longer-than-model", "unknown-model",
              "package-name-for-an-alias", "dla-on-an-encoder", "head-ablation-on-an-encoder", "dla-without-neurons",
              "missing-gguf",
              "corrupt-gguf", "truncated-weights", "pickled-weights", "non-utf8-corpus", "empty-corpus",
              "corpus-glob-matches-nothing", "unknown-corpus-scheme", "hook-matches-nothing", "layer-out-of-range",
              "no-hooks", "sae-of-another-width"]


@pytest.mark.parametrize("case", SPEC_CASES)
def test_bad_job_spec(world, tmp_path, case):
    text, needle = _spec_cases(world)[case]
    (tmp_path / "job.yaml").write_text(text)
    r = mine("run", tmp_path / "job.yaml", "--store", tmp_path / "store", "--no-progress")
    one_line_error(r, needle, case)
    assert not (tmp_path / "store").exists()


# ---------------------------------------------------------------- commands against an existing store

def _store_cases(w):
    store, job = w["store"], w["job"]
    other = w["root"] / "other-hooks.yaml"
    other.write_text(job.read_text().replace('["blocks.*.mlp.hook_post"]', '["blocks.0.mlp.hook_post"]'))
    s = str(store)
    return {
        "missing-job-file": (["run", w["root"] / "missing.yaml"], "not found"),
        "set-unknown-key": (["run", job, "--store", w["root"] / "new", "--set", "stats.nope=1"], "stats.nope"),
        "set-bad-value": (["run", job, "--store", w["root"] / "new", "--set", "compute.batch_size=lots"],
                          "compute.batch_size"),
        "existing-store-without-flags": (["run", job, "--store", s], "already exists"),
        "resume-with-another-job": (["run", other, "--store", s, "--resume"], "cannot resume"),
        "bad-sql": (["query", s, "SELEC nonsense"], "syntax"),
        "unknown-table": (["query", s, "SELECT * FROM no_such_table"], "no_such_table"),
        "read-outside-store": (["query", s, "SELECT * FROM read_csv('/etc/passwd')"], ""),
        "read-outside-via-glob": (["query", s, "SELECT * FROM glob('/etc/*')"], ""),
        "write-outside-store": (["query", s, "COPY (SELECT 1) TO '/tmp/mining-escape.csv'"], "COPY"),
        "overwrite-a-store-file": (["query", s, f"COPY neurons TO '{s}/neurons.parquet'"], "COPY"),
        "lift-the-sandbox": (["query", s, "SET enable_external_access = true"], ""),
        "attach-a-database": (["query", s, "ATTACH '/tmp/mining-escape.db'"], "ATTACH"),
        "load-an-extension": (["query", s, "INSTALL httpfs"], "INSTALL/LOAD"),
        "unknown-named-query": (["query", s, "--named", "nope"], "unknown named query"),
        "missing-query-param": (["query", s, "--named", "quantiles"], "missing required parameter"),
        "unknown-query-param": (["query", s, "--named", "heads", "--param", "colour=red"], "unknown parameter"),
        "text-for-a-number": (["query", s, "--named", "quantiles", "--param", "layer=five", "--param", "neuron=1"],
                              "parameter layer='five' is not a number"),
        "export-missing-neuron": (["export", s, "--neuron", "0:99999", "--out", w["root"] / "x.jsonl"],
                                  "not in the store"),
        "export-bad-neuron-syntax": (["export", s, "--neuron", "five", "--out", w["root"] / "x.jsonl"],
                                     "LAYER:NEURON"),
        "export-into-the-store": (["export", s, "--neuron", "0:1", "--format", "html", "--out", s],
                                  "did not write"),
        "analyze-without-dense": (["analyze", s, "pca"], "dense"),
        "serve-bad-port": (["serve", s, "--port", "99999"], "--port"),
    }


STORE_CASES = ["missing-job-file", "set-unknown-key", "set-bad-value", "existing-store-without-flags",
               "resume-with-another-job", "bad-sql", "unknown-table", "read-outside-store", "read-outside-via-glob",
               "write-outside-store", "overwrite-a-store-file", "lift-the-sandbox", "attach-a-database",
               "load-an-extension", "unknown-named-query", "missing-query-param", "unknown-query-param",
               "export-missing-neuron", "export-bad-neuron-syntax", "export-into-the-store",
               "analyze-without-dense", "serve-bad-port"]


@pytest.mark.parametrize("case", STORE_CASES)
def test_bad_command_leaves_the_store_unchanged(world, case):
    args, needle = _store_cases(world)[case]
    before = tree_checksums(world["store"])
    one_line_error(mine(*args), needle, case)
    assert tree_checksums(world["store"]) == before
    assert not Path("/tmp/mining-escape.csv").exists() and not Path("/tmp/mining-escape.db").exists()
    assert not (world["root"] / "new").exists()


def test_not_a_store(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    for case, args, needle in (
            ("query-a-folder-that-is-not-a-store", ["query", tmp_path, "SELECT 1"], "not a complete store"),
            ("verify-a-folder-that-is-not-a-store", ["verify", tmp_path], "incomplete"),
            ("verify-a-missing-folder", ["verify", tmp_path / "nowhere"], "no such store"),
            ("export-from-a-folder-that-is-not-a-store",
             ["export", tmp_path, "--neuron", "0:1", "--out", tmp_path / "x.jsonl"], "not a complete store"),
            ("run-a-file-that-is-not-yaml-job", ["run", tmp_path / "notes.txt"], "")):
        one_line_error(mine(*args), needle, case)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_overwrite_refuses_a_directory_that_is_not_a_store(world, tmp_path):
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "chapter1.tex").write_text("precious")
    one_line_error(mine("run", world["job"], "--store", folder, "--overwrite"), "not a store and not empty",
                   "overwrite-a-directory-that-is-not-a-store")
    assert (folder / "chapter1.tex").read_text() == "precious"


def test_unreachable_cluster_address(world, tmp_path):
    r = mine("run", world["job"], "--store", tmp_path / "store", "--address", "127.0.0.1:1")
    one_line_error(r, "nothing answers", "unreachable-cluster-address")
    assert not (tmp_path / "store").exists()


# ---------------------------------------------------------------- disk full

@pytest.fixture
def small_disk(tmp_path):
    """A 192 KiB tmpfs: real ENOSPC from the kernel. Needs root (as in CI); skipped where mounting is not allowed."""
    mount = tmp_path / "small"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=192k", "tmpfs", str(mount)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_while_writing(world, small_disk):
    store = small_disk / "store"
    r = mine("run", world["job"], "--store", store, "--no-progress", timeout=600)
    one_line_error(r, "no space left", "disk-full-while-mining")
    assert not (store / "manifest.parquet").exists()  # never reads as complete
    one_line_error(mine("query", store, "SELECT 1"), "not a complete store", "query-a-store-left-by-a-full-disk")
