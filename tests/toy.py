"""A toy two-task scenario written to a temporary folder, for tests that run the whole pipeline."""

from __future__ import annotations

import json
import random
from pathlib import Path

from continual_ft.data.tasks import TaskSpec, build_task

COLORS = ["red", "blue", "green"]
ANIMALS = ["cat", "dog", "bird"]


def _sizes(path: Path, seed: int, **asked: int) -> str:
    """``asked`` as YAML sizes, each capped at what the file's split holds (asking for more is an error)."""
    held = build_task(TaskSpec(name=path.stem, source="jsonl", path=str(path)), seed=seed, sample=False)
    return ", ".join(f"{split}: {min(n, len(getattr(held, split)))}" for split, n in asked.items())


def write_toy_scenario(root: Path, n: int = 80, train: int = 24, test: int = 8, seed: int = 0) -> Path:
    """Two JSONL tasks (colors, animals) in sequence; returns the scenario YAML path.

    With a small ``n`` a split may hold fewer than ``train``/4/``test`` examples; the sizes then
    ask for what it holds under the run's ``seed`` (which decides the split).
    """
    rng = random.Random(0)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "colors.jsonl", "w") as f:
        for i in range(n):
            c = rng.choice(COLORS)
            f.write(json.dumps({"text": f"the {c} thing {i}", "label": c}) + "\n")
    with open(root / "animals.jsonl", "w") as f:
        for i in range(n):
            a = rng.choice(ANIMALS)
            f.write(json.dumps({"text": f"a small {a} named {i}", "label": a}) + "\n")
    sizes = {t: _sizes(root / f"{t}.jsonl", seed, train=train, validation=4, test=test) for t in ("colors", "animals")}
    (root / "toy.yaml").write_text(
        f"""# python cli.py run scenario=toy.yaml model=tiny
description: two toy tasks in sequence
metric: accuracy
tasks:
  colors:
    source: jsonl
    path: colors.jsonl
    prompt: "Color of: {{text}}\\nAnswer:"
    labels: [{", ".join(COLORS)}]
    sizes: {{{sizes["colors"]}}}
  animals:
    source: jsonl
    path: animals.jsonl
    prompt: "Animal in: {{text}}\\nAnswer:"
    labels: [{", ".join(ANIMALS)}]
    sizes: {{{sizes["animals"]}}}
stages:
  - {{name: colors, tasks: [colors]}}
  - {{name: animals, tasks: [animals]}}
"""
    )
    return root / "toy.yaml"
