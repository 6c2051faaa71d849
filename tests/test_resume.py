"""Resume: a run killed with SIGKILL ends, once resumed, exactly as the uninterrupted run.

Modelled on Avalanche's checkpointing test (tests/checkpointing), which compares the metrics of an
interrupted-then-resumed run with an uninterrupted one; here also, bit for bit, the adapter files,
the strategies' state, the predictions and (``adapter=merge``) the merged model. Killed right after
an in-stage checkpoint (from outside), and at chosen points elsewhere (by the process itself,
``_kill_worker.py``): between two checkpoints, while scoring, in a stage's strategy pass.

Bit for bit is promised on the CPU (docs/resume.md), so every run here is pinned
to it (``CONTINUAL_FT_CPU=1``), also on a machine with a GPU.
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
from continual_ft.train.distributed import CPU_ENV

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, str(ROOT / "cli.py")]
KILLER = [sys.executable, str(Path(__file__).resolve().parent / "_kill_worker.py")]
ENV = {**os.environ, CPU_ENV: "1"}
EVERY = 2  # train.checkpoint_every


def _settings(scenario: Path, adapter: str) -> list[str]:
    # EWC anchors the one adapter that trains on (adapter=continue) and is refused in the other modes.
    strategy = "replay+ewc+lwf" if adapter == "continue" else "replay+lwf"
    return [
        f"scenario={scenario}",
        "model=tiny",
        f"strategy={strategy}",
        "replay.buffer_size=8",
        *(["ewc.fisher_batches=2"] if "ewc" in strategy else []),
        f"adapter={adapter}",
        "lora.dropout=0.1",  # every step draws from the RNG: a resume that did not restore its state would differ
        "train.batch_size=4",
        "train.lr=1e-2",
        "train.epochs=3",  # stage 2: 18 steps and more, enough to be killed in the middle of
        f"train.checkpoint_every={EVERY}",
        "output_dir=runs",
    ]


def _json_or_bytes(p: Path):
    """A file's content to compare: JSON parsed (PEFT writes an adapter's target_modules from a set, whose
    order changes with every process's string-hash seed; sorted here), anything else as bytes."""
    if p.suffix != ".json":
        return p.read_bytes()
    data = json.loads(p.read_text())
    if isinstance(data, dict) and "target_modules" in data:
        data["target_modules"] = sorted(data.get("target_modules") or [])
    return data


def _files(run_dir: Path, *folders: str) -> dict:
    """Every file under ``folders`` of ``run_dir``, by its path there."""
    return {
        str(p.relative_to(run_dir)): _json_or_bytes(p)
        for folder in folders
        for p in sorted((run_dir / folder).rglob("*"))
        if p.is_file()
    }


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=ENV)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The toy data, and ``whole(adapter)``: the uninterrupted run with those settings, run once per module."""
    root = tmp_path_factory.mktemp("resume")
    scenario = write_toy_scenario(root / "data", n=100, train=24)
    done = {}

    def whole(adapter: str) -> Path:
        if adapter not in done:
            proc = _run([*CLI, "run", *_settings(scenario, adapter), f"name=whole-{adapter}", "--quiet"], root)
            assert proc.returncode == 0, proc.stderr
            done[adapter] = root / "runs" / f"whole-{adapter}"
        return done[adapter]

    return root, scenario, whole


def _resume_and_compare(root: Path, whole: Path, killed: Path, adapter: str) -> tuple[dict, dict]:
    """Resume ``killed``; it must end as ``whole``: R, metrics, the strategies' mean penalty, and every file
    of the record. Returns both results.json."""
    proc = _run([*CLI, "resume", str(killed), "--quiet"], root)
    assert proc.returncode == 0, proc.stderr
    a, b = (json.loads((d / "results.json").read_text()) for d in (whole, killed))
    assert a["device"] == b["device"] == "cpu"  # pinned, where CUDA is available too
    assert b["complete"] and b["resumed"] and b["R"] == a["R"] and b["metrics"] == a["metrics"]
    # the strategies' mean penalty counts the steps before the kill too (they are in the checkpoint)
    penalty = b["stage_stats"][1]["penalty"]
    assert penalty > 0 and penalty == pytest.approx(a["stage_stats"][1]["penalty"])
    assert all(p["seconds"] > 0 for p in b["parts"]) and b["total_seconds"] == pytest.approx(
        sum(p["seconds"] for p in b["parts"])
    )
    folders = ["adapters", "predictions", "strategy_state"] + (["merged"] if adapter == "merge" else [])
    expected = _files(whole, *folders)
    assert all(any(p.startswith(f"{f}/") for p in expected) for f in folders)  # none of them is empty
    assert _files(killed, *folders) == expected
    assert not (killed / "resume").exists()  # a finished run keeps no resume state
    # Strategy state: safetensors and JSON only, never a pickle.
    state_files = {p.name for p in (killed / "strategy_state").rglob("*") if p.is_file()}
    assert state_files == {"state.json", "tensors.safetensors"}
    return a, b


def _kill_inside_stage_2(args: list[str], cwd: Path, run_dir: Path) -> None:
    """Start the run, wait for an in-stage checkpoint of stage 2, SIGKILL the process."""
    proc = subprocess.Popen([*CLI, "run", *args, "--quiet"], cwd=cwd, stderr=subprocess.PIPE, text=True, env=ENV)
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


@pytest.mark.parametrize("adapter", ["continue", "merge", "merge_final"])
def test_killed_in_stage_2_then_resumed_equals_uninterrupted(uninterrupted, adapter):
    root, scenario, whole = uninterrupted
    args = _settings(scenario, adapter)
    killed = root / "runs" / f"killed-{adapter}"
    _kill_inside_stage_2([*args, f"name=killed-{adapter}"], root, killed)
    partial = json.loads((killed / "results.json").read_text())
    assert partial["complete"] is False and partial["rows"] == ["before training", "after colors"]
    # every row results.json lists has its predictions on disk
    assert sorted(p.name for p in (killed / "predictions").iterdir()) == ["row0.jsonl", "row1.jsonl"]

    _, b = _resume_and_compare(root, whole(adapter), killed, adapter)
    assert b["stage_stats"][1]["resumed_at_step"] >= 2 and b["stage_stats"][0]["resumed_at_step"] is None
    assert [p["from"] for p in b["parts"]][0] == "start" and b["parts"][1]["from"].startswith("stage 2, step ")


def _last_checkpoint(steps: int) -> int:
    """The step of a stage's last in-stage checkpoint: every EVERY steps, none at its last step."""
    return EVERY * ((steps - 1) // EVERY)


#: where the process kills itself (``_kill_worker.py``) -> (adapter mode, the stages whose adapters are saved
#: then, the rows results.json holds, the stage resumed (1-based), the step it resumes at given the
#: uninterrupted run's steps in that stage)
KILLS = {
    # one step after the checkpoint at step 2, before that step's update
    "between checkpoints": ("step:2:3", "merge", ["stage1"], 2, 2, lambda steps: 2),
    # stage 2 trained, its adapter and strategy state saved, its row of R not: stage 2 is trained again
    "while scoring": ("eval:6", "merge", ["stage1", "stage2"], 2, 2, _last_checkpoint),
    # replay has filled its buffer (in memory), EWC is computing its Fisher
    "in the strategy pass": ("after_stage:1:2", "continue", [], 1, 1, _last_checkpoint),
}


@pytest.mark.parametrize("where", list(KILLS))
def test_killed_elsewhere_then_resumed_equals_uninterrupted(uninterrupted, where):
    point, adapter, saved, rows, stage, resumed_at = KILLS[where]
    root, scenario, whole = uninterrupted
    reference = whole(adapter)
    name = f"killed-{point.replace(':', '-')}"
    proc = _run([*KILLER, point, *_settings(scenario, adapter), f"name={name}", "--quiet"], root)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    killed = root / "runs" / name
    partial = json.loads((killed / "results.json").read_text())
    assert partial["complete"] is False and len(partial["rows"]) == rows
    adapters = killed / "adapters"
    there = sorted(p.name for p in adapters.iterdir() if p.is_dir()) if adapters.is_dir() else []
    assert there == saved

    a, b = _resume_and_compare(root, reference, killed, adapter)
    steps = a["stage_stats"][stage - 1]["steps"]
    assert [s["resumed_at_step"] for s in b["stage_stats"]] == [
        resumed_at(steps) if k == stage else None for k in range(1, 3)
    ]
    assert b["parts"][1]["from"] == f"stage {stage}, step {resumed_at(steps)}"


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
