"""A toy two-task scenario written to a temporary folder, for tests that run the whole pipeline."""

from __future__ import annotations

import json
import random
from pathlib import Path

COLORS = ["red", "blue", "green"]
ANIMALS = ["cat", "dog", "bird"]


def write_toy_scenario(root: Path, n: int = 80, train: int = 24, test: int = 8) -> Path:
    """Two JSONL tasks (colors, animals) in sequence; returns the scenario YAML path."""
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
    sizes: {{train: {train}, validation: 4, test: {test}}}
  animals:
    source: jsonl
    path: animals.jsonl
    prompt: "Animal in: {{text}}\\nAnswer:"
    labels: [{", ".join(ANIMALS)}]
    sizes: {{train: {train}, validation: 4, test: {test}}}
stages:
  - {{name: colors, tasks: [colors]}}
  - {{name: animals, tasks: [animals]}}
"""
    )
    return root / "toy.yaml"
