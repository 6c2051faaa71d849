"""Kept so that ``from continual_ft.strategies.base import Strategy`` works; the protocol is declared in
:mod:`continual_ft.train.protocol`."""

from continual_ft.train.protocol import Method, StageInfo, StageLoop, Strategy

__all__ = ["Method", "StageInfo", "StageLoop", "Strategy"]
