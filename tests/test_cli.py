"""The CLI as a user drives it: a toy run end to end, `list`, `plot`, and bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from toy import write_toy_scenario

from continual_ft.cli import main
from continual_ft.data.scenario import list_scenarios
from continual_ft.model.adapters import ADAPTER_MODES
from continual_ft.strategies import STRATEGIES

ROOT = Path(__file__).resolve().parent.parent
FAST = ["model=tiny", "train.max_steps=2", "train.batch_size=4", "quiet"]


def _run(args, tmp_path):
    return subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), *args], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    scenario = write_toy_scenario(tmp / "data")
    proc = _run(
        [
            "run",
            f"scenario={scenario}",
            "model=tiny",
            "train.max_steps=2",
            "train.batch_size=4",
            "output_dir=runs",
            "name=toy",
            "--quiet",
        ],
        tmp,
    )
    assert proc.returncode == 0, proc.stderr
    return tmp, scenario, proc


def test_run_writes_results_and_prints_matrix(finished_run):
    tmp, _, proc = finished_run
    run_dir = tmp / "runs" / "toy"
    results = json.loads((run_dir / "results.json").read_text())
    assert results["complete"] and results["tasks"] == ["colors", "animals"]
    assert len(results["R"]["accuracy"]) == 3 and all(len(r) == 2 for r in results["R"]["accuracy"])
    assert set(results["metrics"]["accuracy"]) == {"acc", "bwt", "fwt", "forgetting", "aia", "max_drop"}
    for name in [
        "config.yaml",
        "results.csv",
        "forgetting_matrix.png",
        "adapters/stage1/adapter_config.json",
        "adapters/stage2/adapter_model.safetensors",
    ]:
        assert (run_dir / name).exists(), name
    assert "before training" in proc.stdout and "after animals" in proc.stdout and "BWT=" in proc.stdout


def test_plot_redraws(finished_run):
    tmp, _, _ = finished_run
    png = tmp / "runs" / "toy" / "forgetting_matrix.png"
    png.unlink()
    main(["plot", str(tmp / "runs" / "toy")])
    assert png.exists() and png.stat().st_size > 1000


def test_rerun_never_overwrites(finished_run):
    tmp, scenario, _ = finished_run
    before = (tmp / "runs" / "toy" / "results.json").read_text()
    proc = _run(["run", f"scenario={scenario}", *FAST[:-1], "output_dir=runs", "name=toy", "seed=1", "--quiet"], tmp)
    assert proc.returncode == 0, proc.stderr
    assert (tmp / "runs" / "toy-2" / "results.json").exists()
    assert (tmp / "runs" / "toy" / "results.json").read_text() == before


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "model=tiny", "foo=1"], "unknown config key 'foo'"),
        (["run", "model=tiny", "train.lrr=1"], "train.lrr"),
        (["run", "model=tiny", "train.lr=-1"], "train.lr must be > 0"),
        (["run", "model=tiny", "train.batch_size=abc"], "batch_size"),
        (["run", "model=tiny", "strategy=nope"], "unknown strategy 'nope'"),
        (["run", "model=tiny", "adapter=nope"], "unknown adapter 'nope'"),
        (["run", "model=tiny", "scenario=nope"], "nope"),
        (["run", "model=no-such-model"], "unknown model"),
        (["plot", "."], "no results.json"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "runs").exists()


def test_malformed_data_file_leaves_existing_results_alone(finished_run):
    tmp, scenario, _ = finished_run
    before = (tmp / "runs" / "toy" / "results.json").read_text()
    bad = tmp / "bad"
    write_toy_scenario(bad)
    with open(bad / "colors.jsonl", "a") as f:
        f.write("{not json\n")
    proc = _run(["run", f"scenario={bad / 'toy.yaml'}", "model=tiny", "output_dir=runs", "name=toy"], tmp)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "colors.jsonl line 81" in proc.stderr
    assert (tmp / "runs" / "toy" / "results.json").read_text() == before
    assert not (tmp / "runs" / "toy-3").exists()


def test_unknown_strategy_lists_exactly_the_registry(capsys):
    with pytest.raises(SystemExit):
        main(["run", "model=tiny", "strategy=nope"])
    listed = capsys.readouterr().err.split("choose from ")[1].strip().split(", ")
    assert listed == list(STRATEGIES)


def test_list_shows_every_registered_name(capsys):
    main(["list"])
    out = capsys.readouterr().out
    for name in [*STRATEGIES, *list_scenarios(), *ADAPTER_MODES, "smollm2-135m", "tiny"]:
        assert f"  {name} " in out, name
