"""Tracking: ``log.jsonl`` in every run, and ``log=[tensorboard,wandb,mlflow]`` read back from what each writes.

One tiny two-stage run (replay + EWC, so a buffer and a penalty exist) logs to every tracker whose
package is installed; each test reads its tracker's files back with that tracker's own reader and
checks them against ``results.json`` and ``log.jsonl``.
"""

from __future__ import annotations

import glob
import importlib.util
import itertools
import json
import math
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from toy import write_toy_scenario

from continual_ft.cli import main
from continual_ft.config import make_config
from continual_ft.errors import ContinualFTError
from continual_ft.report.tracking import TRACKERS, MLflowTracker, check_trackers
from continual_ft.run.runner import _open_tracking, resume, run
from continual_ft.strategies import STRATEGIES

STEPS = 3  # per stage; two stages


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None  # each tracker's package has the tracker's name


def _settings(scenario: Path, out: Path, log: list[str]) -> list[str]:
    return [
        f"scenario={scenario}",
        "model=tiny",
        "strategy=replay+ewc",
        "replay.buffer_size=8",
        "ewc.fisher_batches=2",
        "ewc.lam=100",
        "train.batch_size=4",
        "train.lr=1e-2",
        f"train.max_steps={STEPS}",
        f"output_dir={out}",
        "name=tracked",
        f"log=[{','.join(log)}]",
    ]


@pytest.fixture(autouse=True, scope="module")
def _local_trackers(tmp_path_factory):
    """W&B offline with its own folders, MLflow to its default local store: nothing leaves the test."""
    home = tmp_path_factory.mktemp("tracker-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
            mp.setenv(var, str(home / var.lower()))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
        yield


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """A finished tiny run logged to every installed tracker: (run_dir, results.json, log.jsonl entries)."""
    tmp = tmp_path_factory.mktemp("tracked")
    scenario = write_toy_scenario(tmp / "data")
    log = [name for name in TRACKERS if _installed(name)]
    results = run(make_config(_settings(scenario, tmp / "runs", log), tuple(STRATEGIES)), progress=False)
    entries = [json.loads(line) for line in (results.run_dir / "log.jsonl").read_text().splitlines()]
    return results.run_dir, results.data, entries


def _of(entries: list[dict], kind: str) -> list[dict]:
    return [e for e in entries if e["kind"] == kind]


def test_jsonl_logs_every_step_and_stage(tracked):
    run_dir, data, entries = tracked
    assert entries[0]["kind"] == "config" and entries[0]["config"]["strategy"] == "replay+ewc"
    assert entries[-1] == {"kind": "end", "status": "finished"}

    steps = _of(entries, "step")
    assert [e["step"] for e in steps] == list(range(1, 2 * STEPS + 1))  # counted on across stages
    assert [e["train/stage"] for e in steps] == [1] * STEPS + [2] * STEPS
    for e in steps:
        assert math.isfinite(e["train/loss"]) and e["train/loss"] > 0 and e["train/tokens_per_s"] > 0
    assert steps[0]["train/lr"] == 0.0 and steps[1]["train/lr"] > 0  # warmup starts at 0
    # EWC's penalty exists in stage 2 only (no anchor before), and the stage's mean is the steps' mean.
    assert all("train/penalty" not in e for e in steps[:STEPS])
    stage2 = [e["train/penalty"] for e in steps[STEPS:]]
    assert stage2[-1] > 0
    assert data["stage_stats"][1]["penalty"] == pytest.approx(sum(stage2) / STEPS)
    assert data["stage_stats"][0]["penalty"] is None

    stages = _of(entries, "stage")
    assert [e["stage"] for e in stages] == [0, 1, 2]
    for i, e in enumerate(stages):
        assert [e[f"R/accuracy/{t}"] for t in data["tasks"]] == data["R"]["accuracy"][i]
    assert "stage/train_loss" not in stages[0]
    for i in (1, 2):
        assert stages[i]["stage/train_loss"] == pytest.approx(data["stage_stats"][i - 1]["train_loss"])
        assert stages[i]["strategy/replay/buffer_size"] == 8
    final = data["metrics"]["accuracy"]
    for k in ("acc", "bwt", "forgetting"):
        assert stages[2][f"metrics/accuracy/{k}"] == pytest.approx(final[k])
    assert "metrics/accuracy/bwt" not in stages[1]  # one task trained: nothing to forget yet
    assert stages[1]["metrics/accuracy/acc"] == pytest.approx(data["R"]["accuracy"][1][0])  # over task 1 only

    (images,) = _of(entries, "images")
    assert images["images"]["forgetting_matrix"] == "forgetting_matrix.png"
    assert {e["path"] for e in _of(entries, "file")} == {"results.json", "results.csv", "config.yaml"}


def test_tensorboard_event_files_read_back(tracked):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, data, entries = tracked
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [s.step for s in loss] == list(range(1, 2 * STEPS + 1))
    assert [s.value for s in loss] == pytest.approx([e["train/loss"] for e in _of(entries, "step")], rel=1e-6)
    for t, task in enumerate(data["tasks"]):
        acc = events.Scalars(f"R/accuracy/{task}")
        assert [(s.step, s.value) for s in acc] == [
            (i, pytest.approx(row[t])) for i, row in enumerate(data["R"]["accuracy"])
        ]
    (bwt,) = events.Scalars("metrics/accuracy/bwt")
    assert bwt.step == 2 and bwt.value == pytest.approx(data["metrics"]["accuracy"]["bwt"])
    assert [s.step for s in events.Scalars("strategy/replay/buffer_size")] == [1, 2]
    (heatmap,) = events.Images("images/forgetting_matrix")
    assert heatmap.width > 100 and heatmap.height > 100
    assert "config/text_summary" in events.Tags()["tensors"]


def _wandb_records(path: Path):
    """The records of a ``.wandb`` file: W&B's LevelDB-style log (a 7-byte header, then 32 KiB blocks of
    records, each ``crc32 (4) | length (2) | type (1) | data``, a record split across blocks as first/middle/last)."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, pending = path.read_bytes(), 32768, 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # full, or the last piece
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def test_wandb_offline_run_in_run_folder(tracked):
    pytest.importorskip("wandb")
    run_dir, data, entries = tracked
    run_id = (run_dir / "wandb" / "run_id").read_text().strip()
    (folder,) = [Path(p) for p in glob.glob(str(run_dir / "wandb" / f"offline-run-*-{run_id}"))]
    history = [
        {(item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in r.history.item}
        for r in _wandb_records(folder / f"run-{run_id}.wandb")
        if r.WhichOneof("record_type") == "history"
    ]
    steps = [h for h in history if "train/step" in h]
    assert [h["train/step"] for h in steps] == list(range(1, 2 * STEPS + 1))
    assert [h["train/loss"] for h in steps] == pytest.approx([e["train/loss"] for e in _of(entries, "step")])
    stages = {h["stage"]: h for h in history if "stage" in h}
    assert sorted(stages) == [0, 1, 2]
    assert stages[2]["metrics/accuracy/acc"] == pytest.approx(data["metrics"]["accuracy"]["acc"])
    assert stages[2]["strategy/replay/buffer_size"] == 8
    assert any(k.startswith("images/forgetting_matrix") for h in history for k in h)
    results = folder / "files" / "results.json"
    assert not results.is_symlink() and json.loads(results.read_text())["complete"]


def test_mlflow_run_in_local_store(tracked):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    run_dir, data, entries = tracked
    where = json.loads((run_dir / "mlflow_run.json").read_text())
    assert where["tracking_uri"] == f"sqlite:///{run_dir.resolve() / 'mlruns' / 'mlflow.db'}"
    client = MlflowClient(where["tracking_uri"])
    mlrun = client.get_run(where["run_id"])
    assert mlrun.info.status == "FINISHED" and mlrun.info.run_name == "tracked"
    assert mlrun.data.params["strategy"] == "replay+ewc" and float(mlrun.data.params["train.lr"]) == 1e-2
    loss = client.get_metric_history(where["run_id"], "train/loss")
    assert sorted(m.step for m in loss) == list(range(1, 2 * STEPS + 1))
    acc = sorted((m.step, m.value) for m in client.get_metric_history(where["run_id"], "R/accuracy/colors"))
    assert acc == [(i, pytest.approx(row[0])) for i, row in enumerate(data["R"]["accuracy"])]
    artifacts = {a.path for a in client.list_artifacts(where["run_id"])}
    assert {"results.json", "config.yaml", "images"} <= artifacts
    assert "images/forgetting_matrix.png" in {a.path for a in client.list_artifacts(where["run_id"], "images")}
    assert any((run_dir / "mlruns" / "artifacts").rglob("forgetting_matrix.png"))


def test_mlflow_goes_to_the_users_tracking_uri(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'shared.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    tracker = MLflowTracker(run_dir, "mine")
    tracker.log_step(1, {"train/loss": 2.5})
    tracker.close(failed=True)
    assert not (run_dir / "mlruns").exists()
    mlrun = MlflowClient(uri).get_run(json.loads((run_dir / "mlflow_run.json").read_text())["run_id"])
    assert mlrun.info.status == "FAILED" and mlrun.data.metrics == {"train/loss": 2.5}


class _Stop(Exception):
    pass


def _stop_after_first_stage(i, record):
    if i == 0:
        raise _Stop


def test_resumed_run_goes_on_in_the_same_tracker_runs(tmp_path):
    scenario = write_toy_scenario(tmp_path / "data")
    log = [name for name in ("wandb", "mlflow") if _installed(name)]
    config = make_config(_settings(scenario, tmp_path / "runs", log), tuple(STRATEGIES))
    with pytest.raises(_Stop):
        run(config, progress=False, on_stage=_stop_after_first_stage)
    run_dir = tmp_path / "runs" / "tracked"
    first_ids = {
        p.name: p.read_text() for p in (run_dir / "wandb" / "run_id", run_dir / "mlflow_run.json") if p.exists()
    }
    resume(run_dir, progress=False)

    entries = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [e["kind"] for e in entries if e["kind"] in ("config", "end")] == ["config", "end", "config", "end"]
    assert [e["status"] for e in _of(entries, "end")] == ["failed", "finished"]
    assert [e["step"] for e in _of(entries, "step")] == list(range(1, 2 * STEPS + 1))
    assert [e["stage"] for e in _of(entries, "stage")] == [0, 1, 2]
    assert {
        p.name: p.read_text() for p in (run_dir / "wandb" / "run_id", run_dir / "mlflow_run.json") if p.exists()
    } == first_ids
    if "mlflow" in log:
        from mlflow.tracking import MlflowClient

        where = json.loads((run_dir / "mlflow_run.json").read_text())
        client = MlflowClient(where["tracking_uri"])
        assert client.get_run(where["run_id"]).info.status == "FINISHED"
        assert sorted(m.step for m in client.get_metric_history(where["run_id"], "train/loss")) == list(
            range(1, 2 * STEPS + 1)
        )
        assert len(client.search_runs([client.get_run(where["run_id"]).info.experiment_id])) == 1


def test_only_the_first_process_logs(tmp_path):
    other = SimpleNamespace(dist=SimpleNamespace(is_main=False), config=make_config(["log=[tensorboard]"]))
    trackers = _open_tracking(other)
    assert trackers.trackers == []
    trackers.log_step(1, {"train/loss": 1.0})  # a no-op there, not an error
    assert list(tmp_path.iterdir()) == []


def test_log_key_forms():
    assert make_config(["log=tensorboard"]).log == ["tensorboard"]
    assert make_config(["log=[tensorboard,wandb]"]).log == ["tensorboard", "wandb"]
    assert make_config(["log=mlflow,mlflow"]).log == ["mlflow"]
    assert make_config({"log": "wandb"}).log == ["wandb"]
    assert make_config([]).log == []
    with pytest.raises(ContinualFTError, match="unknown tracker log=neptune; choose from tensorboard, wandb, mlflow"):
        make_config(["log=[tensorboard,neptune]"])


def _cli(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code, capsys.readouterr().err


def test_cli_unknown_tracker_is_one_line(tmp_path, capsys):
    code, err = _cli(["run", "model=tiny", "log=[tensorboard,neptune]", f"output_dir={tmp_path / 'runs'}"], capsys)
    assert code == 2
    assert err == "error: unknown tracker log=neptune; choose from tensorboard, wandb, mlflow\n"
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name", list(TRACKERS))
def test_cli_missing_tracker_package_is_one_line(name, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, TRACKERS[name].module, None)  # import fails as if not installed
    scenario = write_toy_scenario(tmp_path / "data")
    out = tmp_path / "runs"
    code, err = _cli(
        ["run", f"scenario={scenario}", "model=tiny", f"log={name}", f"output_dir={out}", "--quiet"], capsys
    )
    assert code == 2
    assert err == f'error: log={name} needs the {name} package: pip install "continual-ft[{name}]"\n'
    assert not out.exists()  # checked before the run directory is made


def test_each_tracker_has_the_extra_its_error_names():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    extras = pyproject["project"]["optional-dependencies"]
    for name in TRACKERS:
        assert [req.split(">")[0] for req in extras[name]] == [name]
    assert sorted(req.split(">")[0] for req in extras["trackers"]) == sorted(TRACKERS)


def test_check_trackers_passes_what_is_installed():
    check_trackers([name for name in TRACKERS if _installed(name)])
    with pytest.raises(ContinualFTError, match="unknown tracker log=jsonl"):
        check_trackers(["jsonl"])


def test_cli_list_shows_the_registry(capsys):
    main(["list"])
    out = capsys.readouterr().out
    lines = out.split("trackers (log=[...]", 1)[1].splitlines()[1:]
    section = [line.split()[0] for line in itertools.takewhile(lambda line: line.startswith("  "), lines)]
    assert section == list(TRACKERS)


def test_the_tensorboard_example_draws_a_run(tracked, tmp_path):
    """``examples/tensorboard_scalars.py`` (docs/tracking.md's picture of ``log=``) reads a run's event files back."""
    pytest.importorskip("tensorboard")
    run_dir, _, _ = tracked
    script = Path(__file__).resolve().parents[1] / "examples" / "tensorboard_scalars.py"
    out = tmp_path / "tracking.png"
    proc = subprocess.run([sys.executable, str(script), str(run_dir), str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.stat().st_size > 10_000
    empty = tmp_path / "empty"
    (empty / "tensorboard").mkdir(parents=True)
    proc = subprocess.run([sys.executable, str(script), str(empty), str(out)], capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.strip().startswith("error: no train/loss")
