"""One continual run over several processes (DDP or FSDP), through accelerate.

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

FSDP (accelerate's FSDP2, ``fully_shard``; ``examples/accelerate/fsdp.yaml``) shards the model in
place: every parameter becomes a DTensor holding this rank's rows, and each FSDP unit (a decoder
layer) all-gathers its weights just before its forward.

* The trainer's loss scaling stays as for DDP: FSDP2 averages gradients over ranks in its
  reduce-scatter, as DDP does in its all-reduce (checked against one process, tests/test_fsdp_run.py).
* Every forward all-gathers, so all ranks must run the same number of forwards. Training does;
  evaluation and validation, which score each rank's share of the examples (and decode greedily,
  stopping early per batch), run inside :meth:`Dist.lockstep`.
* Strategies with ``uses_model = False`` (they pick data) run as they are. EWC and LwF read the
  parameters, DTensor shards there, and handle them (``handles_shards``; docs/distributed.md): their
  hooks see every batch on every rank, EWC keeps its rows of F and θ* and weighs its penalty's
  gradient, which reaches the shard without the averaging the loss gets, to match one process.
  Other strategies that use the model are refused.
* The runner shards the model before its first evaluation (:meth:`Dist.shard_model`), with the
  adapter every stage trains already attached; the whole model is never on a process's device.
* Saving gathers the adapter's tensors whole (:meth:`Dist.full_tensors`, all ranks), then rank 0 writes.
  An in-stage checkpoint gathers the optimizer's state too (:meth:`Dist.full_tree`); on resume each
  rank cuts its rows from the whole tensors (:meth:`Dist.shard_like`).

FSDP1 (``fsdp_version: 1``) is refused: it wraps the model in another module, where FSDP2 keeps the
PEFT model the runner holds, and on CPU processes it fails at wrap time ("Inconsistent compute
device and `device_id`": accelerate passes ``cpu:0``, FSDP1 compares it with ``cpu``).

HF ``TrainingArguments`` resets accelerate's shared state when created unless its
``accelerator_config`` has ``use_configured_state=True``; pass that when combining the two.
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext

import torch
from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, broadcast_object_list, gather_object

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
        if cpu and _flag("ACCELERATE_USE_FSDP") and self.accelerator.num_processes > 1:
            # accelerate turns FSDP on only for GPU-like devices: CPU processes get MULTI_CPU (DDP)
            # and the FSDP config is dropped. FSDP2 itself runs over gloo (tests/test_fsdp_run.py).
            # Set as accelerate's AcceleratorState does for GPUs, in the process-wide state too.
            state = self.accelerator.state
            state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            state.fsdp_plugin = FullyShardedDataParallelPlugin()  # from the launcher's FSDP_* variables
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

    @property
    def is_fsdp(self) -> bool:
        """Launched with an FSDP config (``accelerate launch --config_file examples/accelerate/fsdp.yaml``)."""
        return self.accelerator.distributed_type == DistributedType.FSDP

    @property
    def fsdp_version(self) -> int | None:
        return self.accelerator.state.fsdp_plugin.fsdp_version if self.is_fsdp else None

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
        """The model wrapped for DDP (FSDP2 shards it in place) and its optimizer; with one process both as they are."""
        if self.world == 1:
            return model, optimizer
        if self.is_fsdp and _is_sharded(model):
            # Sharded in place by an earlier stage: the optimizer already holds its DTensor parameters.
            return model, optimizer
        return self.accelerator.prepare(model, optimizer)

    def shard_model(self, model):
        """Under FSDP, ``model`` sharded in place now (each process's share moved to its device); as it is
        otherwise. accelerate's FSDP2 prepare takes an optimizer with the model: a throwaway one."""
        if not (self.is_fsdp and self.world > 1) or _is_sharded(model):
            return model
        trainable = [p for p in model.parameters() if p.requires_grad]
        model = self.accelerator.prepare(model, torch.optim.SGD(trainable, lr=0.0))[0]
        # FSDP2 allocates the storage of the gathered weights at the first forward. Made under
        # torch.inference_mode (evaluation), it could not be written in training afterwards ("Inplace
        # update to inference tensor outside InferenceMode is not allowed"): one forward without it first,
        # in eval mode so that dropout draws no random numbers.
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=self.device), use_cache=False)
        model.train(was_training)
        return model

    @contextmanager
    def lockstep(self, model):
        """Run ``model``'s forwards inside in step with the other ranks, however many each rank runs.

        Under FSDP each forward all-gathers the weights, a collective every rank must join. Inside,
        every forward of ``model`` is preceded by a vote (one all-reduce): 1 from each rank that has a
        forward to run. On leaving, a rank keeps voting 0 and runs a one-token forward (its output
        thrown away) for as long as another rank still votes 1. A no-op without FSDP.
        """
        if not (self.is_fsdp and self.world > 1):
            yield
            return

        def vote(module, args) -> None:  # returns None: the forward's inputs stay as they are
            self.sum(1)

        handle = model.register_forward_pre_hook(vote, prepend=True)
        try:
            yield
        finally:
            handle.remove()
        ids = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        while self.sum(0):
            with torch.no_grad():
                model(input_ids=ids, use_cache=False)

    def full_tensors(self, tensors: dict) -> dict:
        """``tensors`` with every FSDP shard (DTensor) all-gathered whole, on the CPU; every rank must call."""
        from torch.distributed.tensor import DTensor

        return {n: (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu() for n, t in tensors.items()}

    def full_tree(self, tree):
        """``tree`` (dicts, lists, tuples: an optimizer's state dict) with every DTensor all-gathered whole,
        on the CPU, the rest as it is. Every rank must call, with trees of the same shape (the same
        gathers in the same order)."""
        from torch.distributed.tensor import DTensor

        if isinstance(tree, DTensor):
            return tree.full_tensor().detach().cpu()
        if isinstance(tree, dict):
            return {k: self.full_tree(v) for k, v in tree.items()}
        if isinstance(tree, (list, tuple)):
            return type(tree)(self.full_tree(v) for v in tree)
        return tree

    def shard_like(self, full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``full``, a whole tensor every rank holds, cut as ``like`` is: this rank's shard when ``like`` is a
        DTensor (no communication), else ``full`` itself, on ``like``'s device."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        full = full.to(like.device)
        if not isinstance(like, DTensor):
            return full
        return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)

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
            # Every rank past its last collective first, so none tears the group down under another.
            self.accelerator.wait_for_everyone()
            self.accelerator.end_training()


def _is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


_DIST: Dist | None = None


def get_dist() -> Dist:
    """The process's :class:`Dist`, created on first use (one process when not launched by torchrun/accelerate)."""
    global _DIST
    if _DIST is None:
        _DIST = Dist()
    return _DIST
