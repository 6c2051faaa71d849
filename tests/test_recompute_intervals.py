"""scripts/recompute_intervals.py: a report's intervals and stars recomputed from its own per-seed rows."""

import importlib.util
from pathlib import Path

import pytest

from continual_ft.study.intervals import t_interval

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "recompute_intervals.py"

# naive and replay of docs/results/seeds as the two-level bootstrap printed them
OLD = """# continual-ft comparison

| configuration | seeds | ACC (%) | BWT (%) | forgetting (%) | AIA (%) | largest drop (%) | macro-F1 ACC (%) |
|---|--:|--:|--:|--:|--:|--:|--:|
| m-naive-continue | 0, 1, 2 | 33.3 ± 9.9 [23.0, 41.8] | -37.3 ± 12.5 [-51.3, -24.7] | 37.3 ± 12.5 [24.7, 51.3] | 55.5 ± 7.7 [47.6, 62.6] | 37.3 ± 12.5 [24.7, 51.3] | 27.5 ± 11.0 [15.7, 35.6] |
| m-replay-continue | 0, 1, 2 | 54.0 ± 4.4 [49.3, 59.3] | 6.0 ± 2.6 [0.3, 11.0] | -6.0 ± 2.6 [-11.0, -0.3] | 65.8 ± 5.0 [60.6, 71.3] | 0.0 ± 0.0 [0.0, 2.0] | 49.2 ± 4.8 [43.9, 54.3] |

Mean ± standard deviation over seeds, then the 95% interval of a bootstrap over seeds and test examples.

| configuration | ACC − naive | BWT − naive |
|---|--:|--:|
| m-naive-continue | — | — |
| m-replay-continue | +20.7 [+11.5, +30.7] * | +43.3 [+27.7, +57.3] * |

Every run:

| run | ACC (%) | BWT (%) | FWT (%) | forgetting (%) | AIA (%) | largest drop (%) | train time (s) |
|---|--:|--:|--:|--:|--:|--:|--:|
| m-naive-continue-seed0 | 40.0 | -37.0 | 6.0 | 37.0 | 62.0 | 37.0 | 240.0 |
| m-naive-continue-seed1 | 38.0 | -25.0 | 1.0 | 25.0 | 57.5 | 25.0 | 248.6 |
| m-naive-continue-seed2 | 22.0 | -50.0 | 1.0 | 50.0 | 47.0 | 50.0 | 253.2 |
| m-replay-continue-seed0 | 59.0 | 8.0 | 6.0 | -8.0 | 71.5 | 0.0 | 360.4 |
| m-replay-continue-seed1 | 50.5 | 3.0 | 1.0 | -3.0 | 63.7 | 0.0 | 288.1 |
| m-replay-continue-seed2 | 52.5 | 7.0 | 1.0 | -7.0 | 62.3 | 0.0 | 273.6 |
"""  # noqa: E501 (a report's rows, as compare writes them)


@pytest.fixture()
def script():
    spec = importlib.util.spec_from_file_location("recompute_intervals", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(text: str, first: str, second_header: str) -> list[str]:
    """The cells of the row ``first`` in the table whose second header cell is ``second_header``."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("|")]
    start = next(i for i, cells in enumerate(rows) if cells[:2] == ["configuration", second_header])
    return next(cells[1:] for cells in rows[start:] if cells[0] == first)


def _t(values):
    iv = t_interval([v / 100 for v in values])
    return f"[{100 * iv.low:.1f}, {100 * iv.high:.1f}]"


def test_intervals_and_stars_come_from_the_per_seed_rows(script, tmp_path, capsys):
    report = tmp_path / "report.md"
    report.write_text(OLD)
    assert script.main([str(report)]) == 0
    new = report.read_text()
    naive = _row(new, "m-naive-continue", "seeds")
    assert naive[1] == "33.3 ± 9.9 " + _t([40.0, 38.0, 22.0]) == "33.3 ± 9.9 [8.8, 57.8]"
    assert naive[2] == "-37.3 ± 12.5 " + _t([-37.0, -25.0, -50.0])
    replay = _row(new, "m-replay-continue", "ACC − naive")
    gaps = _t([19.0, 12.5, 30.5])  # replay − naive by seed: paired
    assert replay[0] == "+20.7 " + gaps.replace("[", "[+").replace(", ", ", +").replace("+-", "-")
    assert not replay[0].endswith("*") and replay[1].endswith("*")  # ACC's star lost, BWT's kept
    out = capsys.readouterr().out
    assert "m-replay-continue ACC − naive: * lost" in out and "BWT − naive" not in out
    assert "Student t interval" in new and "bootstrap over seeds and test examples" not in new
    assert new.endswith(OLD[OLD.index("Every run:") :])  # the runs' table untouched
    assert (tmp_path / "acc_bwt.png").stat().st_size > 1000
    assert script.main(["--check", str(report)]) == 0  # rerunning changes nothing
    assert script.main(["--check", str(tmp_path / "report.md")]) == 0


def test_runs_that_do_not_give_the_printed_means_stop_it_before_anything_is_written(script, tmp_path, capsys):
    report = tmp_path / "report.md"
    report.write_text(OLD.replace("| m-naive-continue-seed0 | 40.0 ", "| m-naive-continue-seed0 | 45.0 "))
    before = report.read_text()
    assert script.main([str(report)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "matched wrongly" in err and "\n" not in err
    assert report.read_text() == before and not (tmp_path / "acc_bwt.png").exists()
    assert script.main(["--check", str(tmp_path / "missing.md")]) == 2


def test_stale_report_fails_the_check_and_one_seed_reports_are_left(script, tmp_path, capsys):
    report = tmp_path / "report.md"
    report.write_text(OLD)
    assert script.main(["--check", str(report)]) == 1 and report.read_text() == OLD
    single = tmp_path / "single.md"
    single.write_text(OLD.replace("| 0, 1, 2 |", "| 0 |").replace("33.3 ± 9.9 [23.0, 41.8]", "40.0 [30.0, 50.0]"))
    assert script.main([str(single)]) == 0
    assert "one seed per configuration" in capsys.readouterr().out
