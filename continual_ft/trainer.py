"""One stage of training, read top to bottom: batches, loss, penalties, step, validate.

The loss is the summed cross-entropy over answer tokens divided by the answer-token count
of the whole optimizer step (torchtune's normalisation), so gradient accumulation changes
nothing but memory. Each strategy's penalty is added per micro-batch, weighted by that
micro-batch's share of the step's answer tokens.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import get_scheduler

from continual_ft.batching import Encoder, collate, length_grouped_batches, to_device, token_loss
from continual_ft.config import TrainConfig
from continual_ft.data import Example

__all__ = ["StageStats", "train_stage", "backward_step", "resolve_precision", "autocast_for", "validation_loss"]


@dataclass
class StageStats:
    steps: int = 0
    tokens: int = 0  # real (non-padding) tokens trained on
    seconds: float = 0.0  # training time, validation excluded
    train_loss: float = float("nan")  # mean answer-token loss over the stage
    val_losses: list[float] = field(default_factory=list)
    best_val_loss: float | None = None
    stopped_early: bool = False

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def _cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` → bf16 where the hardware computes it natively (CUDA bf16, AVX512-BF16/AMX), else fp32."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if _cpu_has_bf16() else "fp32"


def autocast_for(precision: str, device: torch.device) -> Callable:
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext


def _trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


@torch.no_grad()
def validation_loss(model, encoder: Encoder, examples: Sequence[Example], batch_size: int, autocast) -> float:
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    encoded = [encoder.encode(e) for e in examples]
    for items in length_grouped_batches(encoded, batch_size, rng=None):
        with autocast():
            loss, n, _ = token_loss(model, to_device(collate(items, encoder.tokenizer.pad_token_id), device))
        total, count = total + loss.item(), count + n
    model.train(was_training)
    return total / max(count, 1)


def backward_step(
    model, micro: Sequence[dict], strategies: Sequence = (), autocast: Callable = nullcontext
) -> tuple[float, int]:
    """Accumulate the gradients of one optimizer step over its micro-batches.

    Returns the summed task loss and the answer-token count (for logging).
    """
    step_tokens = sum(int((b["labels"] != -100).sum()) for b in micro)
    total = 0.0
    for batch in micro:
        with autocast():
            summed, n, outputs = token_loss(model, batch)
            loss = summed / step_tokens
            for s in strategies:
                extra = s.penalty(model, batch, outputs)
                if extra is not None:
                    loss = loss + (n / step_tokens) * extra
        loss.backward()
        total += summed.item()
    return total, step_tokens


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
) -> StageStats:
    """Train ``model``'s trainable parameters on ``examples`` for one stage."""
    device = next(model.parameters()).device
    pad = encoder.tokenizer.pad_token_id
    encoded = [encoder.encode(e) for e in examples]
    rng = random.Random(seed)
    batches_per_epoch = math.ceil(len(encoded) / cfg.batch_size)
    total_steps = cfg.max_steps or cfg.epochs * math.ceil(batches_per_epoch / cfg.grad_accum)

    params = _trainable(model)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(
        cfg.schedule, optimizer, num_warmup_steps=min(cfg.warmup_steps, total_steps), num_training_steps=total_steps
    )

    def micro_batches():
        while True:  # epochs, reshuffled each time; the step budget decides when to stop
            yield from length_grouped_batches(encoded, cfg.batch_size, rng)

    stats, stream = StageStats(), micro_batches()
    best_state, bad_evals, loss_sum, loss_tokens = None, 0, 0.0, 0
    model.train()
    bar = tqdm(total=total_steps, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    start = time.perf_counter()
    for step in range(1, total_steps + 1):
        micro = [to_device(collate(next(stream), pad), device) for _ in range(cfg.grad_accum)]
        summed, n = backward_step(model, micro, strategies, autocast)
        loss_sum, loss_tokens = loss_sum + summed, loss_tokens + n
        stats.tokens += sum(b["n_tokens"] for b in micro)
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        stats.steps = step
        elapsed = time.perf_counter() - start
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum / max(loss_tokens, 1):.3f}", tok_s=f"{stats.tokens / elapsed:.0f}")

        if cfg.eval_every and step % cfg.eval_every == 0 and validation:
            paused = time.perf_counter()
            val = validation_loss(model, encoder, validation, cfg.batch_size, autocast)
            stats.val_losses.append(val)
            if stats.best_val_loss is None or val < stats.best_val_loss:
                stats.best_val_loss, bad_evals = val, 0
                best_state = [p.detach().clone() for p in params]
            else:
                bad_evals += 1
            start += time.perf_counter() - paused  # validation time is not training time
            if cfg.patience and bad_evals >= cfg.patience:
                stats.stopped_early = True
                break
    stats.seconds = time.perf_counter() - start
    bar.close()
    stats.train_loss = loss_sum / max(loss_tokens, 1)

    if validation:
        final = validation_loss(model, encoder, validation, cfg.batch_size, autocast)
        if best_state is not None and final > stats.best_val_loss:
            with torch.no_grad():  # early stopping keeps the best weights seen, as HF's load_best_model_at_end
                for p, best in zip(params, best_state):
                    p.copy_(best)
        else:
            stats.val_losses.append(final)
            stats.best_val_loss = final if stats.best_val_loss is None else min(final, stats.best_val_loss)
    return stats
