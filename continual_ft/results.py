"""Run outputs: atomic file writes, ``results.json`` / ``results.csv``, and the printed R table."""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path

import yaml

from continual_ft.errors import ContinualFTError

__all__ = ["atomic_write", "write_json", "write_yaml", "write_csv", "load_results", "format_matrix", "format_metrics"]


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` so that ``path`` holds either the old content or the new, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: dict) -> None:
    atomic_write(path, json.dumps(data, indent=2) + "\n")


def write_yaml(path: Path, data: dict) -> None:
    atomic_write(path, yaml.safe_dump(data, sort_keys=False))


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


def format_metrics(results: dict, metric: str | None = None) -> str:
    metric = metric or results["primary_metric"]
    m = results["metrics"][metric]
    return "  ".join(f"{k.upper() if k != 'forgetting' else 'Forgetting'}={_fmt(m[k]).strip()}" for k in m)
