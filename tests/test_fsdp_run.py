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
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil  # an accelerate dependency
import pytest
import torch
from safetensors.torch import load_file
from test_distributed import free_port
from test_resume import _files
from toy import write_toy_scenario

from continual_ft.config import make_config
from continual_ft.errors import ContinualFTError
from continual_ft.run.checks import check_fsdp
from continual_ft.state_codec import load_tree
from continual_ft.strategies import STRATEGIES, build
from continual_ft.train.distributed import CPU_ENV

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


def one_and_two(tmp: Path, extra: list[str] = ()) -> Path:
    """The same run in 1 process (batch 4) and under FSDP in 2 (batch 2 each), in ``tmp``."""
    scenario = write_toy_scenario(tmp / "data", test=7)
    for name, nproc, env in (("one", 1, {}), ("two", 2, fsdp_env())):
        (tmp / name).mkdir()
        _launch(nproc, tmp / name, [*_settings(scenario, 4 // nproc, name), *extra], tmp, env)
    return tmp


def assert_sharded_equals_one(runs: Path) -> dict:
    """Both ranks: R equal to one process's, whole LoRA weights identical, within 1e-5 of one process's;
    each rank held its shard only. Returns the 1-process weights."""
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
    return single


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return one_and_two(tmp_path_factory.mktemp("fsdp"))


def test_fsdp_shards_and_equals_one_process(runs):
    single = assert_sharded_equals_one(runs)
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


def _torchrun(nproc: int, *args: str) -> list[str]:
    """``torchrun --nproc_per_node <nproc> cli.py <args> --quiet``"""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    return [*launcher, "--master_port", str(free_port()), str(ROOT / "cli.py"), *args, "--quiet"]


def kill_when(cmd: list[str], cwd: Path, env: dict, ready) -> None:
    """Start the launcher, wait until ``ready()``, SIGKILL the launcher and every process it started."""
    with open(cwd / "killed.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None and not ready():
            time.sleep(0.005)
        assert proc.poll() is None, f"the run ended before it could be killed: {(cwd / 'killed.log').read_text()}"
    finally:
        # torchrun starts each process in a session of its own: kill them by their ids, as a crash would
        workers = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
        for pid in [proc.pid, *(w.pid for w in workers)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=30)
        psutil.wait_procs(workers, timeout=30)
    assert proc.returncode == -signal.SIGKILL and len(workers) >= 2  # both ranks were killed


def _stage_2_checkpointed(run_dir: Path) -> bool:
    """An in-stage checkpoint of stage 2 exists (read while the run may be replacing it)."""
    try:
        state = json.loads((run_dir / "resume" / "step" / "state.json").read_text())["tree"]
    except (OSError, KeyError, json.JSONDecodeError):
        return False
    return state.get("stage") == 1 and state["run"]["steps"] >= 2


def test_in_stage_checkpoint_under_fsdp_resumes_as_the_uninterrupted_run(runs):
    """``train.checkpoint_every=2`` under FSDP: every rank gathers its shards, rank 0 writes the whole
    tensors in the files one process writes. All processes SIGKILLed inside stage 2, the run resumed
    under FSDP ends bitwise as the uninterrupted FSDP run (the fixture's, which wrote no checkpoints:
    a checkpoint only reads the state)."""
    cwd = runs / "kill"
    cwd.mkdir()
    killed = cwd / "runs" / "killed"
    args = [*_settings(runs / "data" / "toy.yaml", 2, "killed"), "train.checkpoint_every=2"]
    env = {**os.environ, CPU_ENV: "1", **fsdp_env()}
    kill_when(_torchrun(2, "run", *args), cwd, env, lambda: _stage_2_checkpointed(killed))
    step = load_tree(killed / "resume" / "step")
    whole = load_file(runs / "one" / "rank0.safetensors")  # the LoRA weights, whole
    assert {n: t.shape for n, t in step["params"].items()} == {n: t.shape for n, t in whole.items()}
    moments = [s["exp_avg"].shape for s in step["optimizer"]["state"].values()]
    assert moments == [t.shape for t in step["params"].values()]  # Adam's state whole too, by parameter number
    assert json.loads((killed / "results.json").read_text())["rows"] == ["before training", "after colors"]

    env = {**os.environ, CPU_ENV: "1", **fsdp_env()}
    proc = subprocess.run(_torchrun(2, "resume", str(killed)), cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    a, b = (json.loads((d / "results.json").read_text()) for d in (runs / "runs" / "two", killed))
    assert b["complete"] and b["resumed"] and b["processes"] == 2
    assert b["stage_stats"][1]["resumed_at_step"] >= 2
    assert b["R"] == a["R"] and b["metrics"] == a["metrics"]
    assert _files(runs / "runs" / "two") == _files(killed)  # the adapters, bit for bit
    for row in ("row0.jsonl", "row1.jsonl", "row2.jsonl"):
        assert (killed / "predictions" / row).read_bytes() == (runs / "runs" / "two" / "predictions" / row).read_bytes()
    assert not (killed / "resume").exists()


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
        (["strategy=olora", "adapter=new"], "adapter=new under FSDP"),
        (["strategy=avalanche:naive"], "strategy=avalanche:naive under FSDP"),
        (["strategy=agem"], "strategy=agem under FSDP"),
        (["strategy=ssr"], "strategy=ssr under FSDP"),
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


def test_fsdp_allows_in_stage_checkpoints_and_qlora():
    """Both were refused under FSDP before: the checkpoint test above and tests/test_qlora.py run them."""
    settings = ["model=org/model", "strategy=replay", "train.checkpoint_every=2", "train.checkpoint_minutes=5"]
    config = make_config([*settings, "quantize=nf4"], tuple(STRATEGIES))
    check_fsdp(config, build(config.strategy, config.strategy_args), fsdp_version=2)
