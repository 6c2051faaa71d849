"""`compare`: a grid of tiny runs, reuse of finished runs, the report files, and bad input."""

from pathlib import Path

import pytest
import yaml
from toy import write_toy_scenario

from continual_ft import runner
from continual_ft.cli import main
from continual_ft.compare import Entry, compare, find_finished, format_stage_table, grid_configs, split_values
from continual_ft.config import make_config
from continual_ft.errors import ContinualFTError
from continual_ft.strategies import STRATEGIES

FAST = ["model=tiny", "precision=fp32", "train.max_steps=2", "train.batch_size=4"]


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    scenario = write_toy_scenario(tmp / "data")
    args = [f"scenario={scenario}", *FAST, f"output_dir={tmp / 'runs'}", "strategy=naive,replay", "adapter=stack,merge"]
    logged = []
    result = compare(args, progress=False, log=logged.append)
    return tmp, args, result, logged


def test_grid_runs_every_point_and_writes_the_report(grid):
    tmp, _, result, logged = grid
    names = [e.name for e in result.entries]
    assert names == ["toy-naive-stack", "toy-naive-merge", "toy-replay-stack", "toy-replay-merge"]
    assert all(e.source == "trained" for e in result.entries) and len(logged) == 4
    assert result.out == tmp / "runs" / "compare"
    report = (result.out / "report.md").read_text()
    assert "strategy=naive,replay adapter=stack,merge" in report  # the command that made it
    for name in names:
        assert f"| {name} " in report
    assert "| run " in report and "ACC (%)" in report and "eval latency (ms/example)" in report
    for png in ("heatmaps.png", "acc_bwt.png"):
        assert (result.out / png).stat().st_size > 1000


def _entry(name, strategy, stages):
    stats = [{"tokens": t, "train_seconds": s, "strategy_seconds": h} for t, s, h in stages]
    return Entry(name, Path(name), {"strategy": strategy, "stage_stats": stats}, "given")


def test_stage_table_divides_each_stage_by_the_naive_runs_same_stage():
    entries = [
        _entry("ewc", "ewc", [(2000, 8.0, 2.0), (1000, 4.0, 0.0)]),  # 5.00 and 4.00 s / 1k tokens
        _entry("naive", "naive", [(2000, 8.0, 0.0), (1000, 5.0, 0.0)]),  # 4.00 and 5.00: the baseline
        _entry("replay", "replay", [(2000, 8.0, 0.0)]),  # one stage only
    ]
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
        for line in format_stage_table(entries).splitlines()
    }
    assert rows["run"][:4] == ["stage 1 s / 1k tok", "stage 2 s / 1k tok", "stage 1 vs naive", "stage 2 vs naive"]
    assert rows["ewc"] == ["5.00", "4.00", "1.25x", "0.80x", "2, 0"]
    assert rows["naive"] == ["4.00", "5.00", "1.00x", "1.00x", "0, 0"]
    assert rows["replay"] == ["4.00", "—", "1.00x", "—", "0"]


def test_second_compare_reuses_finished_runs(grid, monkeypatch):
    tmp, args, first, _ = grid
    before = sorted(p.name for p in (tmp / "runs").iterdir())

    def no_training(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(runner, "run", no_training)
    logged = []
    again = compare(args, out=tmp / "again", progress=False, log=logged.append)
    assert [e.source for e in again.entries] == ["reused"] * 4
    assert logged == [f"reused {e.run_dir}" for e in first.entries]
    assert sorted(p.name for p in (tmp / "runs").iterdir()) == before


def test_changed_setting_is_not_reused(grid, monkeypatch):
    tmp, args, _, _ = grid
    calls = []

    class Trained(Exception):
        pass

    def record(config, progress):
        calls.append(config)
        raise Trained

    monkeypatch.setattr(runner, "run", record)
    with pytest.raises(Trained):
        compare([*args[:-2], "strategy=naive", "adapter=stack", "seed=1"], progress=False, log=lambda _: None)
    assert len(calls) == 1 and calls[0].seed == 1


def test_run_made_under_another_strategy_default_is_not_reused(grid):
    tmp, args, first, _ = grid
    replay_run = next(e.run_dir for e in first.entries if e.name == "toy-replay-stack")
    config = make_config([*args[:-2], "strategy=replay", "adapter=stack"], tuple(STRATEGIES))
    config.name = "toy-replay-stack"
    assert find_finished(config) == replay_run
    saved = yaml.safe_load((replay_run / "config.yaml").read_text())
    assert saved["strategy_settings"]["replay"]["buffer_size"] == 200  # the default, written out
    saved["strategy_settings"]["replay"]["buffer_size"] = 100  # as if made when the default was 100
    (replay_run / "config.yaml").write_text(yaml.safe_dump(saved))
    try:
        assert find_finished(config) is None
    finally:
        saved["strategy_settings"]["replay"]["buffer_size"] = 200
        (replay_run / "config.yaml").write_text(yaml.safe_dump(saved))


def test_compare_run_directories_through_the_cli(grid, capsys):
    tmp, _, result, _ = grid
    a, b = result.entries[0].run_dir, result.entries[3].run_dir
    main(["compare", str(a), str(b), "--out", str(tmp / "ab")])
    out = capsys.readouterr().out
    assert "toy-naive-stack" in out and "toy-replay-merge" in out
    report = (tmp / "ab" / "report.md").read_text()
    assert "| toy-naive-stack " in report and "| toy-replay-merge " in report and "0 (merged)" in report
    assert (tmp / "ab" / "heatmaps.png").exists() and (tmp / "ab" / "acc_bwt.png").exists()


def test_grid_names_are_distinct_and_lists_stay_whole():
    assert split_values("naive,replay") == ["naive", "replay"]
    assert split_values("[q_proj,v_proj]") == ["[q_proj,v_proj]"]
    configs = grid_configs(
        ["model=tiny", "train.lr=1e-3,2e-3", "lora.target_modules=[q_proj,v_proj]", "adapter=stack,merge_final"],
        tuple(STRATEGIES),
    )
    names = [c.name for c, _ in configs]
    assert len(set(names)) == 4 and "legal_then_medical-naive-merge_final-cat-lr2e-3" in names
    assert all(c.lora.target_modules == ["q_proj", "v_proj"] for c, _ in configs)
    with pytest.raises(ContinualFTError, match="unknown strategy 'nope'"):
        grid_configs(["strategy=naive,nope"], tuple(STRATEGIES))


@pytest.mark.parametrize(
    "args, message",
    [
        (["compare", "model=tiny", "foo=1,2"], "unknown config key 'foo'"),
        (["compare", "model=tiny", "method=cat,average"], "merge.method must be one of"),
        (["compare", "."], "no results.json"),
        (["compare", "no-such-dir"], "neither key=value nor a run directory"),
        (["compare"], "compare needs key=value settings"),
    ],
)
def test_compare_bad_input_is_one_line_and_exit_2(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert list(tmp_path.iterdir()) == []
