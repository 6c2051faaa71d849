"""Every table a run or a study prints: the one markdown builder of ``compare``, the seeds report and the
``tune`` report, and the text tables ``run`` prints (R, its summary metrics, per-class scores)."""

from __future__ import annotations

__all__ = ["markdown_table", "format_matrix", "format_metrics", "format_per_class"]


def markdown_table(rows: list[list[str]], justify: str = "right") -> str:
    """``rows[0]`` as the header, then the rows, each column padded to its widest cell.

    The first column (a run, a configuration, a trial) is left-aligned; the rule marks every other
    column right-aligned, so a renderer lines up their numbers. ``justify`` is how those columns'
    text is padded in the file itself: ``"right"`` lines plain numbers up there too, ``"left"`` keeps
    cells that read as text (``55.7 ± 1.2 [51.7, 59.7]``) starting at the column's edge.
    """
    if justify not in ("right", "left"):
        raise ValueError(f"justify must be 'right' or 'left', got {justify!r}")
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]

    def line(cells: list[str]) -> str:
        padded = (
            c.ljust(w) if i == 0 or justify == "left" else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        )
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|"
    return "\n".join([line(rows[0]), rule, *(line(r) for r in rows[1:])])


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
