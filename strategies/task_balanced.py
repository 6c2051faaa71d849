"""Task-balanced sampling: resample a stage's training set so each task gets a chosen share.

Useful for multi-task stages whose tasks differ in size, and after replay (``replay+task_balanced``),
where it rebalances the mixed set of current and replayed examples by ``Example.task``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from continual_ft.data.tasks import Example
from continual_ft.errors import ContinualFTError
from continual_ft.train.protocol import StageInfo, Strategy

__all__ = ["TaskBalanced", "TaskBalancedConfig", "task_shares"]


@dataclass
class TaskBalancedConfig:
    temperature: float = field(
        default=0.0, metadata={"help": "share of task t ∝ n_t^T: 1 = proportional to size, 0 = equal per task"}
    )
    total: int = field(default=0, metadata={"help": "examples per stage after resampling; 0 = as many as given"})
    seed: int = field(default=0, metadata={"help": "seed for the resampling"})

    def __post_init__(self):
        if self.temperature < 0:
            raise ContinualFTError(f"task_balanced.temperature must be >= 0, got {self.temperature}")
        if self.total < 0:
            raise ContinualFTError(f"task_balanced.total must be >= 0, got {self.total}")


def task_shares(counts: dict[str, int], temperature: float, total: int) -> dict[str, int]:
    """Integer counts c_t ≈ total · n_t^T / Σ_s n_s^T, rounded by largest remainder so they sum to ``total``."""
    weights = {t: n**temperature for t, n in counts.items()}
    norm = sum(weights.values())
    exact = {t: total * w / norm for t, w in weights.items()}
    out = {t: int(x) for t, x in exact.items()}
    by_remainder = sorted(exact, key=lambda t: exact[t] - out[t], reverse=True)
    for t in by_remainder[: total - sum(out.values())]:
        out[t] += 1
    return out


class TaskBalanced(Strategy):
    """Resample the stage's examples so task t contributes

        c_t = total · n_t^T / Σ_s n_s^T

    examples (n_t: its examples in the incoming set; T = ``temperature``: 1 keeps the natural
    proportions, 0 gives every task the same share, 0.5 is in between). Within a task, examples are
    drawn without repetition while c_t ≤ n_t and in whole passes plus a sample beyond that, so a
    small task is oversampled and a large one subsampled; the result is shuffled with a seeded RNG.
    """

    name = "task_balanced"
    summary = "Resample each stage's examples so each task contributes a set share (natural to equal, by temperature)."
    uses_model = False  # picks data only: runs under FSDP too

    def __init__(self, config: TaskBalancedConfig | None = None):
        self.config = config or TaskBalancedConfig()

    def train_data(self, stage: StageInfo, examples: list[Example]) -> list[Example]:
        if not examples:
            return examples
        by_task: dict[str, list[Example]] = {}
        for e in examples:
            by_task.setdefault(e.task, []).append(e)
        total = self.config.total or len(examples)
        shares = task_shares({t: len(v) for t, v in by_task.items()}, self.config.temperature, total)
        rng = random.Random(f"{self.config.seed}:{stage.index}")
        out = []
        for task, pool in by_task.items():
            whole, rest = divmod(shares[task], len(pool))
            out += pool * whole + rng.sample(pool, rest)
        rng.shuffle(out)
        return out
