"""A run's result files: ``results.json`` read back (its schema checked), ``results.csv`` written from it."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from continual_ft.errors import ContinualFTError
from continual_ft.files import atomic_write

__all__ = ["write_csv", "load_results"]


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
    """``<run_dir>/results.json``, with one line saying why if it is missing, not JSON, or has no R matrix."""
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
