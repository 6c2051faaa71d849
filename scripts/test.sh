#!/usr/bin/env bash
# Install, lint, then run the whole test suite, the real-model tests (marker `real`) included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
