"""`compare`: a grid of tiny runs, reuse of finished runs, the report files, and bad input."""

import shutil
from pathlib import Path

import pytest
import yaml
from toy import write_toy_scenario

from continual_ft.cli import main
from continual_ft.config import make_config
from continual_ft.errors import ContinualFTError
from continual_ft.eval import predictions
from continual_ft.run import runner
from continual_ft.strategies import STRATEGIES
from continual_ft.study.compare import Entry, compare, find_finished, format_stage_table, grid_configs, split_values
from continual_ft.study.intervals import t_interval, t_quantile

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


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("seeds")
    scenario = write_toy_scenario(tmp / "data")
    args = [f"scenario={scenario}", *FAST, f"output_dir={tmp / 'runs'}", "strategy=naive,joint", "seed=0,1"]
    return tmp, args, compare(args, progress=False, log=lambda _: None)


def _table_rows(text: str, first_header: str) -> dict[str, list[str]]:
    """The markdown table whose first header cell is ``first_header``: {first cell: other cells}."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} "))
    rows = {}
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        if not cells[0].startswith("---"):  # the rule under the header
            rows[cells[0]] = cells[1:]
    return rows


def test_seed_grid_groups_runs_and_reports_mean_std_and_interval(seeded):
    tmp, _, result = seeded
    assert [e.name for e in result.entries] == [
        "toy-naive-continue-seed0",
        "toy-naive-continue-seed1",
        "toy-joint-continue-seed0",
        "toy-joint-continue-seed1",
    ]
    assert [(g.name, g.seeds) for g in result.groups] == [
        ("toy-naive-continue", [0, 1]),
        ("toy-joint-continue", [0, 1]),
    ]
    rows = _table_rows((result.out / "report.md").read_text(), "configuration")
    naive = result.groups[0]
    accs = [e.results["metrics"]["accuracy"]["acc"] for e in naive.runs]
    mean, std = sum(accs) / 2, abs(accs[0] - accs[1]) / 2**0.5
    interval = naive.estimates["accuracy"]["acc"][2]
    assert rows["toy-naive-continue"][:2] == [
        "0, 1",
        f"{100 * mean:.1f} ± {100 * std:.1f} [{100 * interval.low:.1f}, {100 * interval.high:.1f}]",
    ]
    assert interval.low <= mean <= interval.high
    half = t_quantile(0.975, 1) * std / 2**0.5  # the Student t interval over the two seeds
    assert (interval.low, interval.high) == pytest.approx((mean - half, mean + half))
    assert all(" ± " in c and "[" in c for c in rows["toy-joint-continue"][1:])
    joint = result.groups[1]
    gaps = [
        j.results["metrics"]["accuracy"]["acc"] - n.results["metrics"]["accuracy"]["acc"]
        for j, n in zip(joint.runs, naive.runs)
    ]
    paired = joint.versus["naive"][1]["acc"]  # paired by seed: the t interval over the per-seed differences
    expected = t_interval(gaps)
    assert (paired.value, paired.low, paired.high) == pytest.approx((expected.value, expected.low, expected.high))
    diffs = _table_rows(result.table.split("\n\n")[1], "configuration")
    assert diffs["configuration"] == ["ACC − naive", "BWT − naive", "ACC − joint", "BWT − joint"]
    assert diffs["toy-naive-continue"][:2] == ["—", "—"] and diffs["toy-joint-continue"][2:] == ["—", "—"]
    assert diffs["toy-naive-continue"][2].count("[") == 1
    assert (result.out / "acc_bwt.png").stat().st_size > 1000


def test_seed_intervals_are_reproducible_and_printed_by_the_cli(seeded, capsys):
    tmp, args, result = seeded
    main(["compare", *args, "--out", str(tmp / "again"), "--quiet"])
    out = capsys.readouterr().out
    assert out.count("reused ") == 4
    assert _table_rows(out, "configuration") == _table_rows(result.table, "configuration")
    # the runs of one configuration given as directories are grouped the same way
    a, b = (e.run_dir for e in result.entries[:2])
    main(["compare", str(a), str(b), "--out", str(tmp / "dirs")])
    rows = _table_rows(capsys.readouterr().out, "configuration")
    assert list(rows)[1:] == ["toy-naive-continue"] and rows["toy-naive-continue"][0] == "0, 1"


def test_seed_intervals_need_no_predictions_and_one_seed_does(seeded, tmp_path):
    _, _, result = seeded
    dirs = []
    for e in result.entries[:2]:  # naive, seeds 0 and 1, without their stored predictions
        shutil.copytree(e.run_dir, tmp_path / e.run_dir.name)
        shutil.rmtree(tmp_path / e.run_dir.name / "predictions")
        dirs.append(str(tmp_path / e.run_dir.name))
    both = compare(dirs, out=tmp_path / "both", progress=False, log=lambda _: None)
    assert both.groups[0].estimates["accuracy"]["acc"][2] == result.groups[0].estimates["accuracy"]["acc"][2]
    alone = compare(dirs[:1], out=tmp_path / "alone", progress=False, log=lambda _: None)
    assert alone.groups[0].estimates["accuracy"]["acc"][2].low is None  # over test examples: needs them
    assert "[" not in _table_rows(alone.table, "configuration")[alone.groups[0].name][1]


def test_single_seed_configurations_have_an_interval_over_examples_and_no_std(grid):
    _, _, result, _ = grid
    assert [len(g.runs) for g in result.groups] == [1, 1, 1, 1]
    rows = _table_rows((result.out / "report.md").read_text(), "configuration")
    for g in result.groups:
        acc = rows[g.name][1]
        assert "±" not in acc and acc.count("[") == 1
    assert "With one seed the interval covers test-example sampling only" in (result.out / "report.md").read_text()


def test_predictions_stored_for_every_row_agree_with_R(grid):
    _, _, result, _ = grid
    for e in result.entries:
        d, run_dir = e.results, e.run_dir
        files = sorted(p.name for p in (run_dir / "predictions").iterdir())
        assert files == [f"row{i}.jsonl" for i in range(len(d["rows"]))] == ["row0.jsonl", "row1.jsonl", "row2.jsonl"]
        for i in range(len(d["rows"])):
            lines = (run_dir / "predictions" / f"row{i}.jsonl").read_text().splitlines()
            assert len(lines) == 16  # 8 test examples per task, 2 tasks
            row = predictions.load_row(run_dir, i)
            for j, task in enumerate(d["tasks"]):
                preds = row[task]
                assert len(preds) == 8 and all(len(p["loglik"]) == len(d["labels"][task]) for p in preds)
                assert all(p["chosen"] == max(range(len(p["loglik"])), key=p["loglik"].__getitem__) for p in preds)
                accuracy = sum(p["chosen"] == p["gold"] for p in preds) / len(preds)
                assert d["R"]["accuracy"][i][j] == pytest.approx(accuracy)
                gold, chosen = [p["gold"] for p in preds], [p["chosen"] for p in preds]
                assert d["R"]["macro_f1"][i][j] == pytest.approx(predictions.macro_f1(gold, chosen))
                recall = d["per_class"][i][task]
                assert sum(c["n"] for c in recall.values()) == 8
        assert set(d["metrics"]["macro_f1"]) >= {"acc", "bwt", "aia", "max_drop"}
        assert set(d["largest_drop"]["accuracy"]) == set(d["tasks"])
        for png in ("forgetting_matrix_macro_f1.png", "stream.png"):
            assert (run_dir / png).stat().st_size > 1000
