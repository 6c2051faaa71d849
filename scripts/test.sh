#!/usr/bin/env bash
# Install, lint, then run the whole test suite, the real-model tests (marker `real`) included.
# Then the Avalanche tests in .venv-avalanche (scripts/install_avalanche.sh says why a venv of its own);
# AVALANCHE=0 skips that part.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
if [ "${AVALANCHE:-1}" != 0 ]; then
    bash scripts/install_avalanche.sh
    .venv-avalanche/bin/python -m pytest -q tests/test_avalanche.py tests/test_avalanche_missing.py
fi
