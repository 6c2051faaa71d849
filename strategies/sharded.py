"""What a strategy needs of FSDP2's shards (docs/distributed.md, "FSDP").

Under FSDP2 every trainable parameter is a DTensor of which this process holds some rows. A strategy
that keeps tensors per parameter (EWC's Fisher and anchors) keeps this process's rows of them, and
gathers them whole to save them, so that its files are those of one process. Nothing here needs the
launcher: the layout comes from the parameters themselves (their device mesh and placements).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as tdist
from torch.distributed.tensor import DTensor, distribute_tensor

from continual_ft.errors import ContinualFTError

__all__ = ["local", "Layout", "sum_over_ranks", "max_over_ranks"]


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's rows of ``t`` (a DTensor shard's local tensor, differentiable), or ``t`` itself."""
    return t.to_local() if isinstance(t, DTensor) else t


@dataclass(frozen=True)
class Layout:
    """How one parameter is split over the processes: enough to gather its rows whole and to cut a whole tensor."""

    mesh: object  # torch.distributed.DeviceMesh
    placements: tuple
    shape: torch.Size
    stride: tuple
    device: torch.device

    @classmethod
    def of(cls, p: DTensor) -> Layout:
        if p.device_mesh.ndim != 1:  # HSDP: sharded and replicated; summing shards would count replicas twice
            raise ContinualFTError(f"a {p.device_mesh.ndim}-D device mesh (HSDP): strategies support FSDP's 1-D one")
        return cls(p.device_mesh, tuple(p.placements), p.shape, p.stride(), p.to_local().device)

    @property
    def group(self):
        return self.mesh.get_group()

    def whole(self, rows: torch.Tensor) -> torch.Tensor:
        """The whole tensor, on the CPU, from every process's ``rows`` (a collective: every rank calls)."""
        d = DTensor.from_local(rows.to(self.device), self.mesh, self.placements, shape=self.shape, stride=self.stride)
        return d.full_tensor().cpu()

    def rows(self, whole: torch.Tensor) -> torch.Tensor:
        """This process's rows of ``whole``, on the CPU (cut locally, no communication)."""
        cut = distribute_tensor(whole.to(self.device), self.mesh, self.placements, src_data_rank=None)
        return cut.to_local().cpu()


class _SumOverRanks(torch.autograd.Function):
    """Forward: the sum over the ranks. Backward: the mean over the ranks of the incoming gradients.

    A term computed on a rank's own rows reaches them without FSDP's averaging of gradients. With this,
    it acts as a term of every rank's loss whose gradient FSDP averages: rank r's rows get
    (1/W) Σ_k g_k ∂P/∂θ_r, where g_k is the weight rank k's loss gives the term (the trainer's
    token-share weights, W·n_k/N, average to 1 over a step)."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        total = value.detach().clone()
        tdist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        tdist.all_reduce(grad, group=ctx.group)
        return grad / tdist.get_world_size(ctx.group), None


def sum_over_ranks(value: torch.Tensor, group) -> torch.Tensor:
    """Σ over the ranks of ``value`` (a scalar on this rank's rows), with a gradient FSDP-averaged like the loss's."""
    return _SumOverRanks.apply(value, group)


def max_over_ranks(value: float, layout: Layout) -> float:
    top = torch.tensor(value, dtype=torch.float64, device=layout.device)
    tdist.all_reduce(top, op=tdist.ReduceOp.MAX, group=layout.group)
    return float(top)
