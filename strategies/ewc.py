"""Elastic Weight Consolidation (Kirkpatrick et al. 2017, https://arxiv.org/abs/1612.00796) on adapter weights.

Only trainable parameters (the LoRA adapter, a few MB) get a Fisher and an anchor, never the
frozen base model. Parameters are keyed by their ``named_parameters()`` name, so a penalty
applies only to a parameter that exists, is trainable, and was trainable when an anchor was taken.
That is why EWC acts only under ``adapter=continue``, where one adapter trains on through every
stage: under ``new``/``stack``, ``merge`` and ``merge_final`` each stage trains a fresh adapter,
whose weights had no Fisher and no anchor when the earlier stages ended (their own adapters are
frozen, or merged into the base, and cannot move), so the penalty would be 0 and the run naive.
Anchoring the merged weights instead (``merge``) would need a Fisher of every targeted base weight,
a copy the size of those weights rather than of an adapter. Those modes are refused up front
(``adapter_modes``), and in a loop that skips that check :meth:`before_stage` refuses a stage
whose trained parameters have no anchor.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from continual_ft.errors import ContinualFTError
from continual_ft.strategies.sharded import Layout, local, max_over_ranks, sum_over_ranks
from continual_ft.train.protocol import StageInfo, Strategy

__all__ = ["EWC", "EWCConfig"]


@dataclass
class EWCConfig:
    lam: float = field(default=100.0, metadata={"help": "penalty strength λ (Fisher is max-normalised; try 1-1e4)"})
    fisher_batches: int = field(
        default=8, metadata={"help": "batches of the stage's data used to estimate the Fisher (its cost bound)"}
    )
    online: bool = field(default=False, metadata={"help": "online EWC: one decayed Fisher and the latest anchor"})
    gamma: float = field(default=1.0, metadata={"help": "online EWC: decay of the old Fisher, F ← γ·F_old + F_new"})
    normalize: bool = field(default=True, metadata={"help": "divide each stage's Fisher by its largest entry"})
    seed: int = field(default=0, metadata={"help": "seed for picking the examples the Fisher is estimated on"})

    def __post_init__(self):
        if self.lam < 0:
            raise ContinualFTError(f"ewc.lam must be >= 0, got {self.lam}")
        if self.fisher_batches < 1:
            raise ContinualFTError(f"ewc.fisher_batches must be >= 1, got {self.fisher_batches}")
        if not 0 <= self.gamma <= 1:
            raise ContinualFTError(f"ewc.gamma must be in [0, 1], got {self.gamma}")


Tensors = dict[str, torch.Tensor]


class EWC(Strategy):
    """EWC penalty over the anchors of earlier stages:

        L = L_task + λ/2 Σ_t Σ_i F_t,i (θ_i − θ*_t,i)²

    * F_t: diagonal empirical Fisher of stage t, at the batch level: the squared gradient of the
      mean answer-token loss (``stage.loss_fn``, gold answers) of each batch, averaged over at most
      ``fisher_batches`` batches of a seeded random subset of the stage's own examples. With
      ``normalize`` it is divided by its largest entry (F ∈ [0, 1]), so λ does not depend on the
      model's gradient scale or the batch size (a batch-level Fisher is ≈ 1/batch of a per-example one).
    * θ*_t: the trainable parameters at the end of stage t.
    * Cost: one forward and backward per Fisher batch, after each stage but the run's last
      (``stage.final``: no later stage would use it). 8 batches against a stage of ~40 steps of
      the same batch size is ≈1.2x that stage; the penalty itself is a few element-wise ops on
      the adapter's parameters per step.
    * Plain EWC keeps one (F_t, θ*_t) pair per stage (exact; memory grows by one adapter-size
      pair per stage). Online EWC (Schwarz et al. 2018) keeps one pair: F ← γ·F_old + F_new, θ* ← θ*_new.

    Only under ``adapter=continue`` (the module docstring says why): the parameters anchored after
    stage t are the ones that train in stage t+1.

    Under FSDP2 (parameters are DTensor shards; docs/distributed.md, "FSDP") every process runs every
    Fisher batch (``stage.batches`` gives them all there), so FSDP's average of the processes' equal
    gradients is the batch's gradient, and squares it on its own rows; the largest entry is taken
    over all processes. F and θ* are this process's rows, the penalty is summed over the processes
    with a gradient weighed as FSDP weighs the loss's (:func:`sum_over_ranks`), and
    :meth:`state_dict` gathers them whole: the files are those of one process, and a resumed run
    cuts its rows from them again.
    """

    name = "ewc"
    summary = "Anchor the adapter's weights to their values after earlier stages, each weighed by its Fisher (EWC)."
    handles_shards = True  # FSDP: see the class docstring
    adapter_modes = ("continue",)
    adapter_refusal = "under adapter={adapter} each stage trains a fresh adapter with no Fisher of its own"

    def __init__(self, config: EWCConfig | None = None):
        self.config = config or EWCConfig()
        self.anchors: list[dict[str, Tensors]] = []  # [{"fisher": {name: F}, "anchor": {name: θ*}}, ...]
        self._device_cache: tuple | None = None
        # FSDP: how each parameter is split, F and θ* holding this rank's rows ({} without FSDP; None: not looked yet)
        self._layouts: dict[str, Layout] | None = None

    def _take_rows(self, model: nn.Module) -> None:
        """Under FSDP, once: note how the trainable parameters are split and keep this rank's rows of
        state loaded whole (a resumed run's files)."""
        if self._layouts is not None:
            return
        self._layouts = {n: Layout.of(p) for n, p in model.named_parameters() if isinstance(p, DTensor)}
        if self._layouts and self.anchors:
            cut = self._layouts
            self.anchors = [
                {k: {n: cut[n].rows(t) if n in cut else t for n, t in d.items()} for k, d in a.items()}
                for a in self.anchors
            ]
            self._device_cache = None

    def before_stage(self, model: nn.Module, stage: StageInfo) -> None:
        """Refuse a stage whose trained parameters have no anchor (a fresh adapter): it would train as naive."""
        if not self.anchors or self.config.lam == 0:
            return
        trained = [n for n, p in model.named_parameters() if p.requires_grad]
        if trained and not any(n in a["fisher"] for a in self.anchors for n in trained):
            raise ContinualFTError(
                f"strategy=ewc needs adapter=continue: the parameters trained in stage {stage.index + 1} have no "
                "Fisher of their own (a fresh adapter each stage), so EWC would add nothing"
            )

    def fisher(self, model: nn.Module, stage: StageInfo) -> Tensors:
        """Diagonal empirical Fisher of the trainable parameters on this stage's examples."""
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        examples = stage.examples
        first = next(iter(stage.batches(examples)), None)
        if first is None or not params:
            return {}
        subset = random.Random(f"{self.config.seed}:{stage.index}").sample(
            examples, min(len(examples), self.config.fisher_batches * len(first["tasks"]))
        )
        fisher = {n: torch.zeros_like(local(p), dtype=torch.float32) for n, p in params.items()}
        was_training = model.training
        model.eval()  # no dropout: the Fisher of the model as it will be evaluated
        count = 0
        with torch.enable_grad():
            for batch in stage.batches(subset):
                for p in params.values():
                    p.grad = None
                stage.loss_fn(model, batch).backward()
                for n, p in params.items():
                    if p.grad is not None:
                        fisher[n] += local(p.grad).detach().float() ** 2  # FSDP: this rank's rows
                count += 1
        for p in params.values():
            p.grad = None
        model.train(was_training)
        # Several processes: each ran its share of the batches; the Fisher is the mean over all of them
        # (under FSDP each ran them all, and sum_across is the identity).
        count = int(stage.sum_across(torch.tensor(float(count), device=next(iter(fisher.values())).device)))
        fisher = {n: (stage.sum_across(f) / max(count, 1)).cpu() for n, f in fisher.items()}
        top = max((float(f.max()) for f in fisher.values() if f.numel()), default=0.0)
        if self._layouts:  # each rank holds some rows: the largest entry of them all
            top = max_over_ranks(top, next(iter(self._layouts.values())))
        if self.config.normalize and top > 0:
            fisher = {n: f / top for n, f in fisher.items()}
        return fisher

    def after_stage(self, model: nn.Module, stage: StageInfo) -> None:
        if stage.final:
            return
        self._take_rows(model)
        fisher = self.fisher(model, stage)
        anchor = {n: local(p).detach().float().cpu().clone() for n, p in model.named_parameters() if n in fisher}
        if self.config.online and self.anchors:
            old, gamma = self.anchors[0], self.config.gamma
            # A parameter anchored before but not trained now (none under adapter=continue) keeps its decayed entry.
            for n, f in old["fisher"].items():
                fisher[n] = gamma * f + fisher[n] if n in fisher else gamma * f
                anchor.setdefault(n, old["anchor"][n])
            self.anchors = []
        self.anchors.append({"fisher": fisher, "anchor": anchor})
        self._device_cache = None

    def _on(self, device: torch.device) -> list[dict[str, Tensors]]:
        # Keep a copy next to the parameters: moving a few MB to the GPU at every step would dominate the penalty.
        if self._device_cache is None or self._device_cache[0] != device:
            moved = [{k: {n: t.to(device) for n, t in d.items()} for k, d in a.items()} for a in self.anchors]
            self._device_cache = (device, moved)
        return self._device_cache[1]

    def penalty(self, model: nn.Module, batch: dict, outputs) -> torch.Tensor | None:
        if not self.anchors or self.config.lam == 0:
            return None
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not params:
            return None
        self._take_rows(model)
        total = None
        for a in self._on(local(params[0][1]).device):
            for n, p in params:
                if n in a["fisher"]:
                    term = (a["fisher"][n] * (local(p).float() - a["anchor"][n]) ** 2).sum()
                    total = term if total is None else total + term
        if total is None:
            return None
        if self._layouts:  # this rank's rows: the whole penalty, each rank's rows getting the gradient once
            total = sum_over_ranks(total, next(iter(self._layouts.values())).group)
        return self.config.lam / 2 * total

    def state_dict(self) -> dict:
        """F and θ* of every anchor, whole (under FSDP gathered from every rank: every rank must call)."""
        whole = self._layouts or {}
        return {
            "anchors": [
                {k: {n: whole[n].whole(t) if n in whole else t for n, t in d.items()} for k, d in a.items()}
                for a in self.anchors
            ]
        }

    def load_state_dict(self, state: dict) -> None:
        """Whole tensors, as :meth:`state_dict` gives them; under FSDP each rank keeps its rows at first use."""
        self.anchors = [{k: {n: t.cpu() for n, t in d.items()} for k, d in a.items()} for a in state["anchors"]]
        self._layouts = None
        self._device_cache = None
