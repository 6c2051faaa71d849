"""Learning without Forgetting (Li & Hoiem 2016, https://arxiv.org/abs/1606.09282) as distillation.

The teacher is the model as it stood at the end of the previous stage. It is not a second model:
``before_stage`` snapshots the parameters that are about to train (the adapter, a few MB), and each
step runs one extra no-grad forward with the snapshot swapped in (``torch.func.functional_call``,
which swaps parameters in for the call and back after, touching no tensor in place).

Under FSDP2 the parameters are DTensor shards and each FSDP unit all-gathers its weights from its
own shards at its forward, so a swapped-in parameter would not be the one used: the teacher's rows
are copied into the shards for the teacher's forward and the student's copied back after (before
the step's backward gathers them again). Its gradient goes through the model, averaged by FSDP as
the loss's is. Every rank runs a teacher forward at every penalty, with or without rows to distil
(its share of the global batch may hold none of the chosen rows, or no answer rows): each forward
all-gathers, and the ranks must join the same ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torch.func import functional_call

from continual_ft.errors import ContinualFTError
from continual_ft.model.adapters import evaluated_adapter, only_adapter
from continual_ft.train.losses import answer_logits, model_inputs
from continual_ft.train.protocol import StageInfo, Strategy

__all__ = ["LwF", "LwFConfig"]


@dataclass
class LwFConfig:
    alpha: float = field(default=1.0, metadata={"help": "weight λ of the distillation term"})
    temperature: float = field(default=2.0, metadata={"help": "softmax temperature T of teacher and student"})
    fraction: float = field(
        default=0.5,
        metadata={"help": "share of each global batch's examples distilled (the teacher's forward is LwF's cost)"},
    )

    def __post_init__(self):
        if self.alpha < 0:
            raise ContinualFTError(f"lwf.alpha must be >= 0, got {self.alpha}")
        if self.temperature <= 0:
            raise ContinualFTError(f"lwf.temperature must be > 0, got {self.temperature}")
        if not 0 < self.fraction <= 1:
            raise ContinualFTError(f"lwf.fraction must be in (0, 1], got {self.fraction}")


def spread_rows(n: int, fraction: float) -> torch.Tensor:
    """Indices of ``ceil(fraction · n)`` of ``n`` rows, evenly spaced (first and last included)."""
    k = max(1, math.ceil(fraction * n - 1e-9))
    return torch.linspace(0, n - 1, k).round().long()


def distilled_rows(batch: dict, fraction: float) -> tuple[torch.Tensor, int, int]:
    """The rows of ``batch`` to distil, the answer-token count of every row distilled in the global batch, and
    the global batch's answer-token count.

    The rows are ``fraction`` of the global batch's, evenly spaced (:func:`spread_rows`), as one process
    holding all of it would choose them. A batch that is a process's share of it (or a part cut to a token
    budget) says where its rows sit in it (``global_rows``, ``global_answer_tokens``:
    :func:`continual_ft.train.batching.in_global_batch`) and gets those of its rows that were chosen, possibly
    none; a batch without them is its own global batch. A packed batch is one row: distilled whole.
    """
    own = (batch["labels"] != -100).sum(-1).tolist()
    if batch.get("packed"):
        return torch.zeros(1, dtype=torch.long), sum(own), sum(own)
    mine, lengths = batch.get("global_rows", range(len(own))), batch.get("global_answer_tokens", own)
    chosen = set(spread_rows(len(lengths), fraction).tolist())
    rows = torch.tensor([i for i, g in enumerate(mine) if g in chosen], dtype=torch.long)
    return rows, sum(lengths[g] for g in chosen), sum(lengths)


def select_rows(batch: dict, rows: torch.Tensor) -> dict:
    """The sub-batch of ``rows`` of a :func:`collate` batch, without the columns that are padding in all of them."""
    if len(rows) == batch["input_ids"].shape[0]:  # every row (a packed batch is one row)
        return batch
    device = batch["input_ids"].device
    idx = rows.to(device)
    attention = batch["attention_mask"][idx]
    start = int((attention.sum(0) > 0).int().argmax())  # left padding: the first column any row uses
    start = min(start, attention.shape[1] - batch["logits_to_keep"])  # keep the answer window whole
    sub = {k: batch[k][idx][:, start:] for k in ("input_ids", "attention_mask", "position_ids")}
    sub["labels"] = batch["labels"][idx.to(batch["labels"].device)]
    sub["logits_to_keep"] = batch["logits_to_keep"]
    sub["tasks"] = [batch["tasks"][i] for i in rows.tolist()]
    sub["n_tokens"] = int(sub["attention_mask"].sum())
    return sub


class LwF(Strategy):
    """Distil the previous stage's model into the current one on the current data:

        L = L_task + λ · T² · mean_answer_tokens KL( softmax(z_teacher / T) ‖ softmax(z_student / T) )

    over the answer positions (labels != -100) of ``fraction`` of the global batch's rows, the full
    vocabulary at each. T² keeps the gradient scale independent of T (Hinton et al. 2015). Stage 0
    has no teacher: no penalty.

    Cost: a LoRA training step is about two forwards (the backward through frozen weights is one),
    so a teacher forward on every row makes a stage ≈1.5x as long as naive; ``fraction=0.5`` (rows
    evenly spaced over the length-sorted batch) keeps it ≈1.25x. The batch mean of the KL is then
    an estimate over half the rows, which are shuffled anew every epoch.

    The rows are chosen from the step's global batch and the mean is over their answer tokens, however
    the batch is cut: over N processes (a strided share each) or into parts of ``train.micro_tokens``,
    each part distils its rows of that one choice and divides its KL sum by the whole choice's token
    count (:func:`distilled_rows`), so the step is the one process's on the whole batch
    (tests/test_lwf_global_rows.py; 2 processes at the default fraction: tests/test_distributed_run.py,
    tests/test_fsdp_strategies.py). A loop that hands over plain batches (the HF ``Trainer``, a
    hand-written loop) makes each batch its own global batch.

    The snapshot covers exactly the parameters that train in this stage, taken in ``before_stage``,
    i.e. after the adapter for the stage is set up and before any step:

    * ``adapter=continue``: the shared adapter as the previous stage left it.
    * ``adapter=new``/``stack``: the earlier adapters are frozen, so they are the same in teacher and
      student; the new adapter starts with B = 0, so the snapshot (that fresh adapter) makes the
      teacher compute exactly what the previous stage's model computed.
    * ``adapter=merge``: the fresh adapter (B = 0) on the base merged through the previous stage: the
      model evaluated after it, as under ``new``.
    * ``adapter=merge_final``: the fresh adapter trains from the base alone, so a snapshot of it would
      teach the base model. The teacher is instead the combination ``merged`` of the earlier stages,
      the model evaluated after the previous stage, which the model keeps inactive during the stage
      (:func:`continual_ft.model.adapters.evaluated_adapter`): its forward runs with that adapter alone.
    """

    name = "lwf"
    summary = "Distil the previous stage's model into the current one on the current data (LwF)."
    handles_shards = True  # FSDP: see the class docstring

    def __init__(self, config: LwFConfig | None = None):
        self.config = config or LwFConfig()
        self.teacher: dict[str, torch.Tensor] | None = None  # parameter name -> snapshot
        self._sharded = False  # FSDP: the snapshot is this rank's rows (DTensor shards)
        self._adapter: str | None = None  # merge_final: the adapter that alone is the teacher (no snapshot)

    @property
    def needs_global_batch(self) -> str:
        """Below ``fraction=1`` the rows distilled are chosen from the step's global batch (:func:`distilled_rows`)."""
        return f"lwf.fraction={self.config.fraction}" if self.config.fraction < 1 else ""

    def before_stage(self, model: nn.Module, stage: StageInfo) -> None:
        self._adapter = None
        if stage.index == 0:
            self.teacher = None
            return
        self._adapter = evaluated_adapter(model)
        if self._adapter is not None:  # merge_final: the teacher is an adapter the model holds, not a snapshot
            self.teacher, self._sharded = {}, False
            return
        self.teacher = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        self._sharded = any(isinstance(t, DTensor) for t in self.teacher.values())

    def after_stage(self, model: nn.Module, stage: StageInfo) -> None:
        self.teacher = None  # the next stage snapshots afresh; no need to hold memory in between
        self._adapter = None

    @torch.no_grad()
    def teacher_logits(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """The teacher's logits for ``batch``: the model's forward with the snapshot swapped in (under
        ``merge_final``, with the earlier stages' combined adapter alone active)."""
        was_training = model.training
        model.eval()  # a deterministic teacher: no LoRA dropout
        try:
            if self._adapter is not None:
                with only_adapter(model, self._adapter):
                    out = model(**model_inputs(batch))
            elif self._sharded:
                out = self._forward_in_place(model, batch)
            else:
                out = functional_call(model, self.teacher, args=(), kwargs=model_inputs(batch), strict=False)
        finally:
            model.train(was_training)
        return out.logits

    def _forward_in_place(self, model: nn.Module, batch: dict):
        """FSDP: the forward with the teacher's rows copied into the parameters' shards, the student's copied back."""
        params = dict(model.named_parameters())
        if not all(isinstance(params[n], DTensor) for n in self.teacher):  # a layer still gathered: FSDP won't re-read
            raise ContinualFTError(
                "lwf under FSDP needs fsdp_reshard_after_forward: true (examples/accelerate/fsdp.yaml): a layer "
                "kept gathered after its forward would compute the teacher with the student's weights"
            )
        student = {n: params[n].detach().clone() for n in self.teacher}
        try:
            for n, t in self.teacher.items():
                params[n].copy_(t)
            return model(**model_inputs(batch))
        finally:
            for n, t in student.items():
                params[n].copy_(t)

    def penalty(self, model: nn.Module, batch: dict, outputs) -> torch.Tensor | None:
        if self.teacher is None or self.config.alpha == 0:
            return None
        rows, distilled, answers = distilled_rows(batch, self.config.fraction)
        sub = select_rows(batch, rows if len(rows) else torch.zeros(1, dtype=torch.long))
        mask = sub["labels"] != -100
        if not len(rows) or not mask.any():
            if self._sharded:  # FSDP: the other ranks' teacher forwards all-gather, this rank must join them
                self.teacher_logits(model, sub)
            return None
        T = self.config.temperature
        # answer_logits also accepts outputs computed over the whole sequence.
        student = answer_logits(outputs, batch)[rows.to(outputs.logits.device)][mask].float() / T  # (tokens, vocab)
        teacher = answer_logits(self.teacher_logits(model, sub), sub)[mask].float() / T
        kl = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True, reduction="sum")
        # This batch's part of the mean over the global batch's distilled tokens. The trainer weighs a
        # micro-batch's penalty by its share of the step's answer tokens (n of them); times answers / n, the
        # parts add up to the global batch's mean, weighted as the whole batch would be (whole: answers = n).
        n = int((batch["labels"] != -100).sum())
        return self.config.alpha * T * T * kl / distilled * (answers / n)
