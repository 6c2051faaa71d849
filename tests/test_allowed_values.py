"""One list of allowed values per setting, in ``config.py``, and one markdown table builder for every report.

The lists: each setting with a closed set of values has it next to its field in :mod:`continual_ft.config`
(:data:`~continual_ft.config.CHOICES`), checked once by :func:`~continual_ft.config.check_choice`; the code
that implements a setting imports its list from there, never the other way round. The tables: ``compare``'s,
the seeds report's and the ``tune`` report's markdown tables all come from
:func:`continual_ft.report.tables.markdown_table`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from continual_ft import config
from continual_ft.config import CHOICES, make_config
from continual_ft.errors import ContinualFTError
from continual_ft.model import adapters
from continual_ft.report import tracking
from continual_ft.report.tables import markdown_table
from continual_ft.study import compare, over_seeds

ROOT = Path(__file__).resolve().parent.parent


def test_config_imports_nothing_from_the_package_but_errors():
    tree = ast.parse((ROOT / "continual_ft" / "config.py").read_text())
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert [m for m in imported if m.startswith("continual_ft")] == ["continual_ft.errors"]


def _override(key: str, value: str) -> str:
    return f"{key}=[{value}]" if key == "log" else f"{key}={value}"


@pytest.mark.parametrize("key", list(CHOICES))
def test_every_listed_value_is_accepted_and_any_other_refused_in_one_line(key):
    for value in CHOICES[key]:
        made = make_config([_override(key, value)])
        section, _, name = key.rpartition(".")
        got = getattr(getattr(made, section) if section else made, name)
        assert got == ([value] if key == "log" else value)
    with pytest.raises(ContinualFTError) as e:
        make_config([_override(key, "bogus")])
    message = str(e.value)
    assert "\n" not in message and "bogus" in message and ", ".join(CHOICES[key]) in message


@pytest.mark.parametrize(
    "key, message",
    [
        ("adapter", "unknown adapter 'bogus'; choose from continue, new, stack, merge, merge_final"),
        ("log", "unknown tracker log=bogus; choose from tensorboard, wandb, mlflow"),
        ("precision", "precision must be one of auto, bf16, fp32, got 'bogus'"),
        ("train.schedule", "train.schedule must be one of constant, linear, cosine, got 'bogus'"),
    ],
)
def test_messages_keep_their_wording(key, message):
    with pytest.raises(ContinualFTError) as e:
        config.check_choice(key, "bogus")
    assert str(e.value) == message


def test_implementations_use_the_lists_of_config():
    assert adapters.ADAPTER_MODES is config.ADAPTER_MODES
    assert adapters.MERGE_METHODS is config.MERGE_METHODS
    assert tuple(tracking.TRACKERS) == config.TRACKER_NAMES  # a backend for each name, in the same order


def test_a_mode_given_without_a_config_is_refused_with_the_configs_line():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ContinualFTError) as from_adapters:
        adapters.start_stage(model, "fold", 0, config.LoraConfig())
    with pytest.raises(ContinualFTError) as from_config:
        make_config(["adapter=fold"])
    assert str(from_adapters.value) == str(from_config.value)
    with pytest.raises(ContinualFTError) as from_tracking:
        tracking.check_trackers(["fold"])
    with pytest.raises(ContinualFTError) as from_config:
        make_config(["log=fold"])
    assert str(from_tracking.value) == str(from_config.value)


def test_markdown_table_pads_aligns_and_marks_the_rule():
    rows = [["run", "ACC (%)"], ["naive", "5.0"], ["replay-long", "55.7"]]
    assert markdown_table(rows) == (
        "| run         | ACC (%) |\n|-------------|--------:|\n| naive       |     5.0 |\n| replay-long |    55.7 |"
    )
    assert markdown_table(rows, justify="left").splitlines()[2] == "| naive       | 5.0     |"
    with pytest.raises(ValueError):
        markdown_table(rows, justify="centre")


def _rebuilt(table: str, justify: str) -> str:
    """``table`` drawn again by :func:`markdown_table` from its cells (its rule dropped)."""
    lines = table.splitlines()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in [lines[0], *lines[2:]]]
    return markdown_table(rows, justify)


def _results(strategy: str, acc: float, complete: bool = True) -> dict:
    metrics = {"acc": acc, "bwt": -0.05, "fwt": 0.0, "forgetting": 0.05, "aia": acc, "max_drop": 0.1}
    return {
        "strategy": strategy,
        "seed": 0,
        "complete": complete,
        "primary_metric": "accuracy",
        "tasks": ["a", "b"],
        "rows": ["before training", "after a", "after b"],
        "R": {"accuracy": [[0.1, 0.1], [0.6, 0.2], [0.55, acc]]},
        "metrics": {"accuracy": metrics},
        "stage_stats": [{"tokens": 2000, "train_seconds": 8.0, "strategy_seconds": 1.0, "adapter_bytes": 2**20}],
    }


def test_compare_and_the_seeds_report_draw_with_the_one_builder(tmp_path):
    entries = [
        compare.Entry("naive", tmp_path / "a", _results("naive", 0.4), "given"),
        compare.Entry("replay-buffer_size400", tmp_path / "b", _results("replay", 0.62, complete=False), "given"),
    ]
    groups = over_seeds.group_runs(entries, [{"strategy": "naive"}, {"strategy": "replay"}])
    for table, justify in [
        (compare.format_table(entries), "right"),
        (compare.format_stage_table(entries), "right"),
        (over_seeds.format_groups(groups), "left"),
        (over_seeds.format_significance(groups), "left"),
    ]:
        assert table and _rebuilt(table, justify) == table


def test_the_tune_report_draws_with_the_one_builder(tmp_path):
    optuna = pytest.importorskip("optuna")
    from continual_ft.study import tune_report

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(study_name="s", direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    for i, value in enumerate([50.0, 61.25]):
        trial = study.ask()
        trial.suggest_float("train.lr", 1e-4, 3e-3, log=True)
        for key, attr in {"metrics": {"acc": 0.5, "bwt": -0.1}, "overrides": ["lora.r=8"], "run_dir": f"t{i}"}.items():
            trial.set_user_attr(key, attr)
        study.tell(trial, value)
    table, _, _ = tune_report.write_report(study, "acc", tmp_path, "tune")
    assert "| trial |" in table and _rebuilt(table, "right") == table
    assert table in (tmp_path / "report.md").read_text()
