"""A whole continual run over 2 processes (gloo, CPU) against the same run in one process.

Same global batch: 2 processes × ``train.batch_size=2`` against 1 × 4. Each step then sums the
same examples' gradients, split over two ranks, so the runs differ only in the order of fp32 sums
(and each shard's padded width): after 2 stages with Adam the LoRA weights agree to 1e-5
(observed 1.2e-6 against entries up to 0.2), and R, argmax choices over 8 test examples per
task, is equal. The test runs in fp32: under bf16 autocast a shard's padded shape changes the
rounding of every matmul, and Adam turns that into differences of about 1e-3.

``strategy=replay+ewc+lwf`` with LwF at its default ``fraction`` (0.5): it distils half of the global
batch's rows, chosen from the global batch, and averages its KL over their answer tokens, so each
process distils its rows of that choice and the step is the one process's (weights observed 8.5e-7 apart).
Choosing half of each process's own rows instead (as LwF did before) left them 7e-3 apart.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import free_port
from toy import write_toy_scenario

from continual_ft.train.distributed import CPU_ENV

WORKER = Path(__file__).with_name("_dist_run_worker.py")


def _settings(scenario: Path, batch_size: int, name: str) -> list[str]:
    return [
        f"scenario={scenario}",
        "model=tiny",
        "strategy=replay+ewc+lwf",  # lwf.fraction left at its default, 0.5
        "replay.buffer_size=8",
        "ewc.fisher_batches=2",
        "train.lr=1e-2",
        "train.epochs=2",
        "precision=fp32",  # bf16 rounding depends on each shard's padded shape; fp32 shows the sharding is exact
        f"train.batch_size={batch_size}",
        "output_dir=runs",
        f"name={name}",
    ]


def _launch(nproc: int, out: Path, args: list[str], cwd: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    cmd += ["--master_port", str(free_port()), str(WORKER), str(out), *args]
    proc = subprocess.run(cmd, cwd=cwd, env={**os.environ, CPU_ENV: "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    scenario = write_toy_scenario(tmp / "data")
    (tmp / "one").mkdir()
    (tmp / "two").mkdir()
    _launch(1, tmp / "one", _settings(scenario, 4, "one"), tmp)
    _launch(2, tmp / "two", _settings(scenario, 2, "two"), tmp)
    return tmp


def test_two_processes_equal_one_with_the_same_global_batch(runs):
    one = json.loads((runs / "one" / "rank0.json").read_text())
    two = [json.loads((runs / "two" / f"rank{r}.json").read_text()) for r in range(2)]
    assert one["world"] == 1 and two[0]["world"] == two[1]["world"] == 2
    assert two[0]["R"] == two[1]["R"] == one["R"]
    single = load_file(runs / "one" / "rank0.safetensors")
    ranks = [load_file(runs / "two" / f"rank{r}.safetensors") for r in range(2)]
    assert ranks[0].keys() == ranks[1].keys() == single.keys()
    for name, w in single.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name  # DDP keeps the ranks identical
        assert torch.allclose(ranks[0][name], w, rtol=0, atol=1e-5), name  # observed: at most 1.2e-6
    changed = [n for n, w in single.items() if "lora_B" in n and w.abs().max() > 0]
    assert changed  # the comparison is about weights that trained


def test_only_the_first_process_writes(runs):
    written = sorted(p.name for p in (runs / "runs").iterdir())
    assert written == ["one", "two"]  # rank 1 made no run directory of its own
    results = json.loads((runs / "runs" / "two" / "results.json").read_text())
    assert results["complete"] and results["processes"] == 2
    leftovers = [p for p in (runs / "runs" / "two").rglob(".*")]
    assert not leftovers  # no half-written temporary files from a second writer
    assert {p.name for p in (runs / "runs" / "two" / "adapters").iterdir()} == {"stage1", "stage2"}


def test_penalty_and_log_as_one_process(runs):
    """EWC's and LwF's penalty, summed over the ranks, is the one process's, and so is each stage's training
    loss; rank 0 alone writes log.jsonl."""
    one, two = (json.loads((runs / "runs" / name / "results.json").read_text()) for name in ("one", "two"))
    assert one["stage_stats"][0]["penalty"] is None  # stage 1: no anchor, no teacher
    assert two["stage_stats"][1]["penalty"] > 0
    assert two["stage_stats"][1]["penalty"] == pytest.approx(one["stage_stats"][1]["penalty"], rel=1e-4)
    for a, b in zip(one["stage_stats"], two["stage_stats"], strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
    entries = [json.loads(line) for line in (runs / "runs" / "two" / "log.jsonl").read_text().splitlines()]
    steps = [e["step"] for e in entries if e["kind"] == "step"]
    assert steps == list(range(1, sum(s["steps"] for s in two["stage_stats"]) + 1))  # each step once
    assert [e["stage"] for e in entries if e["kind"] == "stage"] == [0, 1, 2]


#: Short runs (one epoch) of the strategies the run above leaves out. ``data``: joint adds stage 1's examples
#: to stage 2, SSR its synthetic stage-1 examples, then task_balanced (temperature 0) gives colors and
#: animals equal shares; O-LoRA keeps stage 2's new adapter orthogonal to stage 1's (``adapter=new``, every
#: data strategy acts in that mode). lr 1e-3: at 1e-2 the tiny model answers SSR's inputs with blanks.
SHORT = {
    "naive": ["strategy=naive"],
    "data": [
        "strategy=joint+ssr+task_balanced+olora",
        "adapter=new",
        "ssr.per_task=6",
        "ssr.demos=3",
        "ssr.max_new_tokens=12",
        "ssr.known_answers=false",
        "olora.l2=0",
    ],
}


@pytest.fixture(scope="module")
def short_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp_short")
    scenario = write_toy_scenario(tmp / "data")
    for key, extra in SHORT.items():
        for nproc, batch_size in ((1, 4), (2, 2)):
            out = tmp / key / str(nproc)
            out.mkdir(parents=True)
            common = [f"scenario={scenario}", "model=tiny", "train.lr=1e-3", "train.epochs=1", "precision=fp32"]
            settings = [*common, *extra, f"train.batch_size={batch_size}", "output_dir=runs", f"name={key}{nproc}"]
            _launch(nproc, out, settings, tmp)
    return tmp


@pytest.mark.parametrize("key", list(SHORT))
def test_naive_data_strategies_and_olora_over_two_processes_act_as_one(key, short_runs):
    """The same data each stage, R, LoRA weights (1e-5) and stage-2 penalty as one process, and the strategies'
    effect: naive trains on each stage's own task; joint puts colors into stage 2, SSR its synthetic colors,
    task_balanced makes the two tasks' shares equal; O-LoRA's stage-2 penalty is > 0."""
    folder = short_runs / key
    one = json.loads((folder / "1" / "rank0.json").read_text())
    two = [json.loads((folder / "2" / f"rank{r}.json").read_text()) for r in range(2)]
    assert two[0]["world"] == 2 and two[0]["R"] == two[1]["R"] == one["R"]
    assert two[0]["trained"] == two[1]["trained"] == one["trained"]
    single = load_file(folder / "1" / "rank0.safetensors")
    ranks = [load_file(folder / "2" / f"rank{r}.safetensors") for r in range(2)]
    assert ranks[0].keys() == ranks[1].keys() == single.keys()
    for name, w in single.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        assert torch.allclose(ranks[0][name], w, rtol=0, atol=1e-5), name
    assert [n for n, w in single.items() if "lora_B" in n and w.abs().max() > 0]

    stats = [
        json.loads((short_runs / "runs" / f"{key}{n}" / "results.json").read_text())["stage_stats"] for n in (1, 2)
    ]
    stage1, stage2 = one["trained"]
    assert list(stage1) == ["colors"]
    if key == "naive":
        assert list(stage2) == ["animals"]
        assert [s["penalty"] for s in stats[0] + stats[1]] == [None] * 4
        return
    assert stage2["colors"] > 0 and stage2["colors:ssr"] > 0  # joint's and SSR's
    assert stage2["colors"] + stage2["colors:ssr"] == stage2["animals"]  # task_balanced's equal shares
    assert stats[0][0]["penalty"] is None and stats[0][1]["penalty"] > 0  # O-LoRA: an earlier adapter in stage 2
    assert stats[1][1]["penalty"] == pytest.approx(stats[0][1]["penalty"], rel=1e-4)
