"""Experience replay: keep a small buffer of earlier tasks' training examples and mix it into later stages.

The buffer holds :class:`Example` text (prompt, answer, task), not tokens or activations, so it is
model-independent and survives a change of model, tokenizer or adapter mode.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

from torch import nn

from continual_ft.data.tasks import Example
from continual_ft.errors import ContinualFTError
from continual_ft.train.protocol import StageInfo, Strategy

__all__ = ["Replay", "ReplayConfig", "POLICIES"]

POLICIES = {
    "reservoir": "Vitter's algorithm R over every example seen: a uniform sample of the whole stream",
    "task_balanced": "an equal share of the buffer per earlier task, re-balanced when a new task arrives",
}


@dataclass
class ReplayConfig:
    buffer_size: int = field(default=200, metadata={"help": "examples kept in the rehearsal buffer"})
    ratio: float = field(
        default=0.25, metadata={"help": "expected fraction of each batch drawn from the buffer, in (0, 1)"}
    )
    policy: str = field(default="reservoir", metadata={"help": f"which examples to keep: {', '.join(POLICIES)}"})
    seed: int = field(default=0, metadata={"help": "seed for filling the buffer and drawing from it"})

    def __post_init__(self):
        if self.buffer_size < 1:
            raise ContinualFTError(f"replay.buffer_size must be >= 1, got {self.buffer_size}")
        if not 0 < self.ratio < 1:
            raise ContinualFTError(f"replay.ratio must be in (0, 1), got {self.ratio}")
        if self.policy not in POLICIES:
            raise ContinualFTError(f"replay.policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")


def draw(pool: list, k: int, rng: random.Random) -> list:
    """``k`` items of ``pool``: without repetition when ``k <= len(pool)``, else whole passes plus a sample."""
    whole, rest = divmod(k, len(pool))
    return pool * whole + rng.sample(pool, rest)


class Replay(Strategy):
    """Rehearsal: train stage k on its own examples plus ``m`` examples drawn from the buffer,

        m = round(ratio / (1 − ratio) · n_current),

    so a shuffled batch holds a ``ratio`` share of replayed examples in expectation (drawn without
    repetition while the buffer is large enough, with whole passes over it otherwise).

    The buffer is filled in ``after_stage`` from the stage's own examples, so when stage k's
    ``train_data`` runs it holds only tasks of stages < k, and never more than ``buffer_size``:

    * ``reservoir`` (Vitter 1985, algorithm R): the n-th example seen replaces a random slot with
      probability ``buffer_size / n``, so every example seen so far is kept with equal probability.
    * ``task_balanced``: with T tasks seen, each task keeps ``buffer_size // T`` examples (the first
      ``buffer_size % T`` tasks one more); a new task shrinks the earlier tasks' shares by random
      eviction (their stored order is already random). A task with fewer examples than its share
      keeps all it has; the spare slots stay empty.
    """

    name = "replay"
    summary = "Rehearsal: mix a share of examples from a buffer of earlier stages into each stage's own."
    uses_model = False  # picks data only: runs under FSDP too

    def __init__(self, config: ReplayConfig | None = None):
        self.config = config or ReplayConfig()
        self.buffer: list[Example] = []
        self.seen = 0  # examples offered to the reservoir so far (algorithm R's n)
        self.tasks: list[str] = []  # tasks in the order they were first buffered

    def _rng(self, purpose: str, stage: StageInfo) -> random.Random:
        # Derived from (seed, purpose, stage) rather than a running generator, so a run resumed from
        # state_dict draws exactly what the uninterrupted run would have drawn.
        return random.Random(f"{self.config.seed}:{purpose}:{stage.index}")

    def train_data(self, stage: StageInfo, examples: list[Example]) -> list[Example]:
        if not self.buffer:
            return examples
        ratio = self.config.ratio
        k = round(ratio / (1 - ratio) * len(examples))
        return examples + draw(self.buffer, k, self._rng("mix", stage))

    def after_stage(self, model: nn.Module, stage: StageInfo) -> None:
        rng = self._rng("fill", stage)
        if self.config.policy == "reservoir":
            self._reservoir(stage.examples, rng)
        else:
            self._task_balanced(stage.examples, rng)

    def _reservoir(self, examples: list[Example], rng: random.Random) -> None:
        size = self.config.buffer_size
        for example in examples:
            self.seen += 1
            if len(self.buffer) < size:
                self.buffer.append(example)
            else:
                j = rng.randrange(self.seen)
                if j < size:
                    self.buffer[j] = example
        self.tasks += [t for t in dict.fromkeys(e.task for e in examples) if t not in self.tasks]

    def _task_balanced(self, examples: list[Example], rng: random.Random) -> None:
        self.seen += len(examples)
        new = {}
        for e in examples:
            new.setdefault(e.task, []).append(e)
        self.tasks += [t for t in new if t not in self.tasks]
        per_task = {t: [e for e in self.buffer if e.task == t] for t in self.tasks}
        share, extra = divmod(self.config.buffer_size, len(self.tasks))
        buffer = []
        for i, task in enumerate(self.tasks):
            quota = share + (i < extra)
            if task in new:  # a task seen again competes with its buffered examples for its share
                kept = set(per_task[task])
                pool = per_task[task] + [e for e in new[task] if e not in kept]
                rng.shuffle(pool)
            else:
                pool = per_task[task]
            buffer += pool[:quota]
        self.buffer = buffer

    def state_dict(self) -> dict:
        return {"buffer": [asdict(e) for e in self.buffer], "seen": self.seen, "tasks": list(self.tasks)}

    def stats(self) -> dict[str, float]:
        return {"buffer_size": len(self.buffer), "buffer_tasks": len(self.tasks), "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.buffer = [Example(**e) for e in state["buffer"]]
        self.seen = int(state["seen"])
        self.tasks = list(state["tasks"])
