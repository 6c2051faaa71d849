"""The report a ``tune`` leaves (:mod:`continual_ft.study.tune`): ``report.md`` with the best configuration as a
``python cli.py run`` line and a table of every trial, ``trials.csv``, and Optuna's history and
parameter-importance plots as PNG. It reads the study only, so it covers the trials of every process.
"""

from __future__ import annotations

import csv
import io
import math
import shlex
import warnings
from pathlib import Path

from continual_ft.files import atomic_write
from continual_ft.report.plots import save_figure  # sets matplotlib's Agg backend before Optuna's plots load
from continual_ft.report.tables import markdown_table

__all__ = ["write_report", "format_value"]


def format_value(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _pct(value) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.1f}"


def _rows(study) -> tuple[list[str], list[list], list[list[str]]]:
    """The trials as a header, raw CSV rows and formatted table rows."""
    params = list(dict.fromkeys(k for t in study.trials for k in t.params))
    header = ["trial", "state", "objective", "ACC (%)", "BWT (%)", *params, "stages", "run"]
    raw, shown = [], []
    for t in study.trials:
        m = t.user_attrs.get("metrics", {})
        value = t.value if t.state.name == "COMPLETE" else t.intermediate_values.get(t.last_step)
        acc, bwt = (None if m.get(k) is None else 100 * m[k] for k in ("acc", "bwt"))
        stages, run_dir = t.user_attrs.get("stages_done", 0), t.user_attrs.get("run_dir", "")
        state = t.state.name.lower()
        raw.append([t.number, state, value, acc, bwt, *(t.params.get(k) for k in params), stages, run_dir])
        shown_value = _pct(value) if t.state.name == "COMPLETE" or value is None else f"({_pct(value)})"
        cells = [str(t.number), state, shown_value, _pct(acc), _pct(bwt)]
        cells += [format_value(t.params[k]) if k in t.params else "—" for k in params]
        shown.append([*cells, str(stages), f"`{run_dir}`" if run_dir else "—"])
    return header, raw, shown


def _best(study):
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    return max(done, key=lambda t: t.value) if done else None


def _plots(study, objective: str, out: Path) -> tuple[list[Path], list[str]]:
    """Optuna's optimization history and parameter importances as PNG; what could not be drawn, and why."""
    from optuna.visualization import matplotlib as vis

    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    files, notes = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the matplotlib plots are marked experimental
        if done:
            ax = vis.plot_optimization_history(study, target_name=f"{objective} (%)")
            ax.figure.set_size_inches(7, 4)
            ax.figure.tight_layout()
            files.append(save_figure(ax.figure, out / "history.png"))
        varied = [k for k in study.best_params if len({repr(t.params.get(k)) for t in done}) > 1] if done else []
        if len(done) >= 2 and varied:
            try:
                ax = vis.plot_param_importances(study, target_name=f"{objective} (%)")
            except (ValueError, RuntimeError, ZeroDivisionError) as e:
                notes.append(f"no importance plot: {str(e).splitlines()[0]}")
            else:
                ax.figure.set_size_inches(7, 1.5 + 0.5 * len(study.best_params))
                ax.figure.tight_layout()
                files.append(save_figure(ax.figure, out / "importance.png"))
        else:
            notes.append("no importance plot: it needs two completed trials with different settings")
    return files, notes


def write_report(study, objective: str, out: Path, command: str) -> tuple[str, str | None, list[Path]]:
    """Write ``report.md``, ``trials.csv`` and the plots to ``out``; returns the table, the best command, the files."""
    out = Path(out)
    header, raw, shown = _rows(study)
    table = markdown_table([header, *shown])
    buf = io.StringIO()
    csv.writer(buf).writerows([header[:-1] + ["run_dir"], *raw])
    atomic_write(out / "trials.csv", buf.getvalue())
    best = _best(study)
    best_command = "python cli.py run " + shlex.join(best.user_attrs["overrides"]) if best else None
    figures, notes = _plots(study, objective, out)
    lines = ["# continual-ft tuning: study " + study.study_name, "", "```", command, "```", ""]
    if best:
        lines += [
            f"Best: trial {best.number}, {objective} = {best.value:.1f} (`{best.user_attrs.get('run_dir')}`):",
            "",
            "```",
            best_command,
            "```",
            "",
        ]
    else:
        lines += ["No trial has completed yet.", ""]
    lines += [
        table,
        "",
        f"Objective: {objective} on the primary metric, in percent, maximised. A pruned trial shows in "
        "parentheses the running objective it was stopped at (the scenario cut after that stage).",
        "",
        *(f"- {n}" for n in notes),
        *(f"![{f.stem}]({f.name})" for f in figures),
        "",
    ]
    atomic_write(out / "report.md", "\n".join(lines))
    return table, best_command, [out / "report.md", out / "trials.csv", *figures]
