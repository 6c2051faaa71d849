"""Every check of a run's configuration that needs more than one field: the one place ``run``,
``resume`` and ``compare`` ask before anything is trained or written.

A field's own range is checked by its dataclass (:mod:`continual_ft.config`); what is checked here
is how fields, strategies and the scenario fit together, each failure one line naming the keys.
"""

from __future__ import annotations

from pathlib import Path

from continual_ft.config import RunConfig
from continual_ft.errors import ContinualFTError
from continual_ft.eval import text_metrics
from continual_ft.report.tracking import check_trackers
from continual_ft.train.batching import MAX_CUT_SHARE, LengthFit, length_fit

__all__ = ["check_config", "check_adapter", "check_scenario", "check_lengths", "check_fsdp"]


def check_config(config: RunConfig) -> list:
    """The run's strategy objects, once every setting has been checked against the others."""
    from continual_ft.strategies import build

    strategies = build(config.strategy, config.strategy_args)
    for s in strategies:
        check_adapter(s, config.adapter)
        s.check_run(config)  # its own limits (avalanche:*: its package, what its loop can do)
    if config.quantize != "none" and config.model == "tiny":
        raise ContinualFTError(
            "quantize=nf4 loads a checkpoint in 4 bit; model=tiny is built in memory, use a directory"
        )
    if config.quantize != "none" and config.adapter == "merge":
        raise ContinualFTError("adapter=merge would requantize the 4-bit base after every stage; use merge_final")
    out = Path(config.output_dir)
    for parent in (out, *out.parents):
        if parent.exists() and not parent.is_dir():
            raise ContinualFTError(f"output_dir={config.output_dir}: {parent} is a file, not a directory")
    check_trackers(config.log)
    return strategies


def check_adapter(strategy, adapter: str) -> None:
    """Refuse a strategy in an adapter mode where it would do nothing of its own (its ``adapter_modes``):
    ``strategy=ewc needs adapter=continue: under adapter=stack each stage trains a fresh adapter ...``."""
    modes = strategy.adapter_modes
    if modes is not None and adapter not in modes:
        why = strategy.adapter_refusal.format(adapter=adapter)
        named = " or ".join(filter(None, [", ".join(modes[:-1]), modes[-1]]))  # "continue, new, stack or merge"
        raise ContinualFTError(f"strategy={strategy.name} needs adapter={named}: {why}")


def check_scenario(config: RunConfig, scenario) -> None:
    """Settings that depend on the scenario's shape."""
    n_weights = len(config.merge.weights)
    if config.adapter == "merge_final" and n_weights and n_weights != len(scenario.stages):
        raise ContinualFTError(f"merge.weights has {n_weights} values; the scenario has {len(scenario.stages)} stages")
    for task in scenario.tasks.values():
        for metric in task.metrics if task.generative else ():
            text_metrics.require(metric)  # rouge_l needs rouge-score: pip install rouge-score


def check_lengths(encoder, scenario) -> dict[str, LengthFit]:
    """How each task's training examples fit ``train.max_length``; a generative task whose prompts would be cut
    in more than ``MAX_CUT_SHARE`` of its examples stops here, naming the ``max_length`` that fits them all."""
    fits = {}
    for name, task in scenario.tasks.items():
        fit = fits[name] = length_fit(encoder, task.train)
        if task.generative and fit.cut > MAX_CUT_SHARE * fit.examples:
            raise ContinualFTError(
                f"task '{name}': {fit.cut} of {fit.examples} training examples exceed train.max_length="
                f"{encoder.max_length} (their prompts would be cut); train.max_length={fit.fits_all} fits them all"
            )
    return fits


def check_fsdp(config: RunConfig, strategies: list, fsdp_version: int) -> None:
    """What a run launched with an FSDP config can do (docs/distributed.md, "FSDP" says why)."""
    if fsdp_version != 2:
        raise ContinualFTError(
            f"FSDP needs fsdp_version: 2 (FSDP2, as in examples/accelerate/fsdp.yaml), not {fsdp_version}: "
            "FSDP1 wraps the model in another module"
        )
    if config.adapter != "continue":
        raise ContinualFTError(
            f"adapter={config.adapter} under FSDP: only adapter=continue, whose tensors stay those FSDP sharded "
            "in stage 1 (a new adapter or a merge would change a sharded model)"
        )
    for s in strategies:  # O-LoRA needs adapter=new, refused above
        if s.uses_model and not s.handles_shards:
            raise ContinualFTError(
                f"strategy={s.name} under FSDP: it reads the model's parameters, which are per-rank shards there, "
                "and has no code for them; launch with DDP, or use naive, replay, joint, task_balanced, ewc or lwf"
            )
