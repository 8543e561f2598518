"""Trust: the embedded Ray listens on loopback only with no dashboard; a model repo's own code never
runs unless the spec says `trust_remote_code: true`; pickled checkpoints load only with
`allow_pickle: true`; `mine query` cannot write (the sandbox itself is tested in test_query.py and
the bad-input matrix)."""

import json
import subprocess
import sys

import pytest

from mining.errors import UserError
from mining.models import load_model
from mining.spec import ModelSpec
from mining.tiny import tiny_model


@pytest.mark.ray
def test_embedded_ray_listens_on_loopback_only_without_a_dashboard():
    """...and is a cluster of its own: it joins neither RAY_ADDRESS (a closed port here) nor the machine's last
    `ray start`, whose cluster may belong to another job and go away mid-run (seen with tests in parallel)."""
    code = """
import json, os, psutil, ray
from mining.ray_pool import start_ray
os.environ["RAY_ADDRESS"] = "127.0.0.1:9"
start_ray(None, num_cpus=1)
ctx = ray.get_runtime_context()
info = ray._private.worker.global_worker.node.address_info
procs = [psutil.Process()] + psutil.Process().children(recursive=True)
pids = {p.pid for p in procs}
listening = sorted({(c.laddr.ip, c.laddr.port) for c in psutil.net_connections("inet")
                    if c.status == psutil.CONN_LISTEN and c.pid in pids})
print(json.dumps({"node_ip": info["node_ip_address"], "webui": info.get("webui_url"), "listening": listening}))
ray.shutdown()
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    found = json.loads(r.stdout.strip().splitlines()[-1])
    assert found["node_ip"] == "127.0.0.1"
    assert not found["webui"]  # no dashboard
    assert found["listening"], "no listening socket found at all: the check would prove nothing"
    assert {ip for ip, _ in found["listening"]} <= {"127.0.0.1", "::1", "::ffff:127.0.0.1"}, found["listening"]


@pytest.fixture
def remote_code_model(tmp_path):
    """A model directory whose config asks for the repo's own Python, which leaves a mark if it ever runs."""
    folder = tmp_path / "remote"
    folder.mkdir()
    mark = tmp_path / "code-ran"
    (folder / "config.json").write_text(json.dumps({
        "model_type": "evil", "architectures": ["EvilModel"],
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig",
                     "AutoModelForCausalLM": "modeling_evil.EvilModel"}}))
    payload = f"open({str(mark)!r}, 'w').write('ran')\n"
    (folder / "configuration_evil.py").write_text(payload + "from transformers import PretrainedConfig\n"
                                                  "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n")
    (folder / "modeling_evil.py").write_text(payload)
    return folder, mark


def test_remote_code_does_not_run_unless_trusted(remote_code_model):
    folder, mark = remote_code_model
    with pytest.raises(UserError, match="model.id"):
        load_model(ModelSpec(id=str(folder)))
    assert not mark.exists()


def test_pickled_checkpoints_need_an_opt_in(tmp_path, smol_tokenizer):
    folder = tmp_path / "pickled"
    import torch

    model = tiny_model("llama", vocab_size=len(smol_tokenizer))
    model.save_pretrained(folder)
    (folder / "model.safetensors").unlink()  # transformers 5 writes only safetensors: the pickle by hand
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    smol_tokenizer.save_pretrained(folder)
    assert (folder / "pytorch_model.bin").exists() and not list(folder.glob("*.safetensors"))
    with pytest.raises(UserError, match="pickled weights .*allow_pickle: true"):
        load_model(ModelSpec(id=str(folder)))
    loaded = load_model(ModelSpec(id=str(folder), allow_pickle=True))  # the user's explicit choice
    assert loaded.model.config.model_type == "llama"


def test_query_is_read_only(viewer_store):
    from mining.query import connect, run_sql

    con = connect(viewer_store)
    before = sorted(p.name for p in viewer_store.iterdir())
    for sql in ("CREATE TABLE neurons2 AS SELECT * FROM neurons", "DROP VIEW neurons"):
        try:
            run_sql(con, sql)  # may succeed in the in-memory catalog; must never touch the store
        except UserError:
            pass
    assert sorted(p.name for p in viewer_store.iterdir()) == before
    with pytest.raises(UserError):
        run_sql(con, f"COPY (SELECT 1) TO '{viewer_store}/x.csv'")
    assert not (viewer_store / "x.csv").exists()
