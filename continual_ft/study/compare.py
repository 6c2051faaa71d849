"""``compare``: run a grid of configurations, or read finished runs, and put them side by side.

    python cli.py compare scenario=legal_then_medical strategy=naive,replay adapter=stack,merge
    python cli.py compare runs/a runs/b --out runs/compare

Comma-separated values in any key span the cartesian product of runs (commas inside ``[...]``
stay part of a list value); the other ``key=value`` settings apply to every run. A grid point
whose resolved config matches a finished run under ``output_dir`` (``complete: true`` in its
results.json, same config.yaml apart from ``name``, ``output_dir``, ``resolved`` and ``log``) is reused,
not trained again. The output folder gets ``report.md``, ``heatmaps.png`` (every run's forgetting
matrix) and ``acc_bwt.png``, each written atomically.

Runs that differ only in ``seed`` (``seed=0,1,2`` is a grid key like any other) form one
configuration: the report gives its mean ± standard deviation over seeds with a 95% Student t
interval over seeds (:mod:`continual_ft.study.intervals`; with one seed, a bootstrap over its test
examples from the stored predictions), and each configuration's paired difference against naive
and joint (a paired t interval over the per-seed differences), marked significant where its
interval excludes 0. ``acc_bwt.png`` draws the intervals.
"""

from __future__ import annotations

import itertools
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from continual_ft.config import RunConfig, make_config, parse_overrides, to_dict
from continual_ft.errors import ContinualFTError
from continual_ft.files import atomic_write
from continual_ft.report.plots import heatmap_grid, metric_bars
from continual_ft.report.results import load_results
from continual_ft.report.tables import markdown_table
from continual_ft.run.checks import check_config
from continual_ft.study.over_seeds import NOTE, Group, bar_values, format_groups, format_significance, group_runs

__all__ = [
    "Entry",
    "Group",
    "Comparison",
    "split_values",
    "grid_configs",
    "find_finished",
    "compare",
    "format_table",
    "format_stage_table",
    "baseline_entry",
    "format_summary",
    "write_report",
]

#: Config keys that never make two runs different.
IGNORED_KEYS = ("name", "output_dir", "resolved", "log")
#: Keys the default run name already spells out (scenario-strategy-adapter).
NAMED_KEYS = ("scenario", "strategy", "adapter")


@dataclass
class Entry:
    """One row of the comparison."""

    name: str
    run_dir: Path
    results: dict
    source: str  # "trained", "reused" or "given"


@dataclass
class Comparison:
    entries: list[Entry]
    out: Path
    table: str
    files: list[Path] = field(default_factory=list)
    groups: list[Group] = field(default_factory=list)


def split_values(value: str) -> list[str]:
    """``"naive,replay"`` → two values; commas inside brackets or quotes stay (``[q_proj,v_proj]``)."""
    parts, depth, quote, current = [], 0, None, ""
    for ch in value:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(current)
            current = ""
            continue
        current += ch
    parts.append(current)
    return parts


def _label(key: str, value: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "_", f"{key.rsplit('.', 1)[-1]}{value}")


def grid_configs(overrides: list[str], strategy_names: tuple[str, ...] = ()) -> list[tuple[RunConfig, dict]]:
    """Every grid point's RunConfig (each with a distinct run name) and its strategy settings with their
    defaults; all checked before anything runs."""
    from continual_ft.strategies import settings

    axes = [(key, split_values(value)) for key, value in parse_overrides(overrides)]
    varied = {k for k, values in axes if len(values) > 1}
    points = []
    for point in itertools.product(*(values for _, values in axes)):
        config = make_config([f"{k}={v}" for (k, _), v in zip(axes, point)], strategy_names)
        strategies = check_config(config)  # unknown strategy, setting or combination: fail before any run
        named = () if config.name else NAMED_KEYS + (("merge.method",) if config.adapter == "merge_final" else ())
        suffix = [_label(k, v) for (k, _), v in zip(axes, point) if k in varied and k not in named]
        config.name = "-".join([config.run_name(), *suffix])
        points.append((config, settings(strategies)))
    names = [c.name for c, _ in points]
    if len(set(names)) < len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ContinualFTError(f"two grid points resolve to the same run {dup!r}; drop the repeated value")
    return points


def _comparable(config: dict) -> dict:
    # A YAML round trip makes a fresh config look exactly like one read back from config.yaml.
    return {k: v for k, v in yaml.safe_load(yaml.safe_dump(config)).items() if k not in IGNORED_KEYS}


def find_finished(config: RunConfig, strategy_settings: dict | None = None) -> Path | None:
    """A finished run under ``config.output_dir`` with the same resolved config, or None.

    Strategy settings are compared with their defaults filled in, so a run made before a default
    changed is not taken for a run of the new default."""
    from continual_ft.strategies import build, settings

    parent = Path(config.output_dir)
    if not parent.is_dir():
        return None
    if strategy_settings is None:
        strategy_settings = settings(build(config.strategy, config.strategy_args))
    want = _comparable({**to_dict(config), "strategy_settings": strategy_settings})
    for run_dir in sorted(p for p in parent.iterdir() if (p / "results.json").is_file()):
        try:
            done = load_results(run_dir).get("complete") is True
            saved = yaml.safe_load((run_dir / "config.yaml").read_text())
        except (ContinualFTError, OSError, yaml.YAMLError):
            continue
        if done and isinstance(saved, dict) and _comparable(saved) == want:
            return run_dir
    return None


def _mb(n: int | None) -> str:
    return "—" if n is None else f"{n / 2**20:.2f}"


def _row(entry: Entry) -> list[str]:
    d = entry.results
    m = d.get("metrics", {}).get(d["primary_metric"], {})
    keys = ("acc", "bwt", "fwt", "forgetting", "aia", "max_drop")
    pct = [("—" if m.get(k) is None else f"{100 * m[k]:.1f}") for k in keys]
    stats = d.get("stage_stats", [])
    # Stage time = training steps + the strategy's own passes (EWC's Fisher, replay mixing).
    train = sum(s.get("train_seconds", 0.0) + s.get("strategy_seconds", 0.0) for s in stats)
    tokens = sum(s.get("tokens", 0) for s in stats)  # real training tokens: runs compare at equal tokens
    latency = d["eval"][-1]["seconds_per_example"] * 1000 if d.get("eval") else None
    if d.get("adapter") == "merge":
        size = "0 (merged)"
    elif stats and "serving_adapter_bytes" in stats[-1]:
        size = _mb(stats[-1]["serving_adapter_bytes"])
    elif stats:  # results from before serving sizes were recorded
        stacked = d.get("adapter") in ("new", "stack")
        size = _mb(sum(s["adapter_bytes"] for s in stats) if stacked else stats[-1]["adapter_bytes"])
    else:
        size = "—"
    return [
        entry.name + ("" if d.get("complete") else " (incomplete)"),
        *pct,
        f"{train:.1f}",
        f"{1000 * train / tokens:.2f}" if tokens else "—",
        "—" if latency is None else f"{latency:.2f}",
        size,
        "—" if not d.get("peak_memory_mb") else f"{d['peak_memory_mb']:.0f}",
    ]


HEADER = [
    "run",
    "ACC (%)",
    "BWT (%)",
    "FWT (%)",
    "forgetting (%)",
    "AIA (%)",
    "largest drop (%)",
    "train time (s)",
    "s / 1k train tokens",
    "eval latency (ms/example)",
    "adapter size (MB)",
    "peak memory (MB)",
]


def format_table(entries: list[Entry]) -> str:
    """The comparison as a markdown table, one row per run."""
    return markdown_table([HEADER] + [_row(e) for e in entries])


def _stage_cost(stats: dict) -> float | None:
    """Seconds per 1,000 real training tokens of one stage: its steps plus the strategy's own passes."""
    tokens = stats.get("tokens", 0)
    seconds = stats.get("train_seconds", 0.0) + stats.get("strategy_seconds", 0.0)
    return 1000 * seconds / tokens if tokens else None


def baseline_entry(entries: list[Entry]) -> Entry:
    """The run others' stage times are divided by: the first ``naive`` run, else the first run."""
    return next((e for e in entries if e.results.get("strategy") == "naive"), entries[0])


def format_stage_table(entries: list[Entry]) -> str:
    """Per-stage time at equal training tokens, and its ratio to :func:`baseline_entry`'s same stage."""
    base = baseline_entry(entries)
    base_costs = [_stage_cost(s) for s in base.results.get("stage_stats", [])]
    n = max(len(e.results.get("stage_stats", [])) for e in entries)
    header = ["run"]
    header += [f"stage {k + 1} s / 1k tok" for k in range(n)]
    label = "naive" if base.results.get("strategy") == "naive" else base.name
    header += [f"stage {k + 1} vs {label}" for k in range(n)]
    header += ["strategy passes (s)"]
    rows = [header]
    for e in entries:
        stats = e.results.get("stage_stats", [])
        costs = [_stage_cost(s) for s in stats] + [None] * (n - len(stats))
        ratios = [
            "—" if c is None or k >= len(base_costs) or not base_costs[k] else f"{c / base_costs[k]:.2f}x"
            for k, c in enumerate(costs)
        ]
        hooks = ", ".join(f"{s.get('strategy_seconds', 0.0):.0f}" for s in stats)
        rows.append([e.name, *("—" if c is None else f"{c:.2f}" for c in costs), *ratios, hooks or "—"])
    return markdown_table(rows)


def _configs(entries: list[Entry]) -> list[dict | None]:
    """Each run's config.yaml as :func:`find_finished` compares them, without its seed; None where unreadable."""
    configs = []
    for e in entries:
        try:
            saved = yaml.safe_load((Path(e.run_dir) / "config.yaml").read_text())
        except (OSError, yaml.YAMLError):
            saved = None
        configs.append(
            {k: v for k, v in _comparable(saved).items() if k != "seed"} if isinstance(saved, dict) else None
        )
    return configs


def format_summary(groups: list[Group], entries: list[Entry]) -> str:
    """What ``compare`` prints: the configurations with their intervals, the differences against naive and
    joint, and the table of runs."""
    significance = format_significance(groups)
    return "\n\n".join(t for t in (format_groups(groups), significance, format_table(entries)) if t)


def write_report(entries: list[Entry], out: Path, command: str, groups: list[Group] | None = None) -> list[Path]:
    """``report.md``, ``heatmaps.png`` and ``acc_bwt.png`` in ``out``; returns the files."""
    out = Path(out)
    groups = groups if groups is not None else group_runs(entries, _configs(entries))
    table = format_table(entries)
    runs = {e.name: e.results for e in entries}
    figures = [
        heatmap_grid(runs, out / "heatmaps.png"),
        metric_bars(bar_values(groups), out / "acc_bwt.png", "primary metric: mean over seeds, 95% interval"),
    ]
    significance = format_significance(groups)
    text = "\n".join(
        [
            "# continual-ft comparison",
            "",
            "```",
            command,
            "```",
            "",
            format_groups(groups),
            "",
            NOTE,
            "",
            *([significance, ""] if significance else []),
            "Every run:",
            "",
            table,
            "",
            "ACC, BWT, FWT, forgetting, AIA (average incremental accuracy) and the largest drop on each run's "
            "primary metric (see `continual_ft/eval/metrics.py`). "
            "Train time: all stages, training steps plus the strategy's own passes (EWC's Fisher); "
            "s / 1k train tokens puts strategies that train on more data (replay, joint) on equal terms. "
            "Eval latency: milliseconds per test example (all tasks) after the last stage. "
            "Adapter size: adapter weights the final model adds to its base (all stacked adapters; "
            "the combined one for merge_final; none for merge, whose adapters are in the weights). "
            "Peak memory: the run's peak resident set size on CPU, allocator peak on GPU.",
            "",
            "Time per stage at equal training tokens: seconds per 1,000 real training tokens (training steps "
            "plus the strategy's own passes: EWC's Fisher, replay mixing, adapter set-up), and the ratio to "
            "the same stage of the baseline run. Strategy passes: those passes alone, per stage.",
            "",
            format_stage_table(entries),
            "",
            "| run | directory | |",
            "|---|---|---|",
            *(f"| {e.name} | `{e.run_dir}` | {e.source} |" for e in entries),
            "",
            "![forgetting matrices](heatmaps.png)",
            "",
            "![ACC, BWT, AIA and largest drop with their intervals](acc_bwt.png)",
            "",
        ]
    )
    atomic_write(out / "report.md", text)
    return [out / "report.md", *figures]


def _unique_names(dirs: list[Path]) -> list[str]:
    names = [d.name for d in dirs]
    return [d.name if names.count(d.name) == 1 else str(d) for d in dirs]


def compare(
    args: list[str],
    out: Path | None = None,
    progress: bool = True,
    command: str | None = None,
    log: Callable[[str], None] = print,
) -> Comparison:
    """Run (or reuse) the grid that ``key=value`` ``args`` span, or read the run directories ``args`` name;
    write the report to ``out`` (default ``<output_dir>/compare``)."""
    from continual_ft.run.runner import run
    from continual_ft.strategies import strategy_names

    overrides = [a for a in args if "=" in a or a == "quick"]
    dirs = [Path(a) for a in args if a not in overrides]
    for d in dirs:
        if not d.is_dir():
            raise ContinualFTError(f"{d}: neither key=value nor a run directory")
        if not (d / "results.json").is_file():
            raise ContinualFTError(f"{d}: no results.json (is this a run directory?)")
    if dirs and overrides:
        raise ContinualFTError("give either key=value settings (a grid to run) or run directories, not both")
    if not args:
        raise ContinualFTError("compare needs key=value settings (a grid to run) or run directories")
    command = command or "compare " + shlex.join(args)

    entries = []
    if dirs:
        entries = [Entry(n, d, load_results(d), "given") for n, d in zip(_unique_names(dirs), dirs)]
        out = Path(out) if out else Path(RunConfig().output_dir) / "compare"
    else:
        points = grid_configs(overrides, strategy_names())
        for config, strategy_settings in points:
            found = find_finished(config, strategy_settings)
            if found is not None:
                log(f"reused {found}")
                entries.append(Entry(config.name, found, load_results(found), "reused"))
            else:
                results = run(config, progress=progress)
                log(f"trained {results.run_dir}")
                entries.append(Entry(config.name, results.run_dir, results.data, "trained"))
        out = Path(out) if out else Path(points[0][0].output_dir) / "compare"
    groups = group_runs(entries, _configs(entries))
    files = write_report(entries, out, command, groups)
    return Comparison(entries, out, format_summary(groups, entries), files, groups)
