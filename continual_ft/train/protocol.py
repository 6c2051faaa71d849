"""A stage of a continual run: what a strategy may see of it, and the one order its hooks run in.

Every loop that trains a stage calls these, whatever does the training (our trainer, the HF
``Trainer`` through :mod:`continual_ft.integrations.hf_trainer`, the hand-written loop in ``examples/plain_loop.py``)::

    batches = Batches(encoder, batch_size=8, device=device, autocast=autocast)
    stage = stage_info(i, tasks, own_examples, batches, final=i == last)
    done = run_stage(model, stage, strategies, train)   # train(examples) does the optimizer steps
    ...
    loss = task_loss + total_penalty(strategies, model, batch, outputs)   # inside train, every micro-batch
    after_backward(strategies, model, stage, step)   # inside train, every step, before clipping and stepping

:func:`run_stage` is the protocol (Avalanche's ``BaseTemplate.train`` keeps it in one place too)::

    examples = s.train_data(stage, examples)   for each strategy, in order (replay mixes in its buffer)
    s.before_stage(model, stage)               for each strategy (LwF snapshots its teacher)
    train(examples)
    s.after_stage(model, stage)                for each strategy (EWC's Fisher, replay fills its buffer)

The model must already carry the stage's adapter (:func:`continual_ft.model.adapters.start_stage`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

from continual_ft.data.tasks import Example
from continual_ft.errors import ContinualFTError
from continual_ft.strategies.base import StageInfo, Strategy
from continual_ft.train.batching import Encoder, collate, length_grouped_batches, to_device
from continual_ft.train.generation import sample
from continual_ft.train.losses import mean_token_loss

__all__ = ["Batches", "StageRun", "stage_info", "run_stage", "total_penalty", "after_backward", "refuse_own_loops"]

T = TypeVar("T")


def _identity(x):
    return x


@dataclass
class Batches:
    """How a strategy runs the model over examples (EWC's Fisher): deterministic, length-sorted batches,
    and their mean answer-token loss under ``autocast``.

    ``device=None`` leaves batches on the CPU and moves each to the model's device in :meth:`loss`
    (the HF ``Trainer`` places the model only when training starts). ``shard`` picks this process's
    share of the batches when several processes train together (:mod:`continual_ft.train.distributed`).
    """

    encoder: Encoder
    batch_size: int = 8
    device: torch.device | None = None
    autocast: Callable = nullcontext
    shard: Callable[[list], list] = _identity

    def __call__(self, examples: Sequence[Example]) -> Iterator[dict]:
        encoded = [self.encoder.encode(e) for e in examples]
        pad = self.encoder.tokenizer.pad_token_id
        for items in self.shard(list(length_grouped_batches(encoded, self.batch_size, rng=None))):
            batch = collate(items, pad)
            yield batch if self.device is None else to_device(batch, self.device)

    def loss(self, model, batch: dict) -> torch.Tensor:
        if self.device is None:
            batch = to_device(batch, next(model.parameters()).device)
        with self.autocast():
            return mean_token_loss(model, batch)

    @torch.no_grad()
    def generate(
        self,
        model,
        prompts: Sequence[str],
        max_new_tokens: int,
        *,
        chat: bool = True,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        stop: Sequence[str] = (),
        batch_size: int | None = None,
        samples: int = 1,
    ) -> list[str]:
        """The model's text after each prompt (self-synthesized rehearsal writes examples with it):
        ``samples`` texts per prompt, in prompt order, drawn from one prefill of it.

        ``chat=True`` formats a prompt as training does (the chat template where the model has one);
        ``False`` feeds the text as it is (a few-shot context to continue). Greedy at ``temperature=0``,
        else sampled (nucleus ``top_p``) from a generator seeded with ``seed`` inside ``fork_rng``, so
        the run's own random state is untouched and a resumed run samples the same text. In eval mode;
        the model's mode is restored. Every process runs every prompt (no ``shard``). A row stops at
        end of text or once its text contains one of ``stop`` (which stays in the text), and leaves the
        batch then (:func:`continual_ft.train.generation.sample`). ``batch_size`` prompts of similar length go
        through together (default: this object's): decoding reads every weight per token, so a batch
        larger than training's costs little more per step.
        """
        tok = self.encoder.tokenizer
        device = self.device or next(model.parameters()).device
        rows = [tok(self.encoder.prompt_text(p) if chat else p, add_special_tokens=False)["input_ids"] for p in prompts]
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # little padding in each batch
        size = batch_size or self.batch_size
        texts: list[str] = [""] * (len(rows) * samples)
        was_training = model.training
        model.eval()
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), self.autocast():
                torch.manual_seed(seed)
                for start in range(0, len(order), size):
                    chunk = order[start : start + size]
                    new = sample(
                        model,
                        [rows[i] for i in chunk],
                        max_new_tokens,
                        tokenizer=tok,
                        temperature=temperature,
                        top_p=top_p,
                        stop=stop,
                        samples=samples,
                    )
                    for j, ids in enumerate(new):
                        texts[chunk[j // samples] * samples + j % samples] = tok.decode(ids, skip_special_tokens=True)
        finally:
            model.train(was_training)
        return texts


def stage_info(
    index: int,
    tasks: Sequence[str],
    examples: Sequence[Example],
    batches: Batches,
    *,
    final: bool = False,
    sum_across: Callable[[torch.Tensor], torch.Tensor] = _identity,
) -> StageInfo:
    """The :class:`StageInfo` strategies see; ``sum_across`` sums a tensor over processes (identity in one)."""
    return StageInfo(
        index=index,
        tasks=list(tasks),
        examples=list(examples),
        batches=batches,
        loss_fn=batches.loss,
        generate=batches.generate,
        final=final,
        sum_across=sum_across,
    )


def total_penalty(strategies: Sequence[Strategy], model, batch: dict, outputs) -> torch.Tensor | None:
    """Σ_s penalty_s(model, batch, outputs) over the strategies that return one; None if none does."""
    total = None
    for s in strategies:
        extra = s.penalty(model, batch, outputs)
        if extra is not None:
            total = extra if total is None else total + extra
    return total


def refuse_own_loops(strategies: Sequence[Strategy], loop: str) -> None:
    """Stop before training where a strategy is a training loop of its own (``avalanche:*``, trained by
    Avalanche's loop through ``train_stage``): ``loop`` calls hooks only, so it would train it as naive."""
    for s in strategies:
        if hasattr(s, "train_stage"):
            raise ContinualFTError(
                f"strategy={s.name} trains in a loop of its own, not through hooks: {loop} would train it as naive; "
                "run it with cli.py run"
            )


def after_backward(strategies: Sequence[Strategy], model, stage: StageInfo | None, step: int) -> None:
    """Each strategy's ``after_backward`` in order, once the step's gradients are complete (``step`` 1-based)."""
    for s in strategies:
        s.after_backward(model, stage, step)


@dataclass
class StageRun(Generic[T]):
    """What :func:`run_stage` hands back: the loop's own result and what the strategies cost."""

    result: T
    examples: int  # examples trained on, after every strategy's train_data
    hook_seconds: float  # train_data, before_stage and after_stage together (EWC's Fisher pass is here)


def run_stage(
    model,
    stage: StageInfo,
    strategies: Sequence[Strategy],
    train: Callable[[list[Example]], T],
    examples: Sequence[Example] | None = None,
) -> StageRun[T]:
    """train_data → before_stage → ``train(examples)`` → after_stage, timing the hooks apart from training.

    ``examples``: what the strategies' ``train_data`` starts from (default: the stage's own examples).
    """
    start = time.perf_counter()
    examples = list(stage.examples if examples is None else examples)
    for s in strategies:
        examples = s.train_data(stage, examples)
    for s in strategies:
        s.before_stage(model, stage)
    hooks = time.perf_counter() - start
    result = train(examples)
    start = time.perf_counter()
    for s in strategies:
        s.after_stage(model, stage)
    hooks += time.perf_counter() - start
    return StageRun(result, len(examples), hooks)
