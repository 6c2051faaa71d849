"""Averaged Gradient Episodic Memory (Chaudhry et al. 2019, https://arxiv.org/abs/1812.00420) on adapter weights.

A-GEM does not train on its memory: it only keeps each optimizer step from going uphill on it.
The memory is a :class:`Replay` buffer (text examples of earlier stages, filled the same way)
whose ``train_data`` is never called. The step's gradient is changed in the ``after_backward``
hook, which every loop calls once the step's micro-batches are all backpropagated, before
clipping and the optimizer step.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
from torch import nn

from continual_ft.errors import ContinualFTError
from continual_ft.strategies.replay import POLICIES, Replay, ReplayConfig, draw
from continual_ft.train.protocol import StageInfo, Strategy

__all__ = ["AGEM", "AGEMConfig", "project"]


@dataclass
class AGEMConfig:
    memory_size: int = field(default=200, metadata={"help": "examples of earlier stages kept in the episodic memory"})
    reference_batch: int = field(
        default=8,
        metadata={"help": "memory examples per reference gradient (an extra forward and backward every step)"},
    )
    reference_every: int = field(
        default=1,
        metadata={
            "help": "recompute g_ref every N optimizer steps and project onto the latest one in between "
            "(1 = every step, the paper's; the reference pass's cost per step divides by N, and so does the "
            "protection: see docs/results/README.md, 'Time each strategy adds')"
        },
    )
    policy: str = field(
        default="task_balanced",
        metadata={"help": f"which examples the memory keeps: {', '.join(POLICIES)} (the paper's is per task)"},
    )
    seed: int = field(default=0, metadata={"help": "seed for filling the memory and drawing reference batches"})

    def __post_init__(self):
        if self.memory_size < 1:
            raise ContinualFTError(f"agem.memory_size must be >= 1, got {self.memory_size}")
        if self.reference_batch < 1:
            raise ContinualFTError(f"agem.reference_batch must be >= 1, got {self.reference_batch}")
        if self.reference_every < 1:
            raise ContinualFTError(f"agem.reference_every must be >= 1, got {self.reference_every}")
        if self.policy not in POLICIES:
            raise ContinualFTError(f"agem.policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")


def project(g: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """A-GEM's rule on flat vectors, and whether it projected: ``g − (g·ref / ref·ref) ref`` where ``g·ref < 0``."""
    dot = torch.dot(g, ref)
    if not dot < 0:
        return g, False
    return g - (dot / torch.dot(ref, ref)) * ref, True


def _flat(grads, params: list[nn.Parameter]) -> torch.Tensor:
    """``grads`` (one per parameter, None for none) as one float32 vector, zeros where None."""
    parts = [
        torch.zeros(p.numel(), device=p.device) if g is None else g.reshape(-1).float() for g, p in zip(grads, params)
    ]
    return torch.cat(parts)


class AGEM(Strategy):
    """Keep every optimizer step from raising the loss on a memory of earlier stages' examples:

        g̃ = g − (g·g_ref / g_ref·g_ref) g_ref   if g·g_ref < 0,   else g̃ = g

    with g the step's gradient over the trainable parameters (flattened) and g_ref the gradient of the
    loss on a reference batch drawn from the memory: to first order the step leaves the memory's loss
    as it is or lowers it (g̃·g_ref = 0 where it projects).

    * g_ref: the gradient of the mean answer-token loss over ``reference_batch`` examples drawn from
      the memory (without repetition while it holds enough), Σ_b n_b ∇L_b / Σ_b n_b over the batches
      ``stage.batches`` makes of them. The draw is seeded by (seed, stage, step), so a resumed stage
      and a multi-process run draw what one uninterrupted process draws. Computed in eval mode (no
      dropout, as EWC's Fisher) with ``torch.autograd.grad``, which leaves every ``.grad`` untouched.
    * Several processes: each runs its share of the reference batches and ``stage.sum_across`` totals
      the gradient and the token count, so g_ref, and with it whether to project, is the same on
      every process; g is the already all-reduced step gradient.
    * g is whatever the loop accumulated: the task loss plus every strategy's penalty (``ewc+agem``).
      Its scale does not matter (g̃ is linear in g, the test a sign), so a loss scaler's scaled
      gradients project alike.
    * The memory is filled in ``after_stage`` from the stage's own examples (``policy`` as replay's),
      so in stage k it holds tasks of stages < k only; stage 0 has nothing to project onto.
    * Cost: one forward and backward on ``reference_batch`` examples per optimizer step (≈2x naive's
      step when it equals the batch size), and two dot products over the adapter's parameters.
      ``reference_every=N`` computes g_ref at steps 1, N+1, 2N+1, … of a stage (the draw seeded by that
      step) and projects every step onto the latest, dividing the reference cost per step by N: the
      constraint then holds for a memory gradient up to N−1 steps old. A stage resumed between two such
      steps recomputes g_ref at its first step (the same draw, the current weights). Measured on
      medical → legal (seed 0): N = 8 projected more steps than N = 1 (58% against 39%) and protected
      nothing (BWT −31 against −1): a memory gradient a few steps old no longer points where the
      forgetting goes, so the default is the paper's N = 1.
    """

    name = "agem"
    summary = "Keep every optimizer step from raising the loss on a memory of earlier stages' examples (A-GEM)."
    # merge_final trains each stage's adapter from the base alone: g_ref would be the base model's memory
    # gradient, not the evaluated combination's, and the combination is not linear in it for svd/ties/magmax.
    adapter_modes = ("continue", "new", "stack", "merge")
    adapter_refusal = (
        "under adapter={adapter} each stage trains a fresh adapter from the base model alone, so the memory's "
        "gradient would be the base model's, not that of the evaluated combination of the earlier stages"
    )

    def __init__(self, config: AGEMConfig | None = None):
        self.config = config or AGEMConfig()
        c = self.config
        self.memory = Replay(ReplayConfig(buffer_size=c.memory_size, policy=c.policy, seed=c.seed))
        self.steps = 0  # optimizer steps of the current stage that had a memory to consult
        self.projected = 0  # of those, how many were projected
        self.references = 0  # reference gradients computed in the current stage
        self._ref: tuple[tuple[int, int], torch.Tensor | None] | None = None  # ((stage, step) of its draw, g_ref)

    def before_stage(self, model: nn.Module, stage: StageInfo) -> None:
        self.steps = self.projected = self.references = 0
        self._ref = None

    def reference_gradient(
        self, model: nn.Module, stage: StageInfo, params: list[nn.Parameter], step: int
    ) -> torch.Tensor | None:
        """g_ref, flattened in the order of ``params``; None if the reference batch has no answer token."""
        rng = random.Random(f"{self.config.seed}:reference:{stage.index}:{step}")
        examples = draw(self.memory.buffer, self.config.reference_batch, rng)
        device = params[0].device
        total = torch.zeros(sum(p.numel() for p in params), device=device)
        tokens = 0
        was_training = model.training
        model.eval()
        try:
            with torch.enable_grad():
                for batch in stage.batches(examples):
                    n = int((batch["labels"] != -100).sum())
                    if n == 0:
                        continue
                    grads = torch.autograd.grad(stage.loss_fn(model, batch), params, allow_unused=True)
                    total += n * _flat(grads, params)
                    tokens += n
        finally:
            model.train(was_training)
        # Every process takes part in both sums, whether or not it had a reference batch of its own.
        total = stage.sum_across(total)
        tokens = float(stage.sum_across(torch.tensor(float(tokens), device=device)))
        return total / tokens if tokens > 0 else None

    def after_backward(self, model: nn.Module, stage: StageInfo | None, step: int) -> None:
        if not self.memory.buffer:
            return
        if stage is None:
            raise ContinualFTError("strategy=agem needs the stage to draw its reference batches (pass stage=...)")
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            return
        every = self.config.reference_every
        anchor = step - (step - 1) % every  # the step of the period's draw: 1, N+1, 2N+1, ...
        if self._ref is None or self._ref[0] != (stage.index, anchor):
            self._ref = ((stage.index, anchor), self.reference_gradient(model, stage, params, anchor))
            self.references += 1
        ref = self._ref[1]
        if ref is None:
            return
        new, projected = project(_flat([p.grad for p in params], params), ref)
        self.steps += 1
        self.projected += projected
        if not projected:
            return
        offset = 0
        for p in params:
            part = new[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
            if p.grad is None:
                p.grad = part.to(p.dtype)
            else:
                p.grad.copy_(part)

    def after_stage(self, model: nn.Module, stage: StageInfo) -> None:
        self.memory.after_stage(model, stage)

    def state_dict(self) -> dict:
        return {"memory": self.memory.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.memory.load_state_dict(state["memory"])

    def stats(self) -> dict[str, float]:
        """The memory's size and, over the last stage's steps, the share whose gradient was projected and
        how many reference gradients were computed."""
        share = self.projected / self.steps if self.steps else 0.0
        return {"memory_size": len(self.memory.buffer), "projected_share": share, "references": self.references}
