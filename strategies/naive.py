"""Naive sequential fine-tuning: train on each stage's data and nothing else.

The lower bound of every comparison: whatever it forgets is what the other strategies
exist to keep.
"""

from __future__ import annotations

from dataclasses import dataclass

from continual_ft.train.protocol import Strategy

__all__ = ["Naive", "NaiveConfig"]


@dataclass
class NaiveConfig:
    """Naive fine-tuning has no settings."""


class Naive(Strategy):
    """Plain sequential fine-tuning: every hook is the default no-op."""

    name = "naive"
    summary = "Plain sequential fine-tuning on each stage's own data: every hook is the default no-op."
    uses_model = False  # picks data only: runs under FSDP too

    def __init__(self, config: NaiveConfig | None = None):
        self.config = config or NaiveConfig()
