"""Our strategies inside the Hugging Face ``Trainer``: a thin integration, as trl's trainers are.

Callbacks never see the loss, so penalties go through a ``compute_loss`` override
(:class:`ContinualTrainer`), and ``after_backward`` through a ``training_step`` override: the
callbacks' ``on_pre_optimizer_step`` comes after gradient clipping. The stage hooks run around
``trainer.train()`` in the one order :func:`continual_ft.train.protocol.run_stage` keeps for every loop;
:func:`train_stage_hf` does that::

    stage = stage_info(0, examples, encoder)
    train_stage_hf(model, tokenizer, examples, strategies, stage, TrainingArguments(...))

The model must already carry the stage's adapter (``continual_ft.model.adapters.start_stage`` or
``peft.get_peft_model``).

Batches are ours (:func:`continual_ft.train.batching.collate`): left-padded, ``labels`` aligned with
the last ``logits_to_keep - 1`` positions, plus ``tasks`` and ``n_tokens`` for strategies. The
task loss is the mean cross-entropy over each micro-batch's answer tokens; the Trainer divides
it by the accumulation steps, so micro-batches weigh equally (our own trainer weighs them by
answer tokens instead).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

from continual_ft.data.tasks import Example
from continual_ft.train.batching import Encoded, Encoder, collate
from continual_ft.train.losses import token_loss
from continual_ft.train.protocol import (
    HOOKS,
    Batches,
    Loop,
    StageInfo,
    Strategy,
    after_backward,
    refuse,
    run_stage,
    total_penalty,
)
from continual_ft.train.protocol import stage_info as _stage_info

__all__ = ["ContinualTrainer", "ExampleDataset", "Collator", "stage_info", "train_stage_hf", "hf_loop"]


class ExampleDataset(Dataset):
    """Examples encoded once with ``encoder`` (prompt and answer ids); items are :class:`Encoded`."""

    def __init__(self, examples: Sequence[Example], encoder: Encoder):
        self.items = [encoder.encode(e) for e in examples]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Encoded:
        return self.items[i]


class Collator:
    """``collate`` as a Trainer ``data_collator``: model inputs (with ``logits_to_keep``), labels, tasks, n_tokens."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[Encoded]) -> dict:
        return collate(items, self.pad_id)


class ContinualTrainer(Trainer):
    """``transformers.Trainer`` whose training loss is ``L_task + Σ_s penalty_s(model, batch, outputs)``.

    ``L_task`` is the mean cross-entropy over the batch's answer tokens, computed from logits of the
    last ``logits_to_keep`` positions only. Penalties are added in training only, so ``eval_loss``
    stays the plain task loss. After each step's last micro-batch, before clipping, every strategy's
    ``after_backward(model, stage, step)`` sees the step's gradients (``stage``: the one given here).
    """

    # compute_loss returns a per-micro-batch mean; let the Trainer divide by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, *args, strategies: Sequence[Strategy] = (), stage: StageInfo | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.strategies = list(strategies)
        refuse(self.strategies, hf_loop(self.args.world_size))
        self.stage = stage  # what after_backward gets (A-GEM draws its reference batches with it)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.sync_gradients:  # the step's last micro-batch: its gradients are complete
            step = self.state.global_step + 1  # global_step counts the optimizer steps taken
            after_backward(self.strategies, self.accelerator.unwrap_model(model), self.stage, step)
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Our labels are already shifted and cut to logits_to_keep, so the model must not see them
        # (its own loss would shift them again); token_loss passes only the model inputs.
        summed, n, outputs = token_loss(model, inputs)
        loss = summed / max(n, 1)
        if model.training:
            extra = total_penalty(self.strategies, self.accelerator.unwrap_model(model), inputs, outputs)
            if extra is not None:
                loss = loss + extra
        return (loss, outputs) if return_outputs else loss


def hf_loop(world_size: int = 1) -> Loop:
    """The HF ``Trainer`` as :func:`continual_ft.train.protocol.refuse` checks strategies against it.

    In one process it calls every hook. Over several, ``after_backward`` would not act as in one process
    (:func:`stage_info`'s ``sum_across`` is the identity: each process would get its own reference gradient),
    and its batches don't carry their place in the global batch (our trainer tags each share with it:
    :func:`continual_ft.train.batching.in_global_batch`), so each process would choose its own rows.
    """
    if world_size == 1:
        return Loop("the HF Trainer", instead="run it with cli.py run")
    hooks = tuple(h for h in HOOKS if h != "after_backward")
    return Loop(f"the HF Trainer over {world_size} processes", "use cli.py run (DDP)", hooks, global_batch=False)


def stage_info(
    index: int, examples: Sequence[Example], encoder: Encoder, batch_size: int = 8, final: bool = False
) -> StageInfo:
    """A :class:`StageInfo` for a stage trained outside our runner, with the runner's ``batches`` and ``loss_fn``.

    ``batches`` yields CPU tensors and ``loss_fn`` moves each batch to the model's device, since the
    Trainer places the model only when training starts.
    """
    tasks = list(dict.fromkeys(e.task for e in examples))
    return _stage_info(index, tasks, examples, Batches(encoder, batch_size), final=final)


def train_stage_hf(
    model,
    tokenizer,
    examples: Sequence[Example],
    strategies: Sequence[Strategy],
    stage: StageInfo,
    training_args: TrainingArguments,
    *,
    encoder: Encoder | None = None,
    **trainer_kwargs,
) -> ContinualTrainer:
    """One stage with the HF Trainer: train_data → before_stage → ``trainer.train()`` → after_stage.

    ``model`` must already carry the stage's adapter. Returns the trainer (its ``state.log_history``
    holds the losses). Extra keyword arguments go to :class:`ContinualTrainer`.
    """
    encoder = encoder or Encoder(tokenizer)

    def train(examples: list[Example]) -> ContinualTrainer:
        trainer = ContinualTrainer(
            model=model,
            args=training_args,
            train_dataset=ExampleDataset(examples, encoder),
            data_collator=Collator(tokenizer.pad_token_id),
            strategies=strategies,
            stage=stage,
            **trainer_kwargs,
        )
        trainer.train()
        return trainer

    return run_stage(model, stage, strategies, train, examples=examples).result
