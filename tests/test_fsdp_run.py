"""A whole continual run under FSDP2 (2 gloo processes, the shipped examples/accelerate/fsdp.yaml)
against the same run in one process.

accelerate turns FSDP on only for GPU-like devices; on CPU processes ``Dist`` sets it from the
launcher's FSDP variables, which the test takes from the shipped config with accelerate's own
launcher code. Same global batch: 2 processes × ``train.batch_size=2`` against 1 × 4. FSDP2
averages gradients over ranks as DDP does, so the runs differ only in the order of fp32 sums
(and each shard's padded width): after 2 stages with Adam the LoRA weights agree to 1e-5, and R,
argmax choices over 7 test examples per task, is equal. ``eval.batch_size=1`` and an odd test split
give the ranks 4 and 3 evaluation forwards: without ``Dist.lockstep`` the run would hang.
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

from continual_ft.checks import check_fsdp
from continual_ft.config import make_config
from continual_ft.distributed import CPU_ENV
from continual_ft.errors import ContinualFTError
from continual_ft.strategies import STRATEGIES, build

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("_dist_run_worker.py")


def fsdp_env() -> dict[str, str]:
    """The FSDP variables ``accelerate launch --config_file examples/accelerate/fsdp.yaml`` sets."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(ROOT / "examples/accelerate/fsdp.yaml"), "x.py"])
    env = prepare_multi_gpu_env(_validate_launch_command(args)[0])
    return {k: v for k, v in env.items() if k == "ACCELERATE_USE_FSDP" or k.startswith("FSDP_")}


def _settings(scenario: Path, batch_size: int, name: str) -> list[str]:
    return [
        f"scenario={scenario}",
        "model=tiny",
        "strategy=replay",
        "replay.buffer_size=8",
        "train.lr=1e-2",
        "train.epochs=2",
        "eval.batch_size=1",
        "precision=fp32",  # bf16 rounding depends on each shard's padded shape; fp32 shows the sharding is exact
        f"train.batch_size={batch_size}",
        "output_dir=runs",
        f"name={name}",
    ]


def _launch(nproc: int, out: Path, args: list[str], cwd: Path, env: dict) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    cmd += ["--master_port", str(free_port()), str(WORKER), str(out), *args]
    env = {**os.environ, CPU_ENV: "1", **env}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    scenario = write_toy_scenario(tmp / "data", test=7)
    (tmp / "one").mkdir()
    (tmp / "two").mkdir()
    _launch(1, tmp / "one", _settings(scenario, 4, "one"), tmp, {})
    _launch(2, tmp / "two", _settings(scenario, 2, "two"), tmp, fsdp_env())
    return tmp


def test_fsdp_shards_and_equals_one_process(runs):
    one = json.loads((runs / "one" / "rank0.json").read_text())
    two = [json.loads((runs / "two" / f"rank{r}.json").read_text()) for r in range(2)]
    assert not one["fsdp"] and two[0]["fsdp"] and two[1]["fsdp"]
    assert two[0]["R"] == two[1]["R"] == one["R"]
    single = load_file(runs / "one" / "rank0.safetensors")
    ranks = [load_file(runs / "two" / f"rank{r}.safetensors") for r in range(2)]
    assert ranks[0].keys() == ranks[1].keys() == single.keys()
    total = sum(w.numel() for w in single.values())
    assert two[0]["held"] + two[1]["held"] == total and 0 < two[0]["held"] < total  # each rank held its shard
    for name, w in single.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        assert torch.allclose(ranks[0][name], w, rtol=0, atol=1e-5), name
    assert [n for n, w in single.items() if "lora_B" in n and w.abs().max() > 0]  # the weights trained


def test_sharded_evaluation_scores_every_example_as_one_process(runs):
    """Each rank scores its share through the sharded model (4 and 3 forwards, in lockstep)."""
    for row in range(3):  # before training, after stage 1, after stage 2
        one, two = (
            [json.loads(line) for line in open(runs / "runs" / name / "predictions" / f"row{row}.jsonl")]
            for name in ("one", "two")
        )
        assert len(one) == len(two) == 14
        for a, b in zip(one, two):
            assert (a["task"], a["chosen"], a["answer"]) == (b["task"], b["chosen"], b["answer"])
            # written rounded to 1e-4; the weights differ by about 1e-6
            assert max(abs(x - y) for x, y in zip(a["loglik"], b["loglik"])) <= 2e-4


def test_rank0_saved_the_whole_adapter(runs):
    gathered = load_file(runs / "two" / "rank0.safetensors")
    for stage in ("stage1", "stage2"):
        saved = load_file(runs / "runs" / "two" / "adapters" / stage / "adapter_model.safetensors")
        assert len(saved) == len(gathered)
        if stage == "stage2":  # the final adapter: what the ranks hold at the end, whole
            for name, w in gathered.items():
                assert torch.equal(saved[name.replace(".default.", ".")], w), name
    single = load_file(runs / "runs" / "one" / "adapters" / "stage1" / "adapter_model.safetensors")
    sharded = load_file(runs / "runs" / "two" / "adapters" / "stage1" / "adapter_model.safetensors")
    for name, w in single.items():
        assert torch.allclose(sharded[name], w, rtol=0, atol=1e-5), name


def test_only_the_first_process_writes(runs):
    assert sorted(p.name for p in (runs / "runs").iterdir()) == ["one", "two"]
    results = json.loads((runs / "runs" / "two" / "results.json").read_text())
    assert results["complete"] and results["processes"] == 2
    assert not list((runs / "runs" / "two").rglob(".*"))  # no half-written temporary files


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["adapter=new"], "adapter=new under FSDP"),
        (["adapter=merge"], "adapter=merge under FSDP"),
        (["strategy=replay+ewc"], "strategy=ewc under FSDP"),
        (["strategy=lwf"], "strategy=lwf under FSDP"),
        (["train.checkpoint_every=2"], "train.checkpoint_every"),
    ],
)
def test_what_fsdp_refuses(overrides, message):
    config = make_config(["model=tiny", *overrides], tuple(STRATEGIES))
    with pytest.raises(ContinualFTError, match=message):
        check_fsdp(config, build(config.strategy, config.strategy_args), fsdp_version=2)


def test_fsdp1_is_refused():
    config = make_config(["model=tiny", "strategy=replay"], tuple(STRATEGIES))
    check_fsdp(config, build(config.strategy, config.strategy_args), fsdp_version=2)  # allowed
    with pytest.raises(ContinualFTError, match="fsdp_version: 2"):
        check_fsdp(config, build(config.strategy, config.strategy_args), fsdp_version=1)
