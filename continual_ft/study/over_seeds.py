"""Configurations over seeds: runs that differ only in ``seed`` grouped, their estimates and intervals,
and the paired differences against naive and joint, as ``compare`` reports them.

Per configuration and metric key (ACC, BWT, ...): the mean over seeds ± the standard deviation
over seeds (n − 1), and the 95% Student t interval over the seeds' values
(:func:`continual_ft.study.intervals.intervals`; with one seed, a bootstrap over its test examples from the
stored predictions). Against the reference configuration (the naive or joint run of the same
settings, or the only one there is): the paired difference on the seeds both have, with its paired
t interval (:func:`continual_ft.study.intervals.paired_intervals`); ``*`` where it excludes 0.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from continual_ft.report.tables import markdown_table
from continual_ft.study.intervals import B, Interval, RunSample, intervals, mean_std, paired_intervals

__all__ = [
    "Group",
    "group_runs",
    "format_groups",
    "format_significance",
    "bar_values",
    "REFERENCES",
    "SHOWN",
    "NOTE",
]

#: What every configuration is set against.
REFERENCES = ("naive", "joint")
#: Summary keys of :func:`continual_ft.eval.metrics.summary` the tables show, with their headers.
SHOWN = {"acc": "ACC", "bwt": "BWT", "forgetting": "forgetting", "aia": "AIA", "max_drop": "largest drop"}
#: Config keys in which a reference may differ from the configuration it is set against.
STRATEGY_KEYS = ("strategy", "strategy_args", "strategy_settings")


@dataclass
class Group:
    """One configuration: its runs (anything with ``name``, ``run_dir`` and ``results``), one per seed."""

    name: str
    runs: list[Any]
    config: dict | None = None  # the runs' config without seed (None: not known, the run stays alone)
    estimates: dict[str, dict[str, tuple]] = field(default_factory=dict)  # metric -> key -> (mean, std, Interval)
    versus: dict[str, tuple] = field(default_factory=dict)  # reference -> (Group, {key: Interval} | None)
    observed: dict[str, list[dict] | None] = field(default_factory=dict, repr=False)  # metric -> per-seed metrics
    samples: dict[str, list[RunSample] | None] = field(default_factory=dict, repr=False)  # one seed's predictions

    @property
    def seeds(self) -> list:
        return [r.results.get("seed") for r in self.runs]

    @property
    def strategy(self) -> str | None:
        return self.runs[0].results.get("strategy")

    @property
    def primary(self) -> str:
        return self.runs[0].results["primary_metric"]


def group_runs(runs: list, configs: list[dict | None]) -> list[Group]:
    """Runs whose ``configs`` (each run's config without name, output directory and seed) are equal, as one
    configuration each, in first-seen order; then each group's estimates and its differences against
    :data:`REFERENCES`. A run without a config, or one that would repeat a seed, stays on its own."""
    groups: dict[str, Group] = {}
    for run, config in zip(runs, configs):
        key = f"run {run.run_dir}" if config is None else json.dumps(config, sort_keys=True, default=str)
        group = groups.get(key)
        if group is not None and run.results.get("seed") in group.seeds:
            key = f"run {run.run_dir} {len(groups)}"
            group = None
        if group is None:
            group = groups[key] = Group(run.name, [], config)
        group.runs.append(run)
    out = list(groups.values())
    for g in out:
        if len(g.runs) > 1:
            name = re.sub(r"-seed-?\d+(?=-|$)", "", g.runs[0].name)
            g.name = name if name != g.runs[0].name else f"{name} (seeds {', '.join(map(str, g.seeds))})"
        _estimate(g)
    for g in out:
        for ref in REFERENCES:
            other = _reference(g, out, ref)
            if other is not None and other is not g:
                g.versus[ref] = (other, _paired(g, other))
    return out


def _estimate(g: Group) -> None:
    """Mean ± std of each metric, and its interval where every run is complete (an incomplete run's
    last row is not the end of its stream): over seeds, or over the one seed's stored predictions."""
    complete = all(r.results.get("complete") for r in g.runs)
    for metric in dict.fromkeys([g.primary, "macro_f1"]):
        if any(metric not in r.results.get("R", {}) for r in g.runs):
            continue
        observed = [{k: (r.results.get("metrics", {}).get(metric) or {}).get(k) for k in SHOWN} for r in g.runs]
        g.observed[metric] = observed if complete else None
        if complete and len(g.runs) == 1:
            sample = RunSample.from_run(g.runs[0].run_dir, g.runs[0].results, metric)
            g.samples[metric] = None if sample is None else [sample]
        found = intervals(observed, g.samples.get(metric)) if complete else {}
        g.estimates[metric] = {k: (*mean_std([o[k] for o in observed]), found.get(k)) for k in SHOWN}


def _reference(g: Group, groups: list[Group], strategy: str) -> Group | None:
    """The ``strategy`` configuration of the same settings as ``g``, else the only ``strategy`` one there is."""
    candidates = [o for o in groups if o.strategy == strategy]

    def settings(o: Group) -> dict | None:
        return None if o.config is None else {k: v for k, v in o.config.items() if k not in STRATEGY_KEYS}

    same = [o for o in candidates if settings(o) is not None and settings(o) == settings(g)]
    return same[0] if same else candidates[0] if len(candidates) == 1 else None


def _paired(g: Group, ref: Group) -> dict[str, Interval] | None:
    """``g`` − ``ref`` on the primary metric over the seeds both have; None where that cannot be paired
    (with one seed in common: where the two runs' stored predictions are missing or not on the same
    test examples)."""
    a, b = g.observed.get(g.primary), ref.observed.get(g.primary)
    seeds = [s for s in g.seeds if s in ref.seeds]
    if not a or not b or not seeds or ref.primary != g.primary:
        return None
    a = [a[g.seeds.index(s)] for s in seeds]
    b = [b[ref.seeds.index(s)] for s in seeds]
    if len(seeds) > 1:
        return paired_intervals(a, b)
    x, y = _sample(g, seeds[0]), _sample(ref, seeds[0])
    if x is None or y is None or not x.same_examples(y):
        return None
    return paired_intervals(a, b, [x], [y])


def _sample(g: Group, seed: Any) -> RunSample | None:
    """The primary metric's stored predictions of ``g``'s run of ``seed`` (loaded once for a one-seed group)."""
    if len(g.runs) == 1:
        return (g.samples.get(g.primary) or [None])[0]
    run = g.runs[g.seeds.index(seed)]
    return RunSample.from_run(run.run_dir, run.results, g.primary)


def _pct(v: float, sign: bool = False) -> str:
    return f"{100 * v:+.1f}" if sign else f"{100 * v:.1f}"


def _cell(estimate: tuple | None) -> str:
    if estimate is None or estimate[0] is None:
        return "—"
    mean, std, interval = estimate
    text = _pct(mean) + ("" if std is None else f" ± {_pct(std)}")
    if interval is not None and interval.low is not None:
        text += f" [{_pct(interval.low)}, {_pct(interval.high)}]"
    return text


def format_groups(groups: list[Group]) -> str:
    """One row per configuration: each metric as mean ± std over seeds [95% interval], in %."""
    header = ["configuration", "seeds", *(f"{v} (%)" for v in SHOWN.values()), "macro-F1 ACC (%)"]
    rows = [header]
    for g in groups:
        est = g.estimates.get(g.primary, {})
        macro = g.estimates.get("macro_f1", {}).get("acc")
        rows.append([g.name, ", ".join(map(str, g.seeds)), *(_cell(est.get(k)) for k in SHOWN), _cell(macro)])
    return markdown_table(rows, justify="left")


def _difference(interval: Interval | None) -> str:
    if interval is None or interval.value is None or interval.low is None:
        return "—"
    star = " *" if interval.excludes_zero else ""
    return f"{_pct(interval.value, True)} [{_pct(interval.low, True)}, {_pct(interval.high, True)}]{star}"


def format_significance(groups: list[Group]) -> str:
    """Per configuration, its paired differences in ACC and BWT against naive and joint (points), ``*`` where
    the 95% interval excludes 0; empty where no configuration has a reference."""
    refs = [r for r in REFERENCES if any(r in g.versus for g in groups)]
    if not refs:
        return ""
    rows = [["configuration", *(f"{SHOWN[k]} − {r}" for r in refs for k in ("acc", "bwt"))]]
    for g in groups:
        cells = []
        for r in refs:
            _, diff = g.versus.get(r, (None, None))
            cells += [_difference((diff or {}).get(k)) for k in ("acc", "bwt")]
        rows.append([g.name, *cells])
    return markdown_table(rows, justify="left")


def bar_values(groups: list[Group]) -> dict[str, dict[str, tuple]]:
    """``{configuration: {key: (mean, low, high)}}`` on each one's primary metric, for :func:`plots.metric_bars`."""
    out = {}
    for g in groups:
        est = g.estimates.get(g.primary, {})
        out[g.name] = {
            k: (m, *((iv.low, iv.high) if iv is not None else (None, None))) for k, (m, _, iv) in est.items()
        }
    return out


NOTE = (
    "Mean ± standard deviation over seeds, then the 95% Student t interval over seeds: mean ± t_{0.975, n−1} "
    "· std / √n, each seed's metric from its whole test split (the seed also draws the test split, so the "
    "spread over seeds holds test-example sampling too; `continual_ft/study/intervals.py`). "
    f"With one seed the interval covers test-example sampling only (a bootstrap over the test examples, {B} "
    "replicates, fixed generator, from the run's stored predictions), and there is no standard deviation. "
    "Largest drop: the largest fall of any task from its best earlier score to a later row "
    "(`continual_ft/eval/metrics.py`). "
    "Differences: the configuration minus the naive or joint run of the same settings, on the seeds both have, "
    "in points, with a paired t interval over the per-seed differences (with one seed, a bootstrap drawing the "
    "same examples for both); `*`: the interval excludes 0."
)
