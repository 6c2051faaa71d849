"""The example scripts run end to end on the tiny model and print an R matrix."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from loop_effects import LOOP_CASES, two_stages
from toy import write_toy_scenario

from continual_ft.train.protocol import Batches, stage_info

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    return write_toy_scenario(tmp_path_factory.mktemp("toy"), n=40, train=16, test=6)


@pytest.mark.parametrize("script", ["plain_loop.py", "hf_trainer.py"])
def test_example_runs_and_prints_R(script, scenario):
    # One thread: for a 2-layer hidden-64 model, thread hand-offs cost more than they save,
    # and much more on a busy machine.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        str(ROOT / "examples" / script),
        "--model",
        "tiny",
        "--scenario",
        str(scenario),
        "--batch-size",
        "4",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "R[accuracy] (%)" in out
    for row in ("before training", "after colors", "after animals"):
        assert re.search(rf"^{row}\s+\d+\.\d\s+\d+\.\d\s*$", out, re.M), out
    assert re.search(r"ACC=\d+\.\d", out)


@pytest.fixture
def plain_loop():
    """examples/plain_loop.py as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("plain_loop", ROOT / "examples" / "plain_loop.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plain_loop_calls_after_backward_every_step(scenario, plain_loop, monkeypatch):
    from continual_ft.strategies.agem import AGEM

    calls, original = [], AGEM.after_backward

    def spy(self, model, stage, step):
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)  # before zero_grad
        calls.append((stage.index, step, len(self.memory.buffer)))
        return original(self, model, stage, step)

    monkeypatch.setattr(AGEM, "after_backward", spy)
    R = plain_loop.main(["--model", "tiny", "--scenario", str(scenario), "--batch-size", "4", "--strategy", "agem"])
    assert len(R) == 3
    steps = {k: [s for i, s, _ in calls if i == k] for k in (0, 1)}
    assert steps[0] == steps[1] == [1, 2, 3, 4]  # 16 examples a stage, 4 a step
    assert {m for i, _, m in calls if i == 1} == {16}  # stage 2 consulted stage 1's examples


@pytest.mark.parametrize("name", list(LOOP_CASES))
def test_each_strategy_acts_in_the_plain_loop(name, plain_loop, monkeypatch):
    """Two stages through the plain loop's ``train_stage`` show each strategy's effect (tests/loop_effects.py):
    the batches the loop trained on (task_balanced's resampled shares, joint's earlier stage, replay's and
    SSR's examples in stage 2, naive's own), or a penalty with a gradient in stage 2 (EWC, LwF, and O-LoRA
    with a new adapter per stage, built by hand: the script itself trains one adapter)."""
    args = plain_loop.parse_args(["--batch-size", "4"])  # lr 1e-3: at 1e-2 the tiny model answers SSR blank
    trained, batches = [], plain_loop.length_grouped_batches

    def recording(items, batch_size, rng):
        for batch in batches(items, batch_size, rng):
            trained[-1] += batch
            yield batch

    monkeypatch.setattr(plain_loop, "length_grouped_batches", recording)

    def loop(model, encoder, k, examples, strategies, final):
        tasks = list(dict.fromkeys(e.task for e in examples))
        stage = stage_info(k, tasks, examples, Batches(encoder, args.batch_size), final=final)
        trained.append([])
        plain_loop.train_stage(model, stage, strategies, encoder, args)
        return trained[-1]

    LOOP_CASES[name].effect(two_stages(name, loop))
