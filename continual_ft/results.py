"""Run outputs: atomic file and folder writes, ``results.json`` / ``results.csv``, and the printed R table.

Run files are a record other people open, so they get the permissions a plain ``open()`` or
``mkdir()`` would give under the umask, not the private 0600/0700 of ``tempfile``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from continual_ft.errors import ContinualFTError

__all__ = [
    "umask",
    "atomic_write",
    "atomic_dir",
    "follow_umask",
    "write_json",
    "write_yaml",
    "write_csv",
    "load_results",
    "format_matrix",
    "format_metrics",
    "format_per_class",
]


def umask() -> int:
    """The process umask. Reading it means setting it, so it is put back at once."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` so that ``path`` holds either the old content or the new, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes it 0600
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def follow_umask(folder: Path) -> None:
    """Give ``folder`` and everything under it the modes ``mkdir()``/``open()`` give under the umask.

    ``tempfile.mkdtemp`` makes a folder 0700, and safetensors (0.8) writes its files 0600.
    """
    mask = umask()
    for p in [Path(folder), *Path(folder).rglob("*")]:
        if not p.is_symlink():
            p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder to write into; it replaces ``path`` only if the block finishes.

    A kill at any moment leaves ``path`` as it was, or complete with the new files (or, between the
    two renames, absent, with the old files in a ``.<name>.*.old`` sibling): never half written.
    The new folder and its files get the umask's permissions (:func:`follow_umask`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        follow_umask(tmp)
        for f in tmp.rglob("*"):  # on disk before the rename makes them visible
            if f.is_file() and not f.is_symlink():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if not (path.exists() or path.is_symlink()):
            tmp.rename(path)
            return
        old = tmp.with_name(f"{tmp.name}.old")
        path.rename(old)
        try:
            tmp.rename(path)
        except BaseException:
            old.rename(path)
            raise
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
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
