"""A-GEM's gradient hook under DDP, run by tests/test_agem.py under ``torch.distributed.run`` (gloo, CPU).

Every rank: a DDP step (forward and backward through the wrapper, gradients all-reduced), then the
step's gradient replaced by a hand-made one that climbs the memory's loss (the same on every rank,
as an all-reduced gradient is), A-GEM's hook on the unwrapped model with the runner's sharded
reference batches, the optimizer step, and one more DDP step (the reducer must be undisturbed).
Each rank saves, to ``<out>/rank<r>.pt``, the gradient after the hook, the one process's projection
of the same gradient (reference batches all on this rank) and the final weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from continual_ft.config import LoraConfig
from continual_ft.data.tasks import Example
from continual_ft.model.adapters import start_stage
from continual_ft.model.loading import load_model
from continual_ft.strategies.agem import AGEM, AGEMConfig, project
from continual_ft.train.batching import Encoder, collate, to_device
from continual_ft.train.distributed import get_dist
from continual_ft.train.loop import backward_step
from continual_ft.train.protocol import Batches, stage_info


def examples(task: str, answers: tuple[str, str]) -> list[Example]:
    return [Example(task, f"item {i}: is it yes?\n\nAnswer:", answers[i % 2], f"{task}{i}") for i in range(8)]


def flat_grads(params) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1).float() for p in params])


def set_grads(params, g: torch.Tensor) -> None:
    offset = 0
    for p in params:
        p.grad = g[offset : offset + p.numel()].view_as(p).clone()
        offset += p.numel()


if __name__ == "__main__":
    out = Path(sys.argv[1])
    dist = get_dist()
    model, tokenizer = load_model("tiny", seed=0)
    model = start_stage(model, "continue", 0, LoraConfig(r=4, alpha=8))
    with torch.no_grad():  # the same non-zero B on every rank: A gets a gradient
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    encoder = Encoder(tokenizer, 64, chat_template=False)
    first, second = examples("a", ("yes", "no")), examples("b", ("no", "yes"))
    agem = AGEM(AGEMConfig(memory_size=8, reference_batch=8))
    agem.after_stage(model, stage_info(0, ["a"], first, Batches(encoder, 4)))
    # The runner's stage: global batches of 4 (2 per process), each process scoring its share.
    stage = stage_info(1, ["b"], second, Batches(encoder, 4, shard=dist.shard), sum_across=dist.sum)
    alone = stage_info(1, ["b"], second, Batches(encoder, 4))  # every reference batch here, summed by no one

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    train_model, optimizer = dist.prepare(model, optimizer)
    items = [encoder.encode(e) for e in dist.shard(second)]
    micro = [to_device(collate(items, tokenizer.pad_token_id), torch.device("cpu"))]
    backward_step(train_model, micro, [], dist=dist)

    ref = agem.reference_gradient(model, alone, params, step=1)
    noise = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3))
    g = -ref + 0.5 * ref.norm() * noise / noise.norm()
    set_grads(params, g)
    agem.after_backward(model, stage, step=1)
    hooked = flat_grads(params)
    expected, _ = project(g, ref)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    backward_step(train_model, micro, [], dist=dist)  # DDP still in step after the hook's own backward
    torch.save(
        {
            "hooked": hooked,
            "expected": expected,
            "projected": agem.projected,
            "weights": torch.cat([p.detach().reshape(-1) for p in params]),
            "world": dist.world,
        },
        out / f"rank{dist.rank}.pt",
    )
    dist.close()
