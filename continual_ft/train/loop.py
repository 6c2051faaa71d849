"""One stage of training, read top to bottom: batches, loss, penalties, step, checkpoint, validate.

The loss is the summed cross-entropy over answer tokens divided by the answer-token count
of the whole optimizer step (torchtune's normalisation), so gradient accumulation changes
nothing but memory. Each strategy's penalty is added per micro-batch, weighted by that
micro-batch's share of the step's answer tokens. Each strategy's ``after_backward`` then sees the
step's complete gradient (all micro-batches, all processes), before clipping and the optimizer step.

Several processes (:mod:`continual_ft.train.distributed`): every process draws the same global batches
(``batch_size × processes`` examples, the same stream one process would draw) and trains on its
strided share; the divisor is the step's answer-token count over all processes, times the number
of processes because DDP averages gradients. A step then computes the gradient one process would
compute on the whole global batch, up to the order of floating-point sums. Each micro-batch says
where its rows sit in the global batch (:func:`~continual_ft.train.batching.in_global_batch`), so a
penalty that is a mean over chosen rows (LwF) chooses and averages over the global batch too.

The stage reads as torchtune's recipes do: :func:`train_stage` sets a :class:`_Trainer` up (``_setup_*``),
restores it, then runs a plain loop of ``_step``, ``_validate`` and ``_checkpoint``.

Resuming: :class:`~continual_ft.train.checkpoint.StepCheckpoints` saves the trainable weights, optimizer,
scheduler, RNG states and the stage's :class:`~continual_ft.train.checkpoint.StageProgress` (the number of
micro-batches drawn among it); a resumed stage reloads them and skips that many micro-batches of the same
seeded stream, so it goes on exactly where it stopped.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import get_scheduler

from continual_ft.config import TrainConfig
from continual_ft.data.tasks import Example
from continual_ft.errors import ContinualFTError
from continual_ft.train.batching import (
    Encoded,
    Encoder,
    collate,
    collate_packed,
    in_global_batch,
    length_grouped_batches,
    split_rows,
    to_device,
)
from continual_ft.train.checkpoint import StageProgress, StepCheckpoints, rng_state, set_rng_state
from continual_ft.train.losses import token_loss
from continual_ft.train.precision import choose_precision
from continual_ft.train.protocol import after_backward, total_penalty

__all__ = [
    "StageStats",
    "NonFiniteLoss",
    "train_stage",
    "backward_step",
    "resolve_precision",
    "autocast_for",
    "validation_loss",
    "micro_token_budget",
    "pad_multiple",
    "training_attention",
    "activation_checkpointing",
]


class NonFiniteLoss(ContinualFTError):
    """The loss became NaN or infinite: the stage stops before the optimizer takes the step."""


@dataclass
class StageStats:
    steps: int = 0
    tokens: int = 0  # real (non-padding) tokens trained on
    seconds: float = 0.0  # training time, validation excluded
    train_loss: float = float("nan")  # mean answer-token loss over the stage
    val_losses: list[float] = field(default_factory=list)
    best_val_loss: float | None = None
    stopped_early: bool = False
    checkpoint_seconds: float = 0.0  # writing in-stage checkpoints (not in `seconds`)
    resumed_at_step: int | None = None  # the in-stage checkpoint this stage went on from
    penalty: float | None = None  # the strategies' penalty per step, mean over the stage; None without one

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` → bf16 on a GPU that computes it, on a CPU where it measures clearly faster; else fp32
    (:mod:`continual_ft.train.precision`, which also says why)."""
    return choose_precision(precision, device).precision


def autocast_for(precision: str, device: torch.device) -> Callable:
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext


#: ``train.micro_tokens=0`` on CPU: padded tokens per forward pass. Eval then 30 steps of the default job's
#: legal stage peaked at 2.96 GB RSS with it, 3.56 GB at 1024, at the same speed (~393 tokens/s); 512 cost 8%.
CPU_MICRO_TOKENS = 768


#: ``train.pad_to_multiple_of=0``: on CPU, every new batch shape makes oneDNN build (JIT) and cache new
#: matmul kernels: 60 steps of random widths grew RSS by 1 GB, widths in steps of 64 stayed flat. The default
#: job peaked at 2.68 GB in 399 s with 16, 2.99 GB in 457 s with 64 (padding short rows), 3.69 GB in 443 s
#: without rounding. On GPUs 8, tensor cores' granularity (as HF's ``pad_to_multiple_of=8``).
CPU_PAD_MULTIPLE, GPU_PAD_MULTIPLE = 16, 8


def pad_multiple(cfg: TrainConfig, device: torch.device) -> int:
    """The multiple each micro-batch's padded width is rounded up to."""
    if cfg.pad_to_multiple_of:
        return cfg.pad_to_multiple_of
    return CPU_PAD_MULTIPLE if device.type == "cpu" else GPU_PAD_MULTIPLE


def micro_token_budget(cfg: TrainConfig, device: torch.device, dist=None) -> int:
    """Padded tokens per forward pass (0 = no split). Several processes never split: their forwards (DDP's
    buffer broadcasts, FSDP's all-gathers) must pair up across ranks, which unequal splits would break."""
    if cfg.micro_tokens == -1 or (dist is not None and dist.world > 1):
        return 0
    return cfg.micro_tokens or (CPU_MICRO_TOKENS if device.type == "cpu" else 0)


@contextmanager
def training_attention(model, attention: str, device: torch.device):
    """Train with the ``train.attention`` kernel, then give the model back its own (evaluation's).

    ``auto`` is eager on CPU: for LoRA training at 256 tokens, torch's CPU flash-attention backward
    took a fifth of the step, and eager trained 1.3x faster (docs/performance.md). Elsewhere the model's own.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    wanted = ("eager" if device.type == "cpu" else None) if attention == "auto" else attention
    before = getattr(base.config, "_attn_implementation", None)
    if wanted is None or wanted == before or not hasattr(base, "set_attn_implementation"):
        yield
        return
    base.set_attn_implementation(wanted)
    try:
        yield
    finally:
        base.set_attn_implementation(before)


@contextmanager
def activation_checkpointing(model, enabled: bool):
    """Recompute activations in the backward pass while inside (``train.gradient_checkpointing``).

    Non-reentrant checkpointing (torch's recommended form): the frozen embeddings need no
    ``requires_grad`` trick, and it composes with DDP's ``no_sync`` and with autocast.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not enabled:
        yield
        return
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x renamed gradient_ -> activation_
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        disable = base.activation_checkpointing_disable
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        disable = base.gradient_checkpointing_disable
    try:
        yield
    finally:
        disable()


def _shard(items: list, dist) -> tuple[list, bool]:
    """This process's share of a global batch (of its row indices); a process left without rows trains on a
    zero-weight copy of the first (DDP needs every process in every step). Returns (items, is_dummy)."""
    if dist is None or dist.world == 1:
        return items, False
    mine = dist.shard(items)
    return (mine, False) if mine else (items[:1], True)


def _batch(
    whole: list[Encoded], rows: list[int], pad: int, device, dummy=False, packed=False, multiple: int = 1
) -> dict:
    """The micro-batch of the examples ``rows`` of the global batch ``whole``, told where they sit in it."""
    items = [whole[i] for i in rows]
    batch = collate_packed(items, pad, multiple) if packed else collate(items, pad, multiple)
    if dummy:
        batch["labels"].fill_(-100)
        batch["n_tokens"] = 0
    return to_device(in_global_batch(batch, whole, rows), device)


@torch.no_grad()
def validation_loss(
    model, encoder: Encoder, examples: Sequence[Example], batch_size: int, autocast, dist=None
) -> float:
    """Mean answer-token loss over ``examples`` (each process scores its share of the batches)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    groups = list(length_grouped_batches([encoder.encode(e) for e in examples], batch_size, rng=None))
    with dist.lockstep(model) if dist is not None else nullcontext():  # FSDP: ranks hold unequal shares
        for items in dist.shard(groups) if dist is not None else groups:
            with autocast():
                loss, n, _ = token_loss(model, to_device(collate(items, encoder.tokenizer.pad_token_id), device))
            total, count = total + loss.item(), count + n
    if dist is not None:
        total, count = dist.sum(total), dist.sum(count)
    model.train(was_training)
    return total / max(count, 1)


def backward_step(
    model, micro: Sequence[dict], strategies: Sequence = (), autocast: Callable = nullcontext, dist=None
) -> tuple[float, int, float | None]:
    """Accumulate the gradients of one optimizer step over its micro-batches.

    Returns the step's summed task loss, answer-token count and the strategies' penalty (what it adds
    to the step's per-token loss; None if no strategy gave one), over all processes (for logging and
    the NaN check, which every process must take alike). Strategies get the unwrapped model.
    """
    step_tokens = sum(int((b["labels"] != -100).sum()) for b in micro)
    world = 1 if dist is None else dist.world
    if world > 1:
        step_tokens = dist.sum(step_tokens)
    core = model if world == 1 else dist.unwrap(model)
    total, penalty = 0.0, None
    for j, batch in enumerate(micro):
        # Only the step's last micro-batch all-reduces the gradients.
        sync = dist.no_sync(model) if world > 1 and j < len(micro) - 1 else nullcontext()
        with sync:
            with autocast():
                summed, n, outputs = token_loss(model, batch)
                loss = summed * world / max(step_tokens, 1)
                extra = total_penalty(strategies, core, batch, outputs)
                if extra is not None:
                    loss = loss + (n * world / max(step_tokens, 1)) * extra
                    share = n / max(step_tokens, 1) * extra.detach()
                    penalty = share if penalty is None else penalty + share
            if world > 1:
                dist.backward(loss)
            else:
                loss.backward()
        total += summed.item()
    penalty = None if penalty is None else penalty.item()
    if world > 1:  # one all-reduce for the loss and the penalty; a process may have had none (LwF, no answer rows)
        sums = dist.sum(torch.tensor([total, penalty or 0.0, penalty is not None], dtype=torch.float64))
        total, penalty = sums[0].item(), (sums[1].item() if sums[2] else None)
    return total, step_tokens, penalty


def _shard_saved(saved: dict, named: list, optimizer, dist) -> dict:
    """An in-stage checkpoint's whole tensors cut as this rank holds its parameters (FSDP shards; with DDP,
    whole): the weights and best weights as their parameter, each optimizer state as its parameter."""
    by_id = dict(enumerate(p for group in optimizer.param_groups for p in group["params"]))  # state_dict's ids

    def like(p, t):
        return dist.shard_like(t, p) if torch.is_tensor(t) and t.shape == p.shape else t  # not Adam's `step`

    optim = saved["optimizer"]
    state = {i: {k: like(by_id[i], t) for k, t in s.items()} for i, s in optim["state"].items()}
    best = saved.get("best_state")
    return {
        **saved,
        "params": {n: like(p, saved["params"][n]) for n, p in named},
        "optimizer": {**optim, "state": state},
        "best_state": None if best is None else [like(p, t) for (_, p), t in zip(named, best)],
    }


def train_stage(
    model,
    encoder: Encoder,
    examples: Sequence[Example],
    validation: Sequence[Example],
    cfg: TrainConfig,
    strategies: Sequence = (),
    stage=None,
    *,
    seed: int = 0,
    autocast: Callable = nullcontext,
    progress: bool = True,
    desc: str = "train",
    checkpoints: StepCheckpoints | None = None,
    dist=None,
    on_step: Callable[[int, dict], None] | None = None,
) -> StageStats:
    """Train ``model``'s trainable parameters on ``examples`` for one stage.

    ``on_step(step, values)`` gets each optimizer step's ``loss``, ``lr``, ``tokens_per_s`` and, when a
    strategy adds one, ``penalty`` (:mod:`continual_ft.report.tracking` logs them).

    With ``checkpoints``, saves the latest in-stage checkpoint as configured and, if one of this
    stage exists already, goes on from it. Raises :class:`NonFiniteLoss` on a NaN or infinite loss.
    """
    trainer = _Trainer(
        model, encoder, examples, validation, cfg, strategies, stage, seed, autocast, desc, checkpoints, dist, on_step
    )
    trainer.restore()
    return trainer.train(progress)


def _trainable(model) -> list:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


class _Trainer:
    """One stage of training: set up (``_setup_*``), restored from an in-stage checkpoint if one was saved,
    then a plain loop of ``_step``, ``_validate``, ``_checkpoint``. What a checkpoint carries across a kill
    is the objects' states (:meth:`_state`) and ``self.progress``, one :class:`StageProgress`."""

    def __init__(
        self,
        model,
        encoder,
        examples,
        validation,
        cfg,
        strategies,
        stage,
        seed,
        autocast,
        desc,
        checkpoints,
        dist,
        on_step,
    ):
        self.model, self.encoder, self.validation, self.cfg = model, encoder, validation, cfg
        self.strategies, self.stage, self.autocast, self.desc = strategies, stage, autocast, desc
        self.checkpoints, self.dist, self.on_step = checkpoints, dist, on_step
        self.device = next(model.parameters()).device
        self.world = 1 if dist is None else dist.world
        self.multiple = pad_multiple(cfg, self.device)
        self._setup_batches(examples, seed)
        self._setup_optimizer()
        self.budget = micro_token_budget(cfg, self.device, dist)
        self.progress, self.best_state = StageProgress(), None
        self.stopped_early, self.checkpoint_seconds, self.resumed_at_step = False, 0.0, None

    def _setup_batches(self, examples: Sequence[Example], seed: int) -> None:
        """The seeded stream of global batches, endless (epochs reshuffled), and the steps the stage takes."""
        cfg = self.cfg
        self.pad = self.encoder.tokenizer.pad_token_id
        encoded = [self.encoder.encode(e) for e in examples]
        # Every process draws the same global batches: `world` times the per-process size or token budget.
        grouping = dict(max_tokens=cfg.max_tokens * self.world, packed=cfg.packing, multiple=self.multiple)
        global_batch = cfg.batch_size * self.world
        rng = random.Random(seed)
        if cfg.max_tokens:  # how many budgets an epoch fills: count the first epoch's (same seed, another generator)
            per_epoch = sum(1 for _ in length_grouped_batches(encoded, global_batch, random.Random(seed), **grouping))
        else:
            per_epoch = math.ceil(len(encoded) / global_batch)
        self.total_steps = cfg.max_steps or cfg.epochs * math.ceil(per_epoch / cfg.grad_accum)

        def epochs():
            while True:  # the step budget decides when to stop
                yield from length_grouped_batches(encoded, global_batch, rng, **grouping)

        self.stream = epochs()

    def _setup_optimizer(self) -> None:
        """AdamW on the trainable parameters and the schedule; with several processes, the model wrapped."""
        cfg = self.cfg
        named = _trainable(self.model)
        self.optimizer = torch.optim.AdamW([p for _, p in named], lr=cfg.lr, weight_decay=cfg.weight_decay)
        warmup = min(cfg.warmup_steps, self.total_steps)
        self.scheduler = get_scheduler(
            cfg.schedule, self.optimizer, num_warmup_steps=warmup, num_training_steps=self.total_steps
        )
        self.train_model = self.model
        if self.world > 1:
            self.train_model, self.optimizer = self.dist.prepare(self.model, self.optimizer)
            # FSDP shards in place: the trainable parameters are new (DTensor) objects now.
            named = _trainable(self.model)
        self.named, self.params = named, [p for _, p in named]

    def _state(self) -> dict:
        """What an in-stage checkpoint saves besides ``self.progress``; :meth:`restore` puts each back."""
        return {
            "params": {n: p.detach() for n, p in self.named},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
            "best_state": self.best_state,
        }

    def restore(self) -> None:
        """Go on from this stage's in-stage checkpoint, if one was saved: the objects' states, the progress,
        and the batch stream past the micro-batches it had drawn."""
        saved = self.checkpoints.load() if self.checkpoints is not None else None
        if saved is None:
            return
        self.progress, state = saved
        if self.world > 1:  # FSDP: the checkpoint holds whole tensors, each rank keeps its shard of them
            state = _shard_saved(state, self.named, self.optimizer, self.dist)
        with torch.no_grad():
            for n, p in self.named:
                p.copy_(state["params"][n].to(p.device))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for _ in range(self.progress.drawn):
            next(self.stream)
        self.resumed_at_step = self.progress.steps
        self.best_state = state.get("best_state")
        set_rng_state(state["rng"])

    def train(self, show_progress: bool) -> StageStats:
        """The steps left, then the stage's statistics (and its best weights, if validation says so)."""
        self.model.train()
        done = self.progress.steps
        self.bar = tqdm(
            total=self.total_steps,
            initial=done,
            desc=self.desc,
            disable=not show_progress,
            leave=False,
            dynamic_ncols=True,
        )
        self.start = time.perf_counter() - self.progress.seconds
        for step in range(done + 1, self.total_steps + 1):
            self._step(step)
            if self._validate(step):
                self.stopped_early = True
                break
            self._checkpoint(step)
        seconds = time.perf_counter() - self.start
        self.bar.close()
        stats = self._stats(seconds)
        if self.validation:
            self._validate_at_end(stats)
        return stats

    def _step(self, step: int) -> None:
        """One optimizer step: its micro-batches, backward with the strategies' hooks, the NaN check, the update."""
        step_start = time.perf_counter()
        micro = self._micro_batches()
        checkpointing = activation_checkpointing(self.model, self.cfg.gradient_checkpointing)
        with training_attention(self.model, self.cfg.attention, self.device), checkpointing:
            summed, n, penalty = backward_step(self.train_model, micro, self.strategies, self.autocast, self.dist)
            after_backward(self.strategies, self.model, self.stage, step)  # the step's gradients are complete (A-GEM)
        self._check_finite(step, summed, n)
        step_tokens = self._count(summed, n, penalty, micro)
        lr = self._update()
        self.progress.steps = step
        self._report(step, lr, penalty, step_tokens / (time.perf_counter() - step_start))

    def _micro_batches(self) -> list[dict]:
        """The step's ``grad_accum`` global batches, each cut to this process's rows and split to the token
        budget (the same step, less memory per forward)."""
        cfg, micro = self.cfg, []
        for _ in range(cfg.grad_accum):
            whole = next(self.stream)
            share, dummy = _shard(list(range(len(whole))), self.dist)  # this process's rows of the global batch
            for rows in split_rows(whole, share, self.budget, cfg.packing, self.multiple):
                micro.append(_batch(whole, rows, self.pad, self.device, dummy, cfg.packing, self.multiple))
        self.progress.drawn += cfg.grad_accum
        return micro

    def _check_finite(self, step: int, summed: float, n: int) -> None:
        if not math.isfinite(summed):
            last = self.progress.last_loss
            before = "no finite loss before it" if last is None else f"the last finite loss was {last:.4f}"
            raise NonFiniteLoss(f"{self.desc}, step {step}: the loss is {summed / max(n, 1)} ({before})")

    def _count(self, summed: float, n: int, penalty: float | None, micro: list[dict]) -> int:
        """Add the step's loss, penalty and real tokens to the progress; returns the step's real tokens."""
        p = self.progress
        p.last_loss = summed / max(n, 1)
        p.loss_sum, p.loss_tokens = p.loss_sum + summed, p.loss_tokens + n
        if penalty is not None:
            p.penalty_sum = penalty if p.penalty_sum is None else p.penalty_sum + penalty
        local_tokens = sum(b["n_tokens"] for b in micro)
        step_tokens = self.dist.sum(local_tokens) if self.world > 1 else local_tokens
        p.tokens += step_tokens
        return step_tokens

    def _update(self) -> float:
        """Clip, step the optimizer and the schedule; returns the learning rate the step used."""
        if self.cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.optimizer.step()
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return lr

    def _report(self, step: int, lr: float, penalty: float | None, tokens_per_s: float) -> None:
        p = self.progress
        if self.on_step is not None:
            values = {"loss": p.last_loss, "lr": lr, "tokens_per_s": tokens_per_s}
            self.on_step(step, values if penalty is None else {**values, "penalty": penalty})
        elapsed = time.perf_counter() - self.start
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{p.loss_sum / max(p.loss_tokens, 1):.3f}", tok_s=f"{p.tokens / elapsed:.0f}")

    def _validate(self, step: int) -> bool:
        """Every ``eval_every`` steps: the validation loss, keeping the best weights; True once patience runs out."""
        cfg, p = self.cfg, self.progress
        if not (cfg.eval_every and step % cfg.eval_every == 0 and self.validation):
            return False
        paused = time.perf_counter()
        val = validation_loss(self.model, self.encoder, self.validation, cfg.batch_size, self.autocast, self.dist)
        p.val_losses.append(val)
        if p.best_val_loss is None or val < p.best_val_loss:
            p.best_val_loss, p.bad_evals = val, 0
            self.best_state = [q.detach().clone() for q in self.params]
        else:
            p.bad_evals += 1
        self.start += time.perf_counter() - paused  # validation time is not training time
        return bool(cfg.patience) and p.bad_evals >= cfg.patience

    def _checkpoint(self, step: int) -> None:
        """Save the in-stage checkpoint when one is due (never after the last step: the stage's end is saved)."""
        due = self.checkpoints is not None and step < self.total_steps and self.checkpoints.due(step)
        if self.world > 1 and self.checkpoints is not None and self.checkpoints.minutes:
            due = bool(self.dist.sum(int(due)))  # each rank's clock says otherwise; an FSDP save gathers on every rank
        if not due:
            return
        paused = time.perf_counter()
        self.progress.seconds = paused - self.start
        state = self._state()
        # FSDP: every rank gathers the shards whole (rank 0 writes them), the files those of one process
        self.checkpoints.save(self.progress, self.dist.full_tree(state) if self.world > 1 else state)
        self.start += time.perf_counter() - paused  # checkpoint time is reported apart (StageStats.checkpoint_seconds)
        self.checkpoint_seconds += time.perf_counter() - paused

    def _stats(self, seconds: float) -> StageStats:
        p = self.progress
        return StageStats(
            steps=p.steps,
            tokens=p.tokens,
            seconds=seconds,
            train_loss=p.loss_sum / max(p.loss_tokens, 1),
            val_losses=p.val_losses,
            best_val_loss=p.best_val_loss,
            stopped_early=self.stopped_early,
            checkpoint_seconds=self.checkpoint_seconds,
            resumed_at_step=self.resumed_at_step,
            penalty=None if p.penalty_sum is None else p.penalty_sum / max(p.steps, 1),
        )

    def _validate_at_end(self, stats: StageStats) -> None:
        """The final validation loss; early stopping keeps the best weights seen, as HF's load_best_model_at_end."""
        final = validation_loss(
            self.model, self.encoder, self.validation, self.cfg.batch_size, self.autocast, self.dist
        )
        if self.best_state is not None and final > stats.best_val_loss:
            with torch.no_grad():
                for p, best in zip(self.params, self.best_state):
                    p.copy_(best)
        else:
            stats.val_losses.append(final)
            stats.best_val_loss = final if stats.best_val_loss is None else min(final, stats.best_val_loss)
