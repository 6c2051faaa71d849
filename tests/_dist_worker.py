"""Run by tests/test_distributed.py under ``torch.distributed.run --nproc_per_node 2`` (gloo, CPU).

Each rank saves what it saw to ``<out>/rank<r>.pt``; the test compares that with one process.
The training step and its data live here so that the test computes the 1-process reference
with the same code: ``step_grads(model, micro, dist=None)``.
"""

from __future__ import annotations

import copy
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

from continual_ft.config import LoraConfig
from continual_ft.data.tasks import Example, Task
from continual_ft.eval.scoring import evaluate_task
from continual_ft.model.adapters import start_stage
from continual_ft.model.loading import load_model
from continual_ft.train.batching import Encoder, collate
from continual_ft.train.distributed import Dist, get_dist
from continual_ft.train.losses import token_loss

LABELS = ["yes", "no", "maybe"]
N_MICRO = 4  # global micro-batches of one optimizer step: 2 per rank with 2 ranks
PENALTY = 0.5


def tiny_model():
    torch.manual_seed(0)
    model, tokenizer = load_model("tiny", seed=0)
    return start_stage(model, "continue", 0, LoraConfig()), tokenizer


def examples(n: int, offset: int = 0) -> list[Example]:
    """Toy examples of varied length (so batches pad differently) and answers of 1-2 tokens."""
    return [
        Example("toy", f"item {i}: {'word ' * (i % 5)}is it {LABELS[i % 3]}?\n\nAnswer:", LABELS[(i * 7) % 3])
        for i in range(offset, offset + n)
    ]


def micro_batches(tokenizer) -> list[dict]:
    encoder = Encoder(tokenizer, 64, chat_template=False)
    encoded = [encoder.encode(e) for e in examples(4 * N_MICRO)]
    return [collate(encoded[4 * k : 4 * k + 4], tokenizer.pad_token_id) for k in range(N_MICRO)]


def eval_task() -> Task:
    return Task("toy", LABELS, [], [], examples(13, offset=100))  # 13: the shards are uneven


def penalty(model, anchor: list[torch.Tensor]) -> torch.Tensor:
    """An EWC-like Σ (θ − θ*)² over the trainable parameters of the plain (unwrapped) module."""
    params = [p for p in model.parameters() if p.requires_grad]
    return PENALTY * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))


def step_grads(model, micro: list[dict], dist: Dist | None = None) -> list[torch.Tensor]:
    """One optimizer step's gradients: loss / (global answer tokens) · world, penalty weighted by token share.

    With ``dist``, ``model`` is the DDP-wrapped one and this rank takes ``dist.shard(micro)``;
    ``no_sync`` covers every micro-batch but the last.
    """
    world = dist.world if dist else 1
    inner = dist.unwrap(model) if dist else model
    params = [p for p in inner.parameters() if p.requires_grad]
    anchor = [p.detach() + 0.01 for p in params]
    mine = dist.shard(micro) if dist else micro
    local_tokens = sum(int((b["labels"] != -100).sum()) for b in mine)
    step_tokens = dist.sum(local_tokens) if dist else local_tokens
    for k, batch in enumerate(mine):
        last = k == len(mine) - 1
        with dist.no_sync(model) if dist and not last else nullcontext():
            summed, n, _ = token_loss(model, batch)
            loss = world * (summed + n * penalty(inner, anchor)) / step_tokens
            if dist:
                dist.backward(loss)
            else:
                loss.backward()
    return [p.grad.detach().clone() for p in params]


def main(out: Path) -> None:
    dist = get_dist()
    saved = {
        "rank": dist.rank,
        "world": dist.world,
        "is_main": dist.is_main,
        "device": str(dist.device),
        "distributed_type": str(dist.accelerator.distributed_type),
        "backend": dist.accelerator.state.backend,
        "shard": dist.shard(list(range(7))),
        "sum_int": dist.sum(dist.rank + 1),
        "sum_float": dist.sum(0.25 * (dist.rank + 1)),
        "sum_tensor": dist.sum(torch.tensor([1.0, 2.0]) * (dist.rank + 1)),
        "gather": dist.gather([f"r{dist.rank}-{i}" for i in range(dist.rank + 1)]),
        "broadcast": dist.broadcast({"from": dist.rank}),
    }
    dist.barrier()

    model, tokenizer = tiny_model()
    micro = micro_batches(tokenizer)
    ddp_model = copy.deepcopy(model)
    optimizer = torch.optim.SGD([p for p in ddp_model.parameters() if p.requires_grad], lr=0.1)
    wrapped, optimizer = dist.prepare(ddp_model, optimizer)
    saved["wrapped"] = type(wrapped).__name__
    saved["unwrap_is_model"] = dist.unwrap(wrapped) is ddp_model
    saved["grads"] = step_grads(wrapped, micro, dist)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    saved["params"] = [p.detach().clone() for p in ddp_model.parameters() if p.requires_grad]

    # A backward through the unwrapped module (how EWC collects squared gradients) stays per rank.
    summed, n, _ = token_loss(ddp_model, micro[dist.rank])
    (summed / n).backward()
    local = [p.grad.detach().clone() for p in ddp_model.parameters() if p.requires_grad]
    saved["local_grads"] = local
    saved["summed_local_grads"] = [dist.sum(g) for g in local]
    optimizer.zero_grad(set_to_none=True)

    # Under no_sync a backward through the wrapped model stays per rank too.
    with dist.no_sync(wrapped):
        summed, n, _ = token_loss(wrapped, micro[dist.rank])
        dist.backward(summed / n)
    saved["no_sync_grads"] = [p.grad.detach().clone() for p in ddp_model.parameters() if p.requires_grad]

    encoder = Encoder(tokenizer, 64, chat_template=False)
    saved["score"] = evaluate_task(model, encoder, eval_task(), batch_size=4, dist=dist).__dict__
    saved["score_wrapped"] = evaluate_task(wrapped, encoder, eval_task(), batch_size=4, dist=dist).__dict__
    torch.save(saved, out / f"rank{dist.rank}.pt")
    dist.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
