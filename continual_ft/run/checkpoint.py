"""What a killed run resumes from between stages: the random generators' states after each stage.

In the run directory, beside the record (``results.json``, ``adapters/``, ``strategy_state/``)::

    resume/stage<k>/   after stage k (k = 0: before the first): the RNG states, the only thing
                       the record does not already hold. Only the latest is kept.
    resume/step/       the latest checkpoint inside a stage (:mod:`continual_ft.train.checkpoint`).

Written with :func:`continual_ft.state_codec.save_tree` (safetensors and JSON, never a pickle) into a
temporary folder that replaces the old one, so a kill leaves the previous checkpoint or the new one,
never half of one.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from continual_ft.state_codec import load_tree, save_tree
from continual_ft.train.checkpoint import RESUME_DIR, rng_state

__all__ = ["save_boundary", "load_boundary", "RESUME_DIR"]


def save_boundary(run_dir: Path, stages_done: int) -> None:
    """The RNG states after ``stages_done`` stages; older boundary checkpoints and the stage's step one go."""
    root = Path(run_dir) / RESUME_DIR
    save_tree(root / f"stage{stages_done}", {"stages_done": stages_done, "rng": rng_state()})
    for old in root.glob("stage*"):
        if old.name != f"stage{stages_done}":
            shutil.rmtree(old, ignore_errors=True)


def load_boundary(run_dir: Path, stages_done: int) -> dict | None:
    """The boundary checkpoint after ``stages_done`` stages (its ``rng``), or None if there is none."""
    path = Path(run_dir) / RESUME_DIR / f"stage{stages_done}"
    return load_tree(path) if path.is_dir() else None
