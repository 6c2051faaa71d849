"""A strategy that records every hook call with its stage and step (Avalanche's ``MockPlugin``), and the calls
a loop must make: the one hook order of :mod:`continual_ft.train.protocol`, which every loop keeps."""

from __future__ import annotations

from dataclasses import dataclass

from continual_ft.train.protocol import Strategy

Call = tuple[str, int, int]  # (hook, stage index, step: 0 before the first, else the optimizer step it is part of)


@dataclass
class RecordingConfig:
    """The recording strategy has no settings."""


class Recording(Strategy):
    """Overrides every hook, changes nothing, and records each call in ``calls``."""

    name = "recording"
    summary = "Record every hook call with its stage and step (tests only)."
    uses_model = False

    def __init__(self, config: RecordingConfig | None = None):
        self.config = config or RecordingConfig()
        self.calls: list[Call] = []
        self.stage, self.step = -1, 0

    def train_data(self, stage, examples):
        self.calls.append(("train_data", stage.index, 0))
        return examples

    def before_stage(self, model, stage):
        self.stage, self.step = stage.index, 0
        self.calls.append(("before_stage", stage.index, 0))

    def penalty(self, model, batch, outputs):
        self.calls.append(("penalty", self.stage, self.step + 1))  # part of the step after the last one complete
        return None

    def after_backward(self, model, stage, step):
        self.step = step
        self.calls.append(("after_backward", stage.index, step))

    def after_stage(self, model, stage):
        self.calls.append(("after_stage", stage.index, self.step))


def expected(stages: list[list[int]]) -> list[Call]:
    """The calls of stages whose steps have the given numbers of micro-batches (``[[2, 2], [2, 2]]``: two stages
    of two steps, each over two micro-batches): train_data, before_stage, (penalty per micro-batch,
    after_backward per step)*, after_stage, per stage."""
    calls: list[Call] = []
    for i, steps in enumerate(stages):
        calls += [("train_data", i, 0), ("before_stage", i, 0)]
        for k, micro in enumerate(steps, 1):
            calls += [("penalty", i, k)] * micro + [("after_backward", i, k)]
        calls.append(("after_stage", i, len(steps)))
    return calls
