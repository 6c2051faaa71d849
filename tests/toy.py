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


def write_toy_generative_scenario(root: Path, n: int = 60, train: int = 16, test: int = 6, seed: int = 0) -> Path:
    """Two generative JSONL tasks in sequence (the model writes a short phrase); returns the scenario YAML path."""
    rng = random.Random(1)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "describe.jsonl", "w") as f:
        for i in range(n):
            c, a = rng.choice(COLORS), rng.choice(ANIMALS)
            f.write(json.dumps({"text": f"item {i}: a {c} {a}", "label": f"{c} {a}"}) + "\n")
    with open(root / "count.jsonl", "w") as f:
        for i in range(n):
            f.write(
                json.dumps({"text": f"count to {i % 4 + 1}", "label": " ".join(str(k) for k in range(i % 4 + 2))})
                + "\n"
            )
    sizes = {t: _generative_sizes(root / f"{t}.jsonl", seed, train, test) for t in ("describe", "count")}
    (root / "toy_gen.yaml").write_text(
        f"""# python cli.py run scenario=toy_gen.yaml model=tiny
description: two toy generative tasks in sequence
tasks:
  describe:
    source: jsonl
    path: describe.jsonl
    type: generate
    prompt: "Describe: {{text}}\\nAnswer:"
    metrics: [rouge_l, exact_match]
    sizes: {{{sizes["describe"]}}}
  count:
    source: jsonl
    path: count.jsonl
    type: generate
    prompt: "{{text}}\\nAnswer:"
    metrics: [chrf, exact_match]
    sizes: {{{sizes["count"]}}}
stages:
  - {{name: describe, tasks: [describe]}}
  - {{name: count, tasks: [count]}}
"""
    )
    return root / "toy_gen.yaml"


def _generative_sizes(path: Path, seed: int, train: int, test: int) -> str:
    spec = TaskSpec(name=path.stem, source="jsonl", path=str(path), type="generate")
    held = build_task(spec, seed=seed, sample=False)
    asked = {"train": train, "validation": 4, "test": test}
    return ", ".join(f"{split}: {min(n, len(getattr(held, split)))}" for split, n in asked.items())
