"""Several processes: 2 gloo ranks on the CPU (tests/_dist_worker.py) against one process.

The ranks are started with ``python -m torch.distributed.run`` and ``CONTINUAL_FT_CPU=1``, so
the test runs the same on a CUDA machine (where accelerate would otherwise pick NCCL).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import _dist_worker as worker
import pytest
import torch

from continual_ft.eval.scoring import evaluate_task
from continual_ft.train.batching import Encoder
from continual_ft.train.distributed import CPU_ENV, get_dist
from continual_ft.train.losses import token_loss

WORKER = Path(__file__).with_name("_dist_worker.py")
# fp32 gradients of a step split over 2 ranks vs one process: W = 2 scales exactly, but the
# micro-batches' (and the penalty's) contributions are summed in another order; observed ≈ 1e-7.
RTOL = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: Path, *args, nproc: int = 2, timeout: float = 180) -> str:
    """Run ``script`` in ``nproc`` processes on the CPU (gloo); return its output, failing the test if it fails."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    cmd += ["--master_port", str(free_port()), str(script), *map(str, args)]
    env = {**os.environ, CPU_ENV: "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{output[-5000:]}"
    return output


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """What each of the 2 ranks saved."""
    out = tmp_path_factory.mktemp("dist")
    torchrun(WORKER, out)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a - b).abs().max().item() <= RTOL * b.abs().max().item()


def test_ranks_and_collectives(ranks):
    for r, got in enumerate(ranks):
        assert (got["rank"], got["world"], got["is_main"], got["device"]) == (r, 2, r == 0, "cpu")
        assert (got["distributed_type"], got["backend"]) == ("DistributedType.MULTI_CPU", "gloo")
        assert got["shard"] == list(range(7))[r::2]
        assert got["sum_int"] == 3 and isinstance(got["sum_int"], int)
        assert got["sum_float"] == 0.75 and isinstance(got["sum_float"], float)
        assert torch.equal(got["sum_tensor"], torch.tensor([3.0, 6.0]))
        assert got["gather"] == ["r0-0", "r1-0", "r1-1"]  # rank order, uneven lengths
        assert got["broadcast"] == {"from": 0}
        assert got["wrapped"] == "DistributedDataParallel" and got["unwrap_is_model"]


@pytest.fixture(scope="module")
def reference() -> list[torch.Tensor]:
    """One process's gradients of the step over all 4 micro-batches (accumulation)."""
    model, tokenizer = worker.tiny_model()
    return worker.step_grads(model, worker.micro_batches(tokenizer))


def test_ddp_step_with_penalty_matches_one_process(ranks, reference):
    """Each rank trains on 2 of the 4 micro-batches (no_sync on the first); its loss is scaled as the trainer's."""
    grads = [got["grads"] for got in ranks]
    assert len(grads[0]) == len(reference) > 0
    for g0, g1, ref in zip(*grads, reference):
        assert torch.equal(g0, g1)  # one all-reduce, the same on both ranks
        assert close(g0, ref), (g0 - ref).abs().max().item()
    model, _ = worker.tiny_model()
    start = [p.detach() for p in model.parameters() if p.requires_grad]
    for p0, p1, p, ref in zip(ranks[0]["params"], ranks[1]["params"], start, reference):
        assert torch.equal(p0, p1)
        assert torch.allclose(p0, p - 0.1 * ref, rtol=0, atol=1e-7)  # SGD lr 0.1


def test_unwrapped_backward_is_not_reduced(ranks):
    """EWC's squared gradients come from backwards through the unwrapped module: per rank until summed."""
    local0, local1 = ranks[0]["local_grads"], ranks[1]["local_grads"]
    assert any(not torch.equal(a, b) for a, b in zip(local0, local1))
    for r in range(2):
        for a, b, s in zip(local0, local1, ranks[r]["summed_local_grads"]):
            assert torch.equal(s, a + b)


def test_no_sync_backward_is_not_reduced(ranks):
    for got in ranks:  # the same micro-batch through the DDP wrapper under no_sync: this rank's gradients alone
        assert all(torch.equal(a, b) for a, b in zip(got["no_sync_grads"], got["local_grads"]))


def test_sharded_evaluation_equals_one_process(ranks):
    model, tokenizer = worker.tiny_model()
    encoder = Encoder(tokenizer, 64, chat_template=False)
    one = evaluate_task(model, encoder, worker.eval_task(), batch_size=4)
    for got in ranks:
        for key in ("score", "score_wrapped"):  # the plain model, and the DDP-wrapped one
            score = got[key]
            assert (score["accuracy"], score["exact_match"], score["n"]) == (one.accuracy, one.exact_match, one.n)
            tokens = round(score["tokens_per_s"] * score["seconds"])
            assert tokens == round(one.tokens_per_s * one.seconds)  # both ranks' tokens counted
    assert ranks[0]["score"] == ranks[1]["score"]  # rank 0's wall time on both


def test_one_process_get_dist_is_a_no_op(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    dist = get_dist()
    assert dist is get_dist()
    assert (dist.rank, dist.world, dist.is_main) == (0, 1, True)
    assert dist.shard([3, 1, 2]) == [3, 1, 2]
    t = torch.tensor([1.5])
    assert dist.sum(3) == 3 and dist.sum(0.5) == 0.5 and dist.sum(t) is t
    assert dist.gather([1, "a"]) == [1, "a"]
    obj = {"x": 1}
    assert dist.broadcast(obj) is obj
    dist.barrier()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    assert dist.prepare(model, optimizer) == (model, optimizer)
    assert dist.unwrap(model) is model
    assert not torch.distributed.is_initialized()

    micro = worker.micro_batches(tokenizer)[:2]
    with dist.no_sync(model):
        summed, n, _ = token_loss(model, micro[0])
        dist.backward(summed / n)
    assert all(p.grad is not None for p in optimizer.param_groups[0]["params"])

    encoder = Encoder(tokenizer, 64, chat_template=False)
    a = evaluate_task(model, encoder, worker.eval_task(), batch_size=4, dist=dist)
    b = evaluate_task(model, encoder, worker.eval_task(), batch_size=4)
    assert (a.accuracy, a.exact_match, a.n) == (b.accuracy, b.exact_match, b.n)
