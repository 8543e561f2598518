"""Shared fixtures: real weights load once per session; everything runs offline on the CPU."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests must never reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
