"""What a killed run resumes from: a checkpoint after every stage, and the latest one inside a stage.

In the run directory, beside the record (``results.json``, ``adapters/``, ``strategy_state/``)::

    resume/stage<k>/   after stage k (k = 0: before the first): the RNG states, the only thing
                       the record does not already hold. Only the latest is kept.
    resume/step/       the latest in-stage checkpoint (``train.checkpoint_every`` /
                       ``train.checkpoint_minutes``): trainable weights, optimizer, scheduler,
                       RNG states, position in the batch stream, the stage's running statistics.

Everything is written with :func:`continual_ft.run.state_codec.save_tree` (safetensors and JSON, never a
pickle) into a temporary folder that replaces the old one, so a kill leaves the previous
checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from continual_ft.run.state_codec import STATE_FILE, load_tree, save_tree

__all__ = ["rng_state", "set_rng_state", "StepCheckpoints", "save_boundary", "load_boundary", "RESUME_DIR"]

RESUME_DIR = "resume"


def rng_state() -> dict:
    """Every random generator a step can draw from: torch (CPU and each GPU), Python's and NumPy's."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuples(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_boundary(run_dir: Path, stages_done: int) -> None:
    """The RNG states after ``stages_done`` stages; older boundary checkpoints and the stage's step one go."""
    root = Path(run_dir) / RESUME_DIR
    save_tree(root / f"stage{stages_done}", {"stages_done": stages_done, "rng": rng_state()})
    for old in root.glob("stage*"):
        if old.name != f"stage{stages_done}":
            shutil.rmtree(old, ignore_errors=True)


def load_boundary(run_dir: Path, stages_done: int) -> dict | None:
    path = Path(run_dir) / RESUME_DIR / f"stage{stages_done}"
    return load_tree(path) if path.is_dir() else None


@dataclass
class StepCheckpoints:
    """Saves the latest in-stage checkpoint of stage ``stage`` every ``every`` steps or ``minutes`` minutes."""

    run_dir: Path
    stage: int
    every: int = 0
    minutes: float = 0.0
    write: bool = True  # False on every process but the first of a multi-process run
    resumable: bool = True  # look for a checkpoint of this stage to go on from (only a resumed run has one)
    _last: float = field(default_factory=time.monotonic, repr=False)

    @property
    def path(self) -> Path:
        return Path(self.run_dir) / RESUME_DIR / "step"

    def due(self, step: int) -> bool:
        if self.every and step % self.every == 0:
            return True
        return bool(self.minutes) and time.monotonic() - self._last >= 60 * self.minutes

    def save(self, state: dict) -> None:
        if self.write:
            save_tree(self.path, {"stage": self.stage, **state})
        self._last = time.monotonic()

    def load(self) -> dict | None:
        """The checkpoint saved inside this stage, or None (none saved, or it belongs to another stage)."""
        if not self.resumable or not (self.path / "state.json").is_file():
            return None
        state = load_tree(self.path)
        return state if state.get("stage") == self.stage else None

    @staticmethod
    def position(run_dir: Path) -> tuple[int, int] | None:
        """(stage, step) of the saved in-stage checkpoint, read without loading its tensors; None if none."""
        path = Path(run_dir) / RESUME_DIR / "step" / STATE_FILE
        try:
            tree = json.loads(path.read_text())["tree"]
            return int(tree["stage"]), int(tree["run"]["steps"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def clear(self) -> None:
        if self.write:
            shutil.rmtree(self.path, ignore_errors=True)
