"""scripts/gpu_check.py, the one command a lent GPU session runs, dry-run on the CPU (toy sizes, the CUDA kernel
emulated): a device session has 15 minutes, so the script must not be the thing that breaks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


def test_the_device_sessions_stages_run(tmp_path, smol_tokenizer):
    from mining.tiny import tiny_model

    config = tmp_path / "config"
    tiny_model("llama", vocab_size=len(smol_tokenizer)).save_pretrained(config)
    smol_tokenizer.save_pretrained(config)
    stages = ["kernel_exact", "kernel_ops", "bench", "profile", "sanitize", "families"]
    done = subprocess.run([sys.executable, str(SCRIPT), "--config", str(config), "--out", str(tmp_path / "out"),
                           "--scratch", str(tmp_path / "scratch"), "--dry-run", "--stages", ",".join(stages)],
                          capture_output=True, text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert all(report[s]["ok"] for s in stages), {s: report[s].get("error") for s in stages}
    assert report["kernel_exact"]["bfloat16"]["top"] and report["kernel_exact"]["dla_fused_bfloat16"]
    assert report["bench"]["mining_tokens_per_s"] > 0 and report["bench"]["dla_ratio"] > 0
    assert (tmp_path / "out" / "profile.txt").stat().st_size > 0
    assert report["sanitize"]["memcheck"]["rc"] == 0  # the stage's own process ran kernel_exact (unsanitized here)
    inner = json.loads((tmp_path / "out" / "sanitize-memcheck" / "report.json").read_text())
    assert inner["kernel_exact"]["ok"] and inner["kernel_exact"]["bfloat16"]["top"]
    # the emulated kernel against the CPU path: the same arithmetic, so no family may differ at all
    mismatched = {a: r["mismatches"] for a, r in report["families"]["families"].items()}
    assert mismatched == {"opt": 0, "gemma2": 0, "olmoe": 0}
    assert report["families"]["latents"] == {"opt": 128, "gemma2": 128, "olmoe": 128}  # each one's SAE was mined


def test_a_failed_stage_fails_the_script(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--config", str(tmp_path / "none"), "--out", str(tmp_path),
                           "--scratch", str(tmp_path / "scratch"), "--dry-run", "--stages", "bench"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode != 0 and "gpu_check: model" in done.stderr, done.stderr[-2000:]
    assert json.loads((tmp_path / "report.json").read_text())["model"]["ok"] is False
