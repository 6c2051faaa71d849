"""Joint training: every stage trains on all tasks seen so far, the usual upper bound.

Not a continual method (it keeps all past data), but the reference point: what forgetting
would look like if nothing had to be forgotten.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from continual_ft.data.tasks import Example
from continual_ft.train.protocol import StageInfo, Strategy

__all__ = ["Joint", "JointConfig"]


@dataclass
class JointConfig:
    """Joint training has no settings."""


class Joint(Strategy):
    """Stage k trains on D_1 ∪ … ∪ D_k: the examples of every earlier stage plus this stage's set.

    Earlier stages' own examples are accumulated in ``after_stage`` (each example once, even if a
    task comes back in a later stage); ``train_data`` puts them before the incoming examples.
    """

    name = "joint"
    summary = "Train stage k on the examples of every stage so far (the multi-task upper bound)."
    uses_model = False  # picks data only: runs under FSDP too

    def __init__(self, config: JointConfig | None = None):
        self.config = config or JointConfig()
        self.examples: list[Example] = []

    def train_data(self, stage: StageInfo, examples: list[Example]) -> list[Example]:
        current = set(stage.examples)
        return [e for e in self.examples if e not in current] + examples

    def after_stage(self, model: nn.Module, stage: StageInfo) -> None:
        held = set(self.examples)
        self.examples += [e for e in dict.fromkeys(stage.examples) if e not in held]

    def state_dict(self) -> dict:
        return {"examples": [asdict(e) for e in self.examples]}

    def load_state_dict(self, state: dict) -> None:
        self.examples = [Example(**e) for e in state["examples"]]

    def stats(self) -> dict[str, float]:
        return {"stored_examples": len(self.examples)}
