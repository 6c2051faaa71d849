"""Resume: a run killed with SIGKILL inside a stage ends exactly as the uninterrupted run.

Modelled on Avalanche's checkpointing test (tests/checkpointing), which compares the metrics of an
interrupted-then-resumed run with an uninterrupted one; here also the adapter files, bit for bit.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from toy import write_toy_scenario

from continual_ft.cli import main

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, str(ROOT / "cli.py")]


def _settings(scenario: Path, adapter: str) -> list[str]:
    return [
        f"scenario={scenario}",
        "model=tiny",
        "strategy=replay+ewc+lwf",
        "replay.buffer_size=8",
        "ewc.fisher_batches=2",
        f"adapter={adapter}",
        "train.batch_size=4",
        "train.lr=1e-2",
        "train.epochs=3",  # stage 2: 18 steps, enough to be killed in the middle of
        "train.checkpoint_every=2",
        "output_dir=runs",
    ]


def _files(run_dir: Path) -> dict:
    """Adapter files: weights as bytes; configs as JSON, since PEFT writes target_modules from a set,
    whose order changes with every process's string-hash seed."""
    files = {}
    for p in sorted((run_dir / "adapters").rglob("*")):
        if p.suffix == ".json":
            config = json.loads(p.read_text())
            config["target_modules"] = sorted(config.get("target_modules") or [])
            files[str(p.relative_to(run_dir))] = config
        elif p.is_file():
            files[str(p.relative_to(run_dir))] = p.read_bytes()
    return files


def _kill_inside_stage_2(args: list[str], cwd: Path, run_dir: Path) -> None:
    """Start the run, wait for an in-stage checkpoint of stage 2, SIGKILL the process."""
    proc = subprocess.Popen([*CLI, "run", *args, "--quiet"], cwd=cwd, stderr=subprocess.PIPE, text=True)
    marker = run_dir / "resume" / "step" / "state.json"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if marker.is_file():
                try:
                    state = json.loads(marker.read_text())["tree"]
                except (OSError, KeyError, json.JSONDecodeError):
                    state = {}  # replaced between the check and the read
                if state.get("stage") == 1 and state.get("run", {}).get("steps", 0) >= 2:
                    break
            time.sleep(0.005)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("adapter", ["continue", "merge"])
def test_killed_in_stage_2_then_resumed_equals_uninterrupted(tmp_path, adapter):
    scenario = write_toy_scenario(tmp_path / "data", n=100, train=24)
    args = _settings(scenario, adapter)
    # The reference, uninterrupted, with the same seed.
    done = subprocess.run([*CLI, "run", *args, "name=whole", "--quiet"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    whole = tmp_path / "runs" / "whole"

    killed = tmp_path / "runs" / "killed"
    _kill_inside_stage_2([*args, "name=killed"], tmp_path, killed)
    partial = json.loads((killed / "results.json").read_text())
    assert partial["complete"] is False and partial["rows"] == ["before training", "after colors"]
    # every row results.json lists has its predictions on disk
    assert sorted(p.name for p in (killed / "predictions").iterdir()) == ["row0.jsonl", "row1.jsonl"]

    proc = subprocess.run([*CLI, "resume", str(killed), "--quiet"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    a, b = (json.loads((d / "results.json").read_text()) for d in (whole, killed))
    assert b["complete"] and b["resumed"] and b["R"] == a["R"] and b["metrics"] == a["metrics"]
    assert b["stage_stats"][1]["resumed_at_step"] >= 2 and b["stage_stats"][0]["resumed_at_step"] is None
    # the strategies' mean penalty counts the steps before the kill too (they are in the checkpoint)
    penalty = b["stage_stats"][1]["penalty"]
    assert penalty > 0 and penalty == pytest.approx(a["stage_stats"][1]["penalty"])
    assert [p["from"] for p in b["parts"]][0] == "start" and b["parts"][1]["from"].startswith("stage 2, step ")
    assert all(p["seconds"] > 0 for p in b["parts"]) and b["total_seconds"] == pytest.approx(
        sum(p["seconds"] for p in b["parts"])
    )
    assert _files(whole) == _files(killed)
    predictions = {p.name: p.read_bytes() for p in (whole / "predictions").iterdir()}
    assert sorted(predictions) == ["row0.jsonl", "row1.jsonl", "row2.jsonl"]
    assert predictions == {p.name: p.read_bytes() for p in (killed / "predictions").iterdir()}
    assert not (killed / "resume").exists()  # a finished run keeps no resume state
    # Strategy state: safetensors and JSON only, never a pickle.
    state_files = {p.name for p in (killed / "strategy_state").rglob("*") if p.is_file()}
    assert state_files == {"state.json", "tensors.safetensors"}


def test_resume_a_finished_run_says_so_and_trains_nothing(tmp_path, capsys):
    scenario = write_toy_scenario(tmp_path / "data")
    out = tmp_path / "runs"
    main(["run", f"scenario={scenario}", "model=tiny", "train.max_steps=2", f"output_dir={out}", "name=a", "--quiet"])
    before = (out / "a" / "results.json").read_text()
    capsys.readouterr()
    main(["resume", str(out / "a"), "--quiet"])
    assert "already complete" in capsys.readouterr().out
    assert (out / "a" / "results.json").read_text() == before


@pytest.mark.parametrize(
    "args, message",
    [
        (["resume", "."], "not a run directory"),
        (["resume", "no/such/dir"], "not a run directory"),
        (["resume", "RUN", "train.lr=1e-4"], "resume takes no settings"),
        (["resume", "RUN", "--set", "model=tiny"], "resume --set takes train.lr="),
    ],
)
def test_resume_bad_input_is_one_line(args, message, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "results.json").write_text(json.dumps({"R": {}, "tasks": [], "complete": False}))
    (run_dir / "config.yaml").write_text("model: tiny\n")
    os.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main([str(run_dir) if a == "RUN" else a for a in args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_nan_loss_stops_with_one_line_and_the_run_resumes_with_a_lower_lr(tmp_path, capsys):
    scenario = write_toy_scenario(tmp_path / "data")
    out = tmp_path / "runs"
    # No warmup and an absurd learning rate: step 1 is finite, its update overflows, step 2 is NaN.
    args = [f"scenario={scenario}", "model=tiny", "train.warmup_steps=0", "train.lr=1e30", "train.max_steps=4"]
    with pytest.raises(SystemExit) as e:
        main(["run", *args, f"output_dir={out}", "name=nan", "--quiet"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and re.search(r"stage 1 \(colors\), step \d+: the loss is (nan|inf)", err)
    assert "last finite loss" in err
    results = json.loads((out / "nan" / "results.json").read_text())
    assert results["rows"] == ["before training"] and results["complete"] is False
    main(["resume", str(out / "nan"), "--set", "train.lr=1e-3", "--quiet"])
    results = json.loads((out / "nan" / "results.json").read_text())
    assert results["complete"] and len(results["rows"]) == 3
    assert results["resume_changes"] == [{"part": 2, "set": ["train.lr=1e-3"]}]


def test_output_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "taken").write_text("not a folder")
    with pytest.raises(SystemExit) as e:
        main(["run", "model=tiny", f"output_dir={tmp_path / 'taken' / 'runs'}"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "is a file, not a directory" in err and "\n" not in err
