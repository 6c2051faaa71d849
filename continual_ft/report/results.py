"""Run outputs: ``results.json`` / ``results.csv``, and the printed R table."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from continual_ft.errors import ContinualFTError
from continual_ft.files import atomic_write

__all__ = [
    "write_csv",
    "load_results",
    "format_matrix",
    "format_metrics",
    "format_per_class",
]


def write_csv(path: Path, results: dict) -> None:
    """Long format: one line per (row of R, task, metric)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["row", "after", "task", "metric", "value"])
    for metric, R in results["R"].items():
        for i, row in enumerate(R):
            for task, value in zip(results["tasks"], row):
                w.writerow([i, results["rows"][i], task, metric, value])
    atomic_write(path, buf.getvalue())


def load_results(run_dir: Path) -> dict:
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise ContinualFTError(f"{run_dir}: no results.json (is this a run directory?)")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ContinualFTError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(results, dict) or "R" not in results or "tasks" not in results:
        raise ContinualFTError(f"{path}: not a continual-ft results file (no R matrix)")
    return results


def _fmt(v) -> str:
    return "—" if v is None else f"{100 * v:6.1f}"


def format_matrix(results: dict, metric: str | None = None) -> str:
    """R as a text table, values in percent; rows are evaluation points, columns tasks."""
    metric = metric or results["primary_metric"]
    R = results["R"][metric]
    tasks = results["tasks"]
    head_w = max(len(r) for r in results["rows"]) + 2
    col_w = max(8, *(len(t) + 2 for t in tasks))
    lines = [f"R[{metric}] (%)".ljust(head_w) + "".join(t.rjust(col_w) for t in tasks)]
    for name, row in zip(results["rows"], R):
        lines.append(name.ljust(head_w) + "".join(_fmt(v).rjust(col_w) for v in row))
    return "\n".join(lines)


_SHOWN = {"forgetting": "Forgetting", "max_drop": "MaxDrop"}


def format_metrics(results: dict, metric: str | None = None) -> str:
    """The summary metrics on one line; then each task's largest drop along the stream, where recorded."""
    metric = metric or results["primary_metric"]
    m = results["metrics"][metric]
    line = "  ".join(f"{_SHOWN.get(k, k.upper())}={_fmt(m[k]).strip()}" for k in m)
    drops = results.get("largest_drop", {}).get(metric)
    if drops:
        line += "\nlargest drop per task: " + ", ".join(f"{t} {_fmt(v).strip()}" for t, v in drops.items())
    return line


def format_per_class(results: dict, row: int = -1) -> str:
    """Per-class precision and recall (%) and test examples of one row of R (default the last)."""
    per_class = results.get("per_class") or []
    if not per_class:
        return ""
    lines = [f"per class, {results['rows'][row]}: precision / recall (%), test examples"]
    for task, classes in per_class[row].items():
        cells = [
            f"{label} {_fmt(c['precision']).strip()} / {_fmt(c['recall']).strip()} ({c['n']})"
            for label, c in classes.items()
        ]
        lines.append(f"  {task}: " + ", ".join(cells))
    return "\n".join(lines)
