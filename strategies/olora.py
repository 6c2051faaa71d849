"""O-LoRA: orthogonal subspaces for each stage's LoRA adapter (Wang et al. 2023, https://arxiv.org/abs/2310.14152).

Each stage trains a fresh adapter (``adapter=new`` or ``stack``) while the earlier ones stay
frozen and active. A LoRA update B A x only sees the part of x in the row space of A, so pushing
the new A's rows orthogonal to every earlier A's rows keeps the new update out of the input
directions the old tasks' updates read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from continual_ft.errors import ContinualFTError
from continual_ft.train.protocol import StageInfo, Strategy

__all__ = ["OLoRA", "OLoRAConfig"]


@dataclass
class _Layer:
    old_a: list[torch.Tensor]  # earlier adapters' A, (r, d_in) each, detached
    new_a: list[nn.Parameter]  # the trainable adapter's A (one, in a normal run)
    new_params: list[nn.Parameter]  # the trainable adapter's A and B


@dataclass
class OLoRAConfig:
    lam: float = field(default=0.5, metadata={"help": "weight λ₁ of the orthogonality term (the paper's λ₁ = 0.5)"})
    l2: float = field(default=0.0, metadata={"help": "weight λ₂ of the L2 norm of the new adapter's weights"})

    def __post_init__(self):
        if self.lam < 0:
            raise ContinualFTError(f"olora.lam must be >= 0, got {self.lam}")
        if self.l2 < 0:
            raise ContinualFTError(f"olora.l2 must be >= 0, got {self.l2}")


class OLoRA(Strategy):
    """Orthogonality between the new adapter and every earlier one, in every LoRA layer:

        L = L_task + λ₁ Σ_layers Σ_old Σ_ij |(A_old A_newᵀ)_ij| + λ₂ Σ_{W ∈ new adapter} ‖W‖₂

    with A of shape (r, d_in). The L2 term is a sum of (unsquared) Frobenius norms of the new
    adapter's A and B matrices, as in the authors' code (github.com/cmnfriend/O-LoRA). The new
    adapter is the one whose weights require grad; the old ones are detached, so gradient reaches
    only the new adapter. Stage 0 has no old adapter: only the L2 term, if any.
    """

    name = "olora"
    summary = "Keep each new adapter's LoRA subspace orthogonal to every earlier adapter's, in every layer (O-LoRA)."
    adapter_modes = ("new", "stack")
    adapter_refusal = (
        "under adapter={adapter} no earlier adapter stays active beside the trained one for it to be orthogonal to"
    )

    def __init__(self, config: OLoRAConfig | None = None):
        self.config = config or OLoRAConfig()
        self._layers: list[_Layer] | None = None

    @staticmethod
    def layers(model: nn.Module) -> list[_Layer]:
        """Every LoRA layer's earlier adapters' A (detached) and new adapter's A and B (trainable)."""
        out = []
        for module in model.modules():
            if not isinstance(module, LoraLayer):
                continue
            new = [n for n in module.lora_A if module.lora_A[n].weight.requires_grad]
            out.append(
                _Layer(
                    old_a=[module.lora_A[n].weight.detach() for n in module.lora_A if n not in new],
                    new_a=[module.lora_A[n].weight for n in new],
                    new_params=[p for n in new for p in (module.lora_A[n].weight, module.lora_B[n].weight)],
                )
            )
        return out

    def before_stage(self, model: nn.Module, stage: StageInfo) -> None:
        self._layers = self.layers(model)
        if not self._layers:
            raise ContinualFTError("olora needs a LoRA model (peft LoraLayer modules); found none")
        if stage.index > 0 and not any(layer.old_a for layer in self._layers):
            raise ContinualFTError(
                "olora needs a new adapter per stage (adapter=new or stack); this model has only one adapter"
            )

    def after_stage(self, model: nn.Module, stage: StageInfo) -> None:
        self._layers = None

    def penalty(self, model: nn.Module, batch: dict, outputs) -> torch.Tensor | None:
        if self._layers is None:  # used without before_stage (e.g. a hand-written loop that skips it)
            self._layers = self.layers(model)
        lam, l2 = self.config.lam, self.config.l2
        terms = []
        for layer in self._layers:
            if not layer.new_a:
                continue
            # Small (r × r) products, in fp32 even when the step runs under bf16 autocast.
            with torch.autocast(layer.new_a[0].device.type, enabled=False):
                if lam and layer.old_a:
                    terms += [
                        lam * (old.float() @ new.float().T).abs().sum() for old in layer.old_a for new in layer.new_a
                    ]
                if l2:
                    terms += [l2 * torch.linalg.vector_norm(p.float()) for p in layer.new_params]
        return torch.stack(terms).sum() if terms else None
