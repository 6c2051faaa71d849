"""`tune`: search specs and objectives, a study of tiny runs in SQLite, continuing it, pruning, two
processes on one database training at the same time, a killed trial marked failed after the grace
period, and bad input as one line before any trial."""

import csv
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from toy import write_toy_scenario

from continual_ft.cli import main
from continual_ft.config import make_config
from continual_ft.errors import ContinualFTError
from continual_ft.eval import metrics
from continual_ft.run import runner
from continual_ft.strategies import STRATEGIES
from continual_ft.study import tune as tune_module
from continual_ft.study.search_space import Dimension, parse_dimension, parse_objective
from continual_ft.study.tune import tune

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "_tune_worker.py"
FAST = ["model=tiny", "precision=fp32", "train.max_steps=2", "train.batch_size=4"]
SEARCH = ["strategy=replay", "search.replay.ratio=0.1:0.6", "search.train.lr=log:1e-4:3e-3"]


def _trials(storage: str, study: str) -> list:
    return optuna.load_study(study_name=study, storage=storage).trials


# ---- search specs and objectives -------------------------------------------------------------


@pytest.mark.parametrize(
    "key, spec, current, want",
    [
        ("replay.ratio", "0.1:0.6", 0.25, Dimension("replay.ratio", "float", 0.1, 0.6)),
        ("lwf.alpha", "0:10", 1.0, Dimension("lwf.alpha", "float", 0.0, 10.0)),  # a float setting stays float
        ("lora.r", "4:16", 8, Dimension("lora.r", "int", 4, 16)),
        ("data.train_size", "100:300", None, Dimension("data.train_size", "int", 100, 300)),
        ("data.train_size", "100:300.0", None, Dimension("data.train_size", "float", 100.0, 300.0)),
        ("train.lr", "log:1e-4:3e-3", 1e-3, Dimension("train.lr", "float", 1e-4, 3e-3, log=True)),
        ("replay.buffer_size", "100:400:100", 200, Dimension("replay.buffer_size", "int", 100, 400, step=100)),
        (
            "replay.policy",
            "reservoir,task_balanced",
            "x",
            Dimension("replay.policy", "choice", choices=("reservoir", "task_balanced")),
        ),
        ("lora.r", "choice:4,16", 8, Dimension("lora.r", "choice", choices=("4", "16"))),
        (
            "lora.target_modules",
            "[q_proj,v_proj],[q_proj]",
            ["q_proj"],
            Dimension("lora.target_modules", "choice", choices=("[q_proj,v_proj]", "[q_proj]")),
        ),
    ],
)
def test_search_specs_parse(key, spec, current, want):
    assert parse_dimension(key, spec, current) == want


@pytest.mark.parametrize(
    "spec, current, message",
    [
        ("0.6:0.1", 0.25, "empty range"),
        ("0.5:0.5", 0.25, "empty range"),
        ("log:0:1e-3", 1e-3, "a log range must lie above 0"),
        ("log:-1e-4:1e-3", 1e-3, "a log range must lie above 0"),
        ("log:1e-4:1e-3:1e-4", 1e-3, "a log range takes no step"),
        ("4:16.5", 8, "integer setting"),
        ("0.1", 0.25, "not a search spec"),
        ("0.1:", 0.25, "not a search spec"),
        ("1:2:3:4", 0.25, "not a search spec"),
        ("0.1:abc", 0.25, "'abc' is not a number"),
        ("0:inf", 0.25, "finite"),
        ("0:1:2", 0.25, "step must be > 0"),
        ("a,,b", "a", "empty choice"),
        ("choice:a", "a", "one value is no search"),
        ("a,a", "a", "given twice"),
        ("0:1", "reservoir", "is not a number"),
    ],
)
def test_bad_search_specs_name_the_problem(spec, current, message):
    with pytest.raises(ContinualFTError, match=message) as e:
        parse_dimension("k.x", spec, current)
    assert str(e.value).startswith(f"search.k.x={spec}: ")


def test_sampled_values_respect_kind_bounds_and_scale():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    dims = [
        parse_dimension("train.lr", "log:1e-4:1e-1", 1e-3),
        parse_dimension("lora.r", "4:16:4", 8),
        parse_dimension("replay.policy", "reservoir,task_balanced", "reservoir"),
    ]
    draws = []
    for _ in range(60):
        trial = study.ask()
        draws.append([d.suggest(trial) for d in dims])
        study.tell(trial, 0.0)
    lrs = [float(lr) for lr, _, _ in draws]
    assert all(1e-4 <= v <= 1e-1 for v in lrs)
    assert sum(v < 1e-2 for v in lrs) > 30  # log-uniform: two of three decades below 1e-2, not 9%
    assert {r for _, r, _ in draws} == {"4", "8", "12", "16"}  # integer text on the step grid
    assert {p for _, _, p in draws} == {"reservoir", "task_balanced"}
    config = make_config([f"{d.key}={v}" for d, v in zip(dims, draws[0])] + ["strategy=replay"], tuple(STRATEGIES))
    assert config.train.lr == lrs[0] and config.lora.r == int(draws[0][1])  # the text reads back exactly


def test_objective_weights_values_and_errors():
    obj = parse_objective("acc+0.5*bwt")
    assert obj.weights == (("acc", 1.0), ("bwt", 0.5)) and str(obj) == "acc+0.5*bwt"
    assert obj.value({"acc": 0.6, "bwt": -0.1}) == pytest.approx(55.0)
    assert obj.value({"acc": 0.6, "bwt": None}) is None
    assert parse_objective("acc - forgetting").weights == (("acc", 1.0), ("forgetting", -1.0))
    assert parse_objective("-0.5*forgetting+2e-1*acc+acc").weights == (("forgetting", -0.5), ("acc", 1.2))
    for bad, message in [
        ("acc+", "expected a weighted sum"),
        ("acc*2", "expected a weighted sum"),
        ("acc bwt", "expected a weighted sum"),
        ("accuracy", "unknown metric 'accuracy'"),
        ("acc-acc", "weighs no metric"),
    ]:
        with pytest.raises(ContinualFTError, match=message):
            parse_objective(bad)


def test_running_objective_is_the_objective_of_the_stream_cut_after_each_stage():
    # three tasks, one per stage; R rows: zero-shot, after stage 1, 2, 3
    R = [[0.1, 0.2, 0.3], [0.8, 0.2, 0.3], [0.6, 0.9, 0.3], [0.5, 0.7, 0.9]]
    results = {"primary_metric": "accuracy", "R": {"accuracy": R}, "first_stage": [1, 2, 3]}
    obj = parse_objective("acc+0.5*bwt")
    assert obj.running(results, 1) == pytest.approx(100 * 0.8)  # task 1 only; BWT undefined counts 0
    assert obj.running(results, 2) == pytest.approx(100 * ((0.6 + 0.9) / 2 + 0.5 * (0.6 - 0.8)))
    final = metrics.summary(R, [1, 2, 3])
    assert obj.running(results, 3) == pytest.approx(obj.value(final))


# ---- studies of tiny runs ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tune")
    scenario = write_toy_scenario(tmp / "data")
    args = [f"scenario={scenario}", *FAST, f"output_dir={tmp / 'runs'}", *SEARCH, "study=s", "n_trials=2"]
    logged = []
    result = tune(args, progress=False, log=logged.append)
    return tmp, scenario, args, result, logged


def test_two_trials_land_in_the_database_each_a_run_directory(study):
    tmp, _, _, result, logged = study
    trials = _trials(f"sqlite:///{tmp / 'runs' / 'tune.db'}", "s")
    assert [t.number for t in trials] == [0, 1]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    for t in trials:
        run_dir = Path(t.user_attrs["run_dir"])
        assert run_dir == tmp / "runs" / f"s-trial{t.number}"
        results = json.loads((run_dir / "results.json").read_text())
        assert results["complete"] and t.value == pytest.approx(100 * results["metrics"]["accuracy"]["acc"])
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())  # the run used the sampled values
        assert saved["train"]["lr"] == t.params["train.lr"]
        assert saved["strategy_args"]["replay"]["ratio"] == t.params["replay.ratio"]
        assert 0.1 <= t.params["replay.ratio"] <= 0.6 and 1e-4 <= t.params["train.lr"] <= 3e-3
    assert logged[0].startswith("study s in sqlite:///") and "0 trials so far, 2 more" in logged[0]
    assert [line.split(":")[0] for line in logged[1:]] == ["trial 0", "trial 1"]


def test_report_has_the_best_command_the_trials_and_the_plots(study):
    tmp, _, _, result, _ = study
    out = tmp / "runs" / "s"
    assert result.out == out
    best = max(result.study.trials, key=lambda t: t.value)
    words = shlex.split(result.best_command)
    assert words[:3] == ["python", "cli.py", "run"]
    config = make_config(words[3:], tuple(STRATEGIES))
    assert (
        config.train.lr == best.params["train.lr"]
        and config.strategy_args["replay"]["ratio"] == best.params["replay.ratio"]
    )
    report = (out / "report.md").read_text()
    assert result.best_command in report and "search.replay.ratio=0.1:0.6" in report
    assert "| 0 " in report and "| 1 " in report and "complete" in report
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert [r["trial"] for r in rows] == ["0", "1"] and rows[0]["run_dir"].endswith("s-trial0")
    assert float(rows[1]["train.lr"]) == result.study.trials[1].params["train.lr"]
    for png in ("history.png", "importance.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG" and (out / png).stat().st_size > 5000


def test_running_again_continues_the_same_study(study):
    tmp, _, args, first, _ = study
    again = tune([*args[:-1], "n_trials=1"], progress=False, log=lambda _: None)
    assert again.study._study_id == first.study._study_id
    trials = _trials(f"sqlite:///{tmp / 'runs' / 'tune.db'}", "s")
    assert [t.number for t in trials] == [0, 1, 2] and (tmp / "runs" / "s-trial2" / "results.json").is_file()
    assert len(list(csv.DictReader((tmp / "runs" / "s" / "trials.csv").open()))) == 3


def test_a_study_refuses_another_objective(study):
    tmp, _, args, _, _ = study
    before = len(_trials(f"sqlite:///{tmp / 'runs' / 'tune.db'}", "s"))
    with pytest.raises(ContinualFTError, match="study s in .* was made with objective=acc"):
        tune([*args, "objective=bwt"], progress=False)
    assert len(_trials(f"sqlite:///{tmp / 'runs' / 'tune.db'}", "s")) == before  # nothing run


def test_on_stage_sees_each_stage_after_it_is_saved(study):
    tmp, scenario, _, _, _ = study
    seen = []

    def on_stage(i, record):
        on_disk = json.loads((record.run_dir / "results.json").read_text())
        seen.append((i, len(on_disk["stage_stats"]), on_disk["complete"], record.data["rows"][-1]))

    config = make_config([f"scenario={scenario}", *FAST, f"output_dir={tmp / 'hook'}"], tuple(STRATEGIES))
    results = runner.run(config, progress=False, on_stage=on_stage)
    assert seen == [(0, 1, False, "after colors"), (1, 2, False, "after animals")]
    assert results.data["complete"]


def test_pruned_trial_is_recorded_and_keeps_its_stages(study):
    tmp, scenario, _, _, _ = study
    out = tmp / "pruned"
    # The running objective is at most 100: a threshold above it prunes after the first stage.
    args = [f"scenario={scenario}", *FAST, f"output_dir={out}", *SEARCH, "n_trials=1", "pruner=threshold:101"]
    result = tune(args, progress=False, log=lambda _: None)
    (trial,) = _trials(f"sqlite:///{out / 'tune.db'}", "toy-replay")  # the default study name
    assert trial.state == optuna.trial.TrialState.PRUNED
    results = json.loads((Path(trial.user_attrs["run_dir"]) / "results.json").read_text())
    assert results["complete"] is False and len(results["stage_stats"]) == 1
    assert results["rows"] == ["before training", "after colors"]
    assert trial.intermediate_values == {1: pytest.approx(100 * results["R"]["accuracy"][1][0])}
    assert result.best_command is None and "| 0     | pruned |" in result.table


def test_a_failed_trial_does_not_stop_the_study(study, monkeypatch):
    tmp, scenario, _, _, _ = study
    out = tmp / "failed"
    real_run, calls = runner.run, []

    def first_diverges(config, **kwargs):
        calls.append(config.name)
        if len(calls) == 1:
            raise ContinualFTError("loss is nan at step 1")
        return real_run(config, **kwargs)

    monkeypatch.setattr(runner, "run", first_diverges)
    args = [f"scenario={scenario}", *FAST, f"output_dir={out}", *SEARCH, "n_trials=2", "study=f"]
    logged = []
    tune(args, progress=False, log=logged.append)
    failed, done = _trials(f"sqlite:///{out / 'tune.db'}", "f")
    assert failed.state == optuna.trial.TrialState.FAIL and failed.user_attrs["error"] == "loss is nan at step 1"
    assert done.state == optuna.trial.TrialState.COMPLETE
    assert calls == ["f-trial0", "f-trial1"] and "trial 0: failed (loss is nan at step 1)" in logged


def test_two_processes_share_one_sqlite_study_and_train_at_the_same_time(tmp_path):
    scenario = write_toy_scenario(tmp_path / "data")
    args = [f"scenario={scenario}", *FAST, "output_dir=runs", *SEARCH, "study=shared", "n_trials=1", "--quiet"]
    times = tmp_path / "times"
    times.mkdir()
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), "meet", *args],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "TUNE_TIMES": str(times)},
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    trials = _trials(f"sqlite:///{tmp_path / 'runs' / 'tune.db'}", "shared")
    assert sorted(t.number for t in trials) == [0, 1]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert {t.user_attrs["run_dir"] for t in trials} == {"runs/shared-trial0", "runs/shared-trial1"}
    assert sum("trial 0: acc = " in out for out, _ in outs) == 1  # each trial ran in one process only
    assert sum("trial 1: acc = " in out for out, _ in outs) == 1
    # Each process's run, from its start to its end: the two intervals intersect (the worker lets the
    # first wait for the second to begin, but trials that one process at a time could run never would).
    runs = [json.loads(p.read_text()) for p in sorted(times.glob("*.json"))]
    assert sorted(r["trial"] for r in runs) == ["shared-trial0", "shared-trial1"]
    assert max(r["start"] for r in runs) < min(r["end"] for r in runs), runs


def test_a_dead_trial_is_failed_two_minutes_after_its_last_heartbeat(tmp_path):
    storage = tune_module._storage(optuna, f"sqlite:///{tmp_path / 'tune.db'}")
    assert (storage.heartbeat_interval, storage.grace_period) == (60, 120)  # what docs/tuning.md says


def test_a_killed_trial_is_marked_failed_by_the_next_trial_after_the_grace_period(tmp_path, monkeypatch):
    """A trial whose process is SIGKILLed stays RUNNING in the database; the next trial to start marks it
    FAIL once its last heartbeat is older than the grace period (2 s here, two minutes by default), not before."""
    scenario = write_toy_scenario(tmp_path / "data")
    args = [f"scenario={scenario}", *FAST, "output_dir=runs", *SEARCH, "study=k", "n_trials=1"]
    storage, mark = f"sqlite:///{tmp_path / 'runs' / 'tune.db'}", tmp_path / "running"
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), "hang", *args, "--quiet"],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TUNE_MARK": str(mark)},
    )
    try:
        deadline = time.monotonic() + 240
        while not mark.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert mark.is_file() and proc.poll() is None, proc.stderr.read() if proc.poll() is not None else "too slow"
        time.sleep(1.5)  # a heartbeat a second: it has written one
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_at = time.monotonic()
    (dead,) = _trials(storage, "k")
    assert dead.state == optuna.trial.TrialState.RUNNING and mark.read_text() == "k-trial0"

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tune_module, "HEARTBEAT_S", 1)
    monkeypatch.setattr(tune_module, "GRACE_S", 60)  # within the grace period: its process may be alive
    tune(args, progress=False, log=lambda _: None)
    assert [t.state.name for t in _trials(storage, "k")] == ["RUNNING", "COMPLETE"]

    monkeypatch.setattr(tune_module, "GRACE_S", 2)
    time.sleep(max(0.0, killed_at + 4 - time.monotonic()))  # SQLite's clock counts whole seconds
    tune(args, progress=False, log=lambda _: None)
    assert [t.state.name for t in _trials(storage, "k")] == ["FAIL", "COMPLETE", "COMPLETE"]


# ---- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "tune needs at least one search.<key>=<spec>"),
        (["search.replay.ratios=0.1:0.5"], "search.replay.ratios: unknown setting; replay has replay.buffer_size"),
        (["search.train.lrr=0.1:0.5"], "search.train.lrr: unknown config key; valid keys:"),
        (["search.ewc.lam=1:100"], "search.ewc.lam: ewc is not in strategy=replay"),
        (["search.replay.ratio=0.6:0.1"], "search.replay.ratio=0.6:0.1: empty range"),
        (["search.train.lr=log:0:1e-3"], "search.train.lr=log:0:1e-3: a log range must lie above 0"),
        (["search.replay.ratio=0:0.5"], "search.replay.ratio=0:0.5: replay.ratio must be in (0, 1), got 0.0"),
        (["search.replay.policy=reservoir,fifo"], "replay.policy must be one of reservoir, task_balanced, got 'fifo'"),
        (["search.train.lr=fast"], "search.train.lr=fast: not a search spec"),
        (["search.strategy=naive,replay"], "a study keeps strategy fixed"),
        (["search.train.lr=log:1e-4:1e-3", "train.lr=1e-3"], "train.lr is given both as a fixed value"),
        (["search.train.lr=log:1e-4:1e-3", "objective=acc+bwtt"], "unknown metric 'bwtt'"),
        (["search.train.lr=log:1e-4:1e-3", "n_trials=many"], "n_trials must be a whole number >= 1"),
        (["search.train.lr=log:1e-4:1e-3", "pruner=hyperband"], "pruner=hyperband: choose median"),
        (["search.train.lr=log:1e-4:1e-3", "name=x"], "drop name="),
        (["search.train.lr=log:1e-4:1e-3", "storage=nowhere"], "storage=nowhere: not a database URL"),
    ],
)
def test_bad_input_is_one_line_before_any_trial(extra, message, tmp_path, monkeypatch, capsys):
    scenario = write_toy_scenario(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["tune", f"scenario={scenario}", "model=tiny", "strategy=replay", *extra])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no database, no run
