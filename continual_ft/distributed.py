"""One continual run over several processes (DDP), through accelerate.

Launch with ``torchrun --nproc_per_node N cli.py run ...`` or ``accelerate launch cli.py run ...``;
a plain ``python cli.py run ...`` is one process, needs no process group, and every operation
below is then a no-op.

Which backend: accelerate picks NCCL on CUDA (``DistributedType.MULTI_GPU``). Under torchrun on
a machine without a GPU it sees ``LOCAL_RANK`` but no accelerator and, unless asked for the CPU,
reports ``DistributedType.NO`` with one process in every rank (while still opening a process
group), so each rank would silently train alone on all the data. :func:`get_dist` therefore asks
for the CPU (``Accelerator(cpu=True)``: ``MULTI_CPU`` over gloo) when CUDA is absent or
``CONTINUAL_FT_CPU=1``; the variable also forces the CPU on a CUDA machine, which is how the tests
run 2 gloo processes anywhere. Thread counts are left to the launcher: torchrun sets
``OMP_NUM_THREADS=1`` for several processes; only where it is unset does accelerate split the
physical cores among the local ranks (with psutil, a dependency of accelerate).

How DDP meets our loss (2 gloo processes, a LoRA'd tiny Llama; tests/test_distributed.py):

* DDP averages gradients over ranks. The trainer divides the summed answer-token loss by the
  answer-token count of the whole optimizer step over all ranks (``sum``) and multiplies by the
  world size W, so a step equals one process accumulating all ranks' micro-batches:
  ``L_r = W · Σ_{b∈r} (CE_b + n_b · P) / Σ_{all b} n_b``, which DDP averages to
  ``Σ_b (CE_b + n_b · P) / Σ_b n_b``. Observed: 12 of 28 LoRA gradient tensors bitwise equal, the
  rest within 1.5e-8 (1.1e-7 of the largest entry): W = 2 scales exactly, but the micro-batches'
  and the penalty's gradients are added in another order (fp32 rounding). The test allows 1e-5.
* A penalty computed on the *unwrapped* module's parameters (the same Parameter objects) and added
  to the loss of the wrapped forward is all-reduced with the rest: DDP's hooks sit on each
  parameter's gradient accumulator, which fires once with the sum of both paths.
* A forward and backward through the *unwrapped* module alone is not all-reduced: DDP only
  expects gradients after its own forward with grad enabled. So EWC's per-rank squared gradients
  stay per rank until ``sum`` adds them. Never leave a wrapped forward with grad enabled that no
  backward consumes: the next backward, even through the unwrapped module, then all-reduces, and
  the process aborts at exit.
* ``no_sync`` on every micro-batch but the last of a step gives the same gradients as syncing
  each one: the last backward all-reduces the accumulated sum.
* A parameter that requires grad but gets no gradient in a step makes the next DDP forward fail
  ("Expected to have finished reduction in the prior iteration"). Only the stage's adapter
  requires grad and all of it is used, so ``find_unused_parameters`` stays off.

Under FSDP (not wired yet; FSDP1, ``use_orig_params=True``, 2 gloo processes) parameters outside a
forward are this rank's flat shard, so a parameter penalty covers the shard only, and its gradient
reaches that shard without the averaging the loss gets: its weighting must differ from DDP's.

HF ``TrainingArguments`` resets accelerate's shared state when created unless its
``accelerator_config`` has ``use_configured_state=True``; pass that when combining the two.
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object

__all__ = ["Dist", "get_dist", "CPU_ENV"]

#: Set to 1 to run on the CPU (gloo between processes) even where CUDA is available.
CPU_ENV = "CONTINUAL_FT_CPU"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


class Dist:
    """This process's place in the run and the few collective operations the library needs, over accelerate."""

    def __init__(self):
        cpu = _flag(CPU_ENV) or not torch.cuda.is_available()
        self.accelerator = Accelerator(cpu=cpu)
        self.rank: int = self.accelerator.process_index
        self.world: int = self.accelerator.num_processes
        device = self.accelerator.device  # MULTI_CPU says cpu:0, but CPU tensors report plain cpu
        self.device: torch.device = torch.device("cpu") if device.type == "cpu" else device
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched != self.world:
            raise RuntimeError(
                f"launched as {launched} processes but accelerate sees {self.world} "
                f"({self.accelerator.distributed_type}); set {CPU_ENV}=1 to run them on the CPU over gloo"
            )

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def __repr__(self) -> str:
        return f"Dist(rank={self.rank}, world={self.world}, device={self.device})"

    def shard(self, items: list) -> list:
        """This rank's share, ``items[rank::world]``: strided, so length-sorted batches split evenly."""
        return list(items[self.rank :: self.world])

    def sum(self, value):
        """The sum of ``value`` (float, int or tensor) over all ranks, of the same type, on every rank."""
        if self.world == 1:
            return value
        if isinstance(value, torch.Tensor):
            return self.accelerator.reduce(value.to(self.device), reduction="sum").to(value.device)
        dtype = torch.int64 if isinstance(value, int) else torch.float64
        total = self.accelerator.reduce(torch.tensor(value, dtype=dtype, device=self.device), reduction="sum")
        return type(value)(total.item())

    def gather(self, objects: list) -> list:
        """Every rank's list, concatenated in rank order, on every rank (picklable objects)."""
        return gather_object(list(objects)) if self.world > 1 else list(objects)

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        return broadcast_object_list([obj], from_process=0)[0] if self.world > 1 else obj

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def prepare(self, model, optimizer):
        """The model wrapped for DDP/FSDP and its optimizer; with one process both as they are."""
        if self.world == 1:
            return model, optimizer
        return self.accelerator.prepare(model, optimizer)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def no_sync(self, model):
        """Skip the gradient all-reduce for the backwards inside (every micro-batch of a step but the last)."""
        return self.accelerator.no_sync(model) if self.world > 1 else nullcontext()

    def unwrap(self, model):
        """The module inside a DDP/FSDP wrapper (the PEFT model itself); ``model`` if not wrapped."""
        return self.accelerator.unwrap_model(model)

    def close(self) -> None:
        """Destroy the process group at the end of a run (NCCL warns at exit otherwise); a no-op with one process."""
        if self.world > 1:
            self.accelerator.end_training()


_DIST: Dist | None = None


def get_dist() -> Dist:
    """The process's :class:`Dist`, created on first use (one process when not launched by torchrun/accelerate)."""
    global _DIST
    if _DIST is None:
        _DIST = Dist()
    return _DIST
