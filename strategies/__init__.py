"""Anti-forgetting strategies, one file each, installed as ``continual_ft.strategies``.

``STRATEGIES`` maps a name to ``(strategy class, its config dataclass)``; the CLI's choices
come from it. ``strategy=`` also takes the names of ``AVALANCHE_LOOPS`` (``avalanche:ewc``, ...):
Avalanche's own strategies, which are training loops of their own, not hooks
(:mod:`continual_ft.integrations.avalanche_loops`). ``build("replay+ewc", args)`` returns a list of
strategy objects. The protocol every strategy follows: :mod:`continual_ft.train.protocol`.
"""

from __future__ import annotations

from dataclasses import asdict, fields, is_dataclass

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from continual_ft.errors import ContinualFTError
from continual_ft.integrations.avalanche_loops import AVALANCHE_LOOPS
from continual_ft.strategies.agem import AGEM, AGEMConfig
from continual_ft.strategies.ewc import EWC, EWCConfig
from continual_ft.strategies.joint import Joint, JointConfig
from continual_ft.strategies.lwf import LwF, LwFConfig
from continual_ft.strategies.naive import Naive, NaiveConfig
from continual_ft.strategies.olora import OLoRA, OLoRAConfig
from continual_ft.strategies.replay import Replay, ReplayConfig
from continual_ft.strategies.ssr import SSR, SSRConfig
from continual_ft.strategies.task_balanced import TaskBalanced, TaskBalancedConfig
from continual_ft.train.protocol import Method, StageInfo, Strategy

__all__ = [
    "STRATEGIES",
    "AVALANCHE_LOOPS",
    "strategy_names",
    "Method",
    "Strategy",
    "StageInfo",
    "Naive",
    "Replay",
    "EWC",
    "TaskBalanced",
    "Joint",
    "LwF",
    "OLoRA",
    "AGEM",
    "SSR",
    "build",
    "settings",
]

STRATEGIES: dict[str, tuple[type[Strategy], type]] = {
    "naive": (Naive, NaiveConfig),
    "lwf": (LwF, LwFConfig),
    "olora": (OLoRA, OLoRAConfig),
    "replay": (Replay, ReplayConfig),
    "ewc": (EWC, EWCConfig),
    "task_balanced": (TaskBalanced, TaskBalancedConfig),
    "joint": (Joint, JointConfig),
    "agem": (AGEM, AGEMConfig),
    "ssr": (SSR, SSRConfig),
}


def strategy_names() -> tuple[str, ...]:
    """Every name ``strategy=`` takes: ours, then Avalanche's (``avalanche:ewc``, run by Avalanche's loop)."""
    return (*STRATEGIES, *AVALANCHE_LOOPS)


def settings(strategies: list[Method]) -> dict:
    """Every setting of each strategy, defaults included: what ``config.yaml`` records as ``strategy_settings``."""
    return {s.name: asdict(s.config) for s in strategies if is_dataclass(s.config)}


def build(spec: str, args: dict | None = None) -> list[Method]:
    """Strategies for ``spec`` ("naive", "replay+ewc", ...) configured from ``args[name]``."""
    args = dict(args or {})
    names = [n.strip() for n in spec.split("+") if n.strip()]
    if not names:
        raise ContinualFTError(f"strategy is empty; choose from {', '.join(STRATEGIES)}")
    unknown = [n for n in names if n not in STRATEGIES and n not in AVALANCHE_LOOPS]
    if unknown:
        raise ContinualFTError(f"unknown strategy {unknown[0]!r}; choose from {', '.join(STRATEGIES)}")
    stray = [k for k in args if k not in names]
    if stray:
        raise ContinualFTError(f"settings given for {stray[0]!r}, which is not in strategy={spec}")
    strategies = []
    for name in names:
        cls, config_cls = STRATEGIES[name] if name in STRATEGIES else AVALANCHE_LOOPS[name]
        try:
            merged = OmegaConf.merge(OmegaConf.structured(config_cls), OmegaConf.create(args.get(name, {})))
            config = OmegaConf.to_object(merged)
        except OmegaConfBaseException as e:
            valid = ", ".join(f"{name}.{f.name}" for f in fields(config_cls)) or "none"
            raise ContinualFTError(f"{name}: {str(e).splitlines()[0]} (valid: {valid})") from None
        strategies.append(cls(config))
    return strategies
