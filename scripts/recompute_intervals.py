"""Recompute a ``compare`` report's intervals and paired differences from its own "Every run" table.

    python scripts/recompute_intervals.py docs/results/seeds/report.md [more reports]   # rewrite in place
    python scripts/recompute_intervals.py --check docs/results/*/report.md              # exit 1 if stale

The intervals over seeds (:func:`continual_ft.study.intervals.t_interval`, a Student t interval) need only
each seed's metrics, which every report lists one run per row (ACC, BWT, forgetting, AIA, largest
drop, one decimal), so a report whose runs are gone (``runs/`` is not kept) can be brought up to the
current method without them. For every configuration of two or more seeds (its runs: the rows whose
name without ``-seed<k>`` is the configuration's, in order) the script recomputes each column's
interval with the library's function, and each paired difference against naive and joint (the
configuration named ``…-naive-continue`` / ``…-joint-continue`` of the same report, paired by seed)
with :func:`continual_ft.study.intervals.paired_intervals`; then rewrites the two tables with ``compare``'s
own formatting (:mod:`continual_ft.study.over_seeds`), the method paragraph under the first, and ``acc_bwt.png``.

What it cannot do, and says so in the report: the macro-F1 column's per-seed values are not in the
report, so its interval comes from the printed mean ± std (:func:`continual_ft.study.intervals.student_t`;
bounds to about ±0.2); one-decimal per-seed values move bounds by up to 0.1 against what ``compare``
prints from the runs; a one-seed configuration's interval is a bootstrap over its test examples and
needs the run's stored predictions, so its cells are left as they are. Before writing, every
configuration's recomputed mean ± std and every difference's mean are checked against the printed
ones (to rounding): a mismatch means the runs were matched wrongly, and nothing is written.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from continual_ft.errors import ContinualFTError  # noqa: E402
from continual_ft.report.plots import metric_bars  # noqa: E402
from continual_ft.study.intervals import Interval, mean_std, paired_intervals, student_t, t_interval  # noqa: E402
from continual_ft.study.over_seeds import NOTE, REFERENCES, SHOWN, Group, bar_values, format_groups, format_significance  # noqa: E402

PRIMARY = "primary"  # the runs' primary metric, whatever it is: the report's columns are on it
RUN_COLUMNS = {"ACC (%)": "acc", "BWT (%)": "bwt", "forgetting (%)": "forgetting", "AIA (%)": "aia"}
RUN_COLUMNS["largest drop (%)"] = "max_drop"
CELL = re.compile(r"^([+-]?[\d.]+)(?: ± ([\d.]+))?(?: \[([+-]?[\d.]+), ([+-]?[\d.]+)\])?( \*)?$")
SEED_SUFFIX = re.compile(r"-seed-?\d+(?=-|$)")  # as continual_ft.study.over_seeds.group_runs names a configuration
RECOMPUTED = (
    "Intervals and differences recomputed with `scripts/recompute_intervals.py` from the per-seed values "
    'of the "Every run" table (one decimal, so bounds may differ by 0.1 from what `compare` prints from '
    "the runs); the macro-F1 column's from its mean ± std (per-seed macro-F1 is not in this report)."
)
TOLERANCE = 0.0011  # printed to 0.1 points, per-seed values too: their mean may differ by up to ~0.09


def _table(lines: list[str], start: int) -> tuple[int, list[list[str]]]:
    """The markdown table whose header is ``lines[start]``: its end (exclusive) and its rows of cells
    (the rule under the header left out)."""
    end, rows = start, []
    while end < len(lines) and lines[end].startswith("|"):
        cells = [c.strip() for c in lines[end].strip().strip("|").split("|")]
        if end != start + 1:
            rows.append(cells)
        end += 1
    return end, rows


def _find(lines: list[str], test, what: str, path: Path) -> int:
    for i, line in enumerate(lines):
        if test(line):
            return i
    raise ContinualFTError(f"{path}: no {what}")


def _number(text: str, path: Path, where: str) -> float:
    try:
        return float(text) / 100
    except ValueError:
        raise ContinualFTError(f"{path}: {where}: {text!r} is not a number") from None


def _cell(text: str, path: Path, where: str) -> tuple[float | None, float | None, Interval | None]:
    """``"33.3 ± 9.9 [23.0, 41.8]"`` → (0.333, 0.099, Interval); ``"—"`` → Nones."""
    if text == "—":
        return None, None, None
    m = CELL.match(text)
    if m is None:
        raise ContinualFTError(f"{path}: {where}: cannot read the cell {text!r}")
    mean, std, low, high, _ = m.groups()
    mean_v = _number(mean, path, where)
    bounds = (None, None) if low is None else (_number(low, path, where), _number(high, path, where))
    return mean_v, None if std is None else _number(std, path, where), Interval(mean_v, *bounds)


def _close(a: float | None, b: float | None) -> bool:
    return (a is None) == (b is None) and (a is None or abs(a - b) <= TOLERANCE)


def recompute(path: Path) -> tuple[str, list[Group], list[str]] | None:
    """The report's new text, its configurations (for the figure) and the ``*`` that changed (one line
    each); None for a report without intervals (one row per run, from before configurations)."""
    lines = path.read_text().split("\n")
    if not any(s.startswith("| configuration") and "| seeds" in s for s in lines):
        return None
    top = _find(lines, lambda s: s.startswith("| configuration") and "| seeds" in s, "configuration table", path)
    top_end, top_rows = _table(lines, top)
    diff = _find(lines, lambda s: s.startswith("| configuration") and " − " in s, "differences table", path)
    diff_end, diff_rows = _table(lines, diff)
    every = _find(lines, lambda s: s.startswith("| run ") and "| ACC (%)" in s, '"Every run" table', path)
    _, run_rows = _table(lines, every)

    header, run_header = top_rows[0], run_rows[0]
    wanted = {*RUN_COLUMNS, "run"}
    if not wanted <= set(run_header):
        raise ContinualFTError(f'{path}: the "Every run" table lacks {sorted(wanted - set(run_header))}')
    runs = []
    for row in run_rows[1:]:
        cells = dict(zip(run_header, row))
        name = cells["run"].removesuffix(" (incomplete)")
        values = {k: _number(cells[c], path, f"run {name}, {c}") for c, k in RUN_COLUMNS.items()}
        runs.append((SEED_SUFFIX.sub("", name), values))

    between = [line for line in lines[top_end:diff] if line.strip()]
    if not between or not all(line.startswith(("Mean ± standard deviation", RECOMPUTED[:30])) for line in between):
        raise ContinualFTError(f"{path}: between the two tables, expected the method paragraph only")
    groups, changes = [], []
    for row in top_rows[1:]:
        cells = dict(zip(header, row))
        name = cells["configuration"]
        seeds = [s.strip() for s in cells["seeds"].split(",")]
        base = re.sub(r" \(seeds [^)]*\)$", "", name)
        mine = [values for run_name, values in runs if run_name == base]
        if len(seeds) > 1 and len(mine) != len(seeds):
            raise ContinualFTError(f"{path}: {name}: {len(seeds)} seeds but {len(mine)} runs named {base}[-seed<k>]")
        fake = [SimpleNamespace(results={"seed": s, "primary_metric": PRIMARY}) for s in seeds]
        g = Group(name, fake)
        g.observed[PRIMARY] = mine
        estimates = {}
        for key, title in SHOWN.items():
            old = _cell(cells[f"{title} (%)"], path, f"{name}, {title}")
            if len(seeds) == 1:  # a bootstrap over the test examples: needs the predictions, kept as it is
                estimates[key] = old
                continue
            values = [v[key] for v in mine]
            new = (*mean_std(values), t_interval(values))
            if not (_close(new[0], old[0]) and _close(new[1], old[1])):
                raise ContinualFTError(
                    f"{path}: {name}, {title}: the runs' mean ± std {new[0]:.4f} ± {new[1]:.4f} is not the printed "
                    f"{old[0]} ± {old[1]}: the runs were matched wrongly"
                )
            estimates[key] = (old[0], old[1], Interval(old[0], new[2].low, new[2].high))
        g.estimates[PRIMARY] = estimates
        macro = _cell(cells["macro-F1 ACC (%)"], path, f"{name}, macro-F1") if "macro-F1 ACC (%)" in cells else None
        if macro is not None and macro[0] is not None:
            interval = student_t(macro[0], macro[1], len(seeds)) if len(seeds) > 1 else macro[2]
            g.estimates["macro_f1"] = {"acc": (macro[0], macro[1], interval)}
        groups.append(g)
    by_name = {g.name: g for g in groups}

    diff_header = diff_rows[0]
    for row in diff_rows[1:]:
        cells = dict(zip(diff_header, row))
        g = by_name.get(cells["configuration"])
        if g is None:
            raise ContinualFTError(f"{path}: {cells['configuration']} is in the differences table only")
        for ref in REFERENCES:
            olds = {
                k: _cell(cells.get(f"{SHOWN[k]} − {ref}", "—"), path, f"{g.name}, {k} − {ref}") for k in ("acc", "bwt")
            }
            if olds["acc"][0] is None:
                continue
            other = [o for o in groups if re.sub(r" \(seeds [^)]*\)$", "", o.name).endswith(f"-{ref}-continue")]
            if len(other) != 1:
                raise ContinualFTError(f"{path}: {len(other)} configurations named …-{ref}-continue")
            ref_group = other[0]
            common = [s for s in g.seeds if s in ref_group.seeds]
            if len(common) < 2:
                found = {k: olds[k][2] for k in olds}  # one seed: a bootstrap over examples, kept
            else:
                a = [g.observed[PRIMARY][g.seeds.index(s)] for s in common]
                b = [ref_group.observed[PRIMARY][ref_group.seeds.index(s)] for s in common]
                found = paired_intervals(a, b)
                for k in olds:
                    if not _close(found[k].value, olds[k][0]):
                        raise ContinualFTError(
                            f"{path}: {g.name} − {ref}, {k}: the runs give {found[k].value:+.4f}, the report "
                            f"{olds[k][0]:+.4f}: the runs were matched wrongly"
                        )
                    found[k] = Interval(olds[k][0], found[k].low, found[k].high)
            g.versus[ref] = (ref_group, found)
            for k in ("acc", "bwt"):
                was, now = olds[k][2].excludes_zero, found[k].excludes_zero
                if was != now:
                    changes.append(f"{path}: {g.name} {SHOWN[k]} − {ref}: * {'lost' if was else 'gained'}")

    new_lines = [
        *lines[:top],
        format_groups(groups),
        "",
        NOTE,
        "",
        RECOMPUTED,
        "",
        format_significance(groups),
        *lines[diff_end:],
    ]
    return "\n".join(new_lines), groups, changes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("reports", nargs="+", type=Path, help="compare reports (report.md) to recompute")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a report would change")
    args = parser.parse_args(argv)
    try:
        for p in args.reports:
            if not p.is_file():
                raise ContinualFTError(f"{p}: no such report")
        found = {p: recompute(p) for p in args.reports}  # everything read and checked before anything is written
    except ContinualFTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    done = []
    for p, result in found.items():
        if result is None:
            print(f"{p}: no intervals (one row per run): left")
        elif not any(len(g.runs) > 1 for g in result[1]):
            print(f"{p}: one seed per configuration, intervals over test examples (need the predictions): left")
        else:
            done.append((p, *result))
    stale = [p for p, text, _, _ in done if text != p.read_text()]
    for p, text, groups, changes in done:
        for line in changes:
            print(line)
        if args.check or p not in stale:
            continue
        p.write_text(text)
        metric_bars(bar_values(groups), p.parent / "acc_bwt.png", "primary metric: mean over seeds, 95% interval")
        print(f"rewrote {p} and {p.parent / 'acc_bwt.png'}")
    if args.check and stale:
        print("stale:", *map(str, stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
