"""The latest checkpoint inside a stage, what it saves of the stage's progress, and the random generators' states.

In the run directory::

    resume/step/   the latest in-stage checkpoint (``train.checkpoint_every`` / ``train.checkpoint_minutes``):
                   trainable weights, optimizer, scheduler, RNG states, the best weights so far, and the
                   stage's :class:`StageProgress` under ``run`` (its place in the batch stream, its statistics).

Written with :func:`continual_ft.state_codec.save_tree` (safetensors and JSON, never a pickle) into a
temporary folder that replaces the old one, so a kill leaves the previous checkpoint or the new one,
never half of one. The checkpoints between stages (:mod:`continual_ft.run.checkpoint`) sit beside it.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from continual_ft.state_codec import STATE_FILE, load_tree, save_tree

__all__ = ["rng_state", "set_rng_state", "StageProgress", "StepCheckpoints", "RESUME_DIR"]

#: The run directory's folder of what a killed run resumes from.
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
    """Put back the generators' states :func:`rng_state` took."""
    torch.set_rng_state(state["torch"])
    random.setstate(_tuples(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class StageProgress:
    """How far a stage has got: everything but tensors that a resumed stage needs to go on exactly.

    Saved as one dict (:meth:`to_state`) and read back from it (:meth:`from_state`), both over
    ``dataclasses.fields``: a field added here is saved and restored with no other change
    (``tests/test_stage_progress.py`` checks the round trip through the checkpoint files).
    """

    steps: int = 0  # optimizer steps done
    drawn: int = 0  # micro-batches drawn from the seeded batch stream; a resumed stage skips as many
    tokens: int = 0  # real (non-padding) tokens trained on
    seconds: float = 0.0  # training time so far, validation and checkpoints excluded
    loss_sum: float = 0.0  # summed answer-token loss, over all processes
    loss_tokens: int = 0  # the answer tokens it sums over
    last_loss: float | None = None  # the last step's finite loss per token, for the message if one is not
    penalty_sum: float | None = None  # the strategies' penalty summed over steps; None while none gave one
    val_losses: list[float] = field(default_factory=list)
    best_val_loss: float | None = None
    bad_evals: int = 0  # validations since the best one (early stopping's patience)

    def to_state(self) -> dict:
        """Every field by its name, as :func:`~continual_ft.state_codec.save_tree` stores it."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_state(cls, state: dict) -> StageProgress:
        """The progress :meth:`to_state` gave. A field a checkpoint lacks, written before the field existed
        (``penalty_sum``), takes its default."""
        return cls(**{f.name: state[f.name] for f in fields(cls) if f.name in state})


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
        """Whether ``step`` ends an interval: ``every`` steps, or ``minutes`` since the last save."""
        if self.every and step % self.every == 0:
            return True
        return bool(self.minutes) and time.monotonic() - self._last >= 60 * self.minutes

    def save(self, progress: StageProgress, state: dict) -> None:
        """Replace the checkpoint with ``progress`` and ``state`` (tensors: weights, optimizer, ...)."""
        if self.write:
            save_tree(self.path, {"stage": self.stage, **state, "run": progress.to_state()})
        self._last = time.monotonic()

    def load(self) -> tuple[StageProgress, dict] | None:
        """The progress and state saved inside this stage, or None (none saved, or it belongs to another stage)."""
        if not self.resumable or not (self.path / STATE_FILE).is_file():
            return None
        state = load_tree(self.path)
        if state.get("stage") != self.stage:
            return None
        # Checkpoints written before the stream position joined the progress hold it beside it.
        moved = {"drawn": state.pop("drawn")} if "drawn" in state else {}
        return StageProgress.from_state({**moved, **state.pop("run")}), state

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
        """Remove the checkpoint: its stage is done and recorded."""
        if self.write:
            shutil.rmtree(self.path, ignore_errors=True)
