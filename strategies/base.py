"""The strategy interface: a plain object with a few optional hooks.

A strategy needs only the model, the stage's data and a loss function; it never reads
trainer internals, so the same object works in our trainer, in a hand-written PyTorch
loop (see ``examples/plain_loop.py``) and in the Hugging Face ``Trainer``.

Hook order for one stage::

    examples = strategy.train_data(stage, examples)   # e.g. mix in a replay buffer
    strategy.before_stage(model, stage)                # e.g. snapshot a teacher
    for step, micro_batches in enumerate(steps, 1):    # every optimizer step
        for batch in micro_batches:
            loss = task_loss + strategy.penalty(model, batch, outputs)   # e.g. EWC, LwF
            loss.backward()
        strategy.after_backward(model, stage, step)    # e.g. A-GEM projects the gradient
        clip the gradients; optimizer.step()
    strategy.after_stage(model, stage)                 # e.g. Fisher, fill the buffer

``state_dict`` / ``load_state_dict`` carry what must survive a restart (buffer contents,
Fisher and anchors); ``stats`` reports numbers worth tracking after a stage (replay's buffer size).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from continual_ft.data.tasks import Example

__all__ = ["Strategy", "StageInfo"]


@dataclass
class StageInfo:
    """What a strategy may know about the stage at hand."""

    index: int  # 0-based stage number
    tasks: list[str]  # task names trained in this stage
    examples: list[Example]  # this stage's own training examples (before any strategy adds to them)
    batches: Callable[[list[Example]], Iterable[dict]] = field(repr=False)  # examples -> tokenized batches
    loss_fn: Callable[[nn.Module, dict], torch.Tensor] = field(repr=False)  # mean answer-token loss of a batch
    # (model, prompts, max_new_tokens, *, chat, temperature, top_p, seed) -> the model's text after each
    # prompt (:meth:`continual_ft.train.protocol.Batches.generate`): self-synthesized rehearsal writes its
    # examples with it.
    generate: Callable[..., list[str]] | None = field(default=None, repr=False)
    final: bool = False  # no stage follows in this run: work only later stages use (EWC's Fisher) can be skipped
    # Sums a tensor over the processes of a multi-process run (identity in one process): a strategy
    # that accumulates over ``batches`` (each process gets its share of them) totals it with this.
    # Under FSDP each process gets every batch (a backward there averages the processes' gradients) and
    # this is the identity too.
    sum_across: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda t: t, repr=False)


class Strategy:
    """Base class with every hook a no-op; a strategy overrides only what it needs."""

    name = "base"
    #: Whether a hook reads the model's parameters or runs the model (EWC's Fisher, LwF's teacher). Under
    #: FSDP parameters are per-rank shards: strategies that set this False (they pick data) run there as
    #: they are, the others only if they set ``handles_shards`` (EWC, LwF).
    uses_model = True
    #: Whether its hooks work on FSDP2's DTensor shards and keep a run equal to one process (docs/distributed.md).
    handles_shards = False
    #: The adapter modes (``adapter=``, :data:`continual_ft.model.adapters.ADAPTER_MODES`) in which the strategy
    #: does what its name says; ``None``: every mode (a strategy that only picks data). In any other mode
    #: ``check_config`` stops the run before anything is written with
    #: ``strategy=<name> needs adapter=<these>: <adapter_refusal>``
    #: (the table in docs/strategies.md says which strategy acts in which mode, and the test that shows it).
    adapter_modes: tuple[str, ...] | None = None
    #: Why it does nothing of its own in the other modes, one clause; ``{adapter}`` is the mode refused.
    adapter_refusal = ""

    def train_data(self, stage: StageInfo, examples: list[Example]) -> list[Example]:
        """The examples to train on in this stage (default: the stage's own)."""
        return examples

    def before_stage(self, model: nn.Module, stage: StageInfo) -> None:
        """Called once before the first step of a stage."""

    def penalty(self, model: nn.Module, batch: dict, outputs: Any) -> torch.Tensor | None:
        """An extra loss term added to the task loss at every micro-step, or None."""
        return None

    def after_backward(self, model: nn.Module, stage: StageInfo, step: int) -> None:
        """Called once per optimizer step (``step``, 1-based within the stage) when its gradients are complete:
        after the last micro-batch's backward (and, with several processes, their all-reduce), before
        clipping and the optimizer step. A strategy may change the parameters' ``.grad`` here."""

    def after_stage(self, model: nn.Module, stage: StageInfo) -> None:
        """Called once after a stage's last step (with the best weights restored)."""

    def state_dict(self) -> dict:
        """Everything needed to resume this strategy later (tensors and plain Python)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""

    def stats(self) -> dict[str, float]:
        """Numbers of the strategy's own worth tracking after a stage (replay's buffer size); default none."""
        return {}
