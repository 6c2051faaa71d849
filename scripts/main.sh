#!/usr/bin/env bash
# Install, then run the built-in default: SmolLM2-135M, legal (ScanCode licenses) then medical (ICD-10-CM).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/python cli.py run scenario=legal_then_medical strategy=naive "$@"
