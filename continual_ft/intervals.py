"""Confidence intervals over seeds and test examples, from the stored per-example predictions.

A configuration run with seeds s_1..s_n has, per seed, task and row of R, a score per test example
(:func:`continual_ft.predictions.correct`; for macro-F1 the gold and chosen labels). One bootstrap
replicate b:

1. draw n seeds from s_1..s_n with replacement;
2. for each drawn seed and each task t, draw n_t of its test examples with replacement, the same
   ones in every row of R (every row scored the same examples);
3. recompute that seed's R* from the drawn examples and its metrics m(R*)
   (:func:`continual_ft.metrics.summary`), and average them over the n draws: θ*_b.

The 95% interval is [q_2.5, q_97.5] of θ*_1..θ*_B, B = 1000 (the percentile bootstrap; Efron &
Tibshirani 1993, ch. 13), drawn from a generator with a fixed seed, so the same runs always give
the same report. Resampling seeds and then examples covers both sources of noise: the seed (data
order, initialisation, which examples each split holds) and the finite test split. Resampling at
both levels is conservative: the examples' noise also moves the seed means, so it is counted twice
(variance at most 2x, Davison & Hinkley 1997 §3.8); with 2–5 seeds, resampling the seeds alone would
give a handful of distinct values and no usable interval. With one seed step 1 always draws it, and
the interval covers the test examples only.

A paired difference θ_A − θ_B (a strategy against naive or joint) draws seeds from those both were
run with, and the same examples for both (one seed gives one test split): noise the two share
cancels. It is significant at the 5% level where its interval excludes 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from continual_ft import metrics, predictions

__all__ = ["RunSample", "Interval", "bootstrap", "paired_bootstrap", "mean_std", "B", "LEVEL"]

B = 1000  # bootstrap replicates
LEVEL = 0.95
SEED = 0  # the generator's seed: a report's intervals are reproducible


@dataclass
class RunSample:
    """One run's per-example scores on one metric: ``scores[t]`` is (rows, n_t), per-example scores
    in [0, 1] (``accuracy``, ``exact_match``) or chosen label indices (``macro_f1``, with ``gold[t]``)."""

    metric: str
    first: list[int]
    gold: list[np.ndarray]
    scores: list[np.ndarray]

    @classmethod
    def from_run(cls, run_dir: Path, results: dict, metric: str) -> RunSample | None:
        """From a run's stored predictions; ``None`` where the run has none (or no labels to score them)."""
        rows = predictions.load_all(run_dir, results)
        if rows is None or (metric == "exact_match" and "labels" not in results):
            return None
        tasks, gold, scores = results["tasks"], [], []
        for t in tasks:
            gold.append(np.array([p["gold"] for p in rows[0][t]]))
            if metric == "macro_f1":
                scores.append(np.array([[p["chosen"] for p in row[t]] for row in rows]))
            else:
                labels = results.get("labels", {}).get(t, [])
                scores.append(np.stack([predictions.correct(row[t], metric, labels) for row in rows]))
        return cls(metric, list(results["first_stage"]), gold, scores)

    def R(self, idx: list[np.ndarray] | None = None) -> np.ndarray:
        """R recomputed from the examples ``idx[t]`` (m, n_t) picks: (m, rows, tasks); all examples once
        when ``idx`` is None: (1, rows, tasks)."""
        idx = idx or [np.arange(len(g))[None] for g in self.gold]
        columns = []
        for gold, scores, pick in zip(self.gold, self.scores, idx):
            if self.metric == "macro_f1":
                columns.append(predictions.macro_f1(gold[pick][None], scores[:, pick]))  # (rows, m)
            else:
                columns.append(scores[:, pick].mean(-1))
        return np.stack(columns, -1).transpose(1, 0, 2)

    def summary(self) -> dict[str, float | None]:
        return metrics.summary(self.R()[0].tolist(), self.first)

    def same_examples(self, other: RunSample) -> bool:
        return len(self.gold) == len(other.gold) and all(np.array_equal(a, b) for a, b in zip(self.gold, other.gold))


@dataclass
class Interval:
    value: float | None  # the estimate: mean over seeds (of a difference, for a paired one)
    low: float | None
    high: float | None

    @property
    def excludes_zero(self) -> bool:
        return self.low is not None and (self.low > 0 or self.high < 0)


def _replicates(units: list[tuple[RunSample, ...]], n_boot: int, seed: int) -> list[dict[str, np.ndarray]]:
    """θ*_b of each member of the units (one unit per seed; members share the drawn examples):
    per member, ``{metric key: (n_boot,)}``; NaN where a metric is undefined."""
    rng = np.random.default_rng(seed)
    n, width = len(units), len(units[0])
    draws = rng.integers(n, size=(n_boot, n))
    values: list[dict[str, np.ndarray]] = [{} for _ in range(width)]
    for u, unit in enumerate(units):
        where = np.argwhere(draws == u)
        if not len(where):
            continue
        idx = [rng.integers(len(g), size=(len(where), len(g))) for g in unit[0].gold]
        for member, sample in zip(values, unit):
            for (b, k), R in zip(where, sample.R(idx)):
                for key, v in metrics.summary(R.tolist(), sample.first).items():
                    member.setdefault(key, np.full((n_boot, n), np.nan))[b, k] = np.nan if v is None else v
    return [{key: v.mean(1) for key, v in member.items()} for member in values]


def _interval(value: float | None, thetas: np.ndarray, level: float) -> Interval:
    if value is None or np.isnan(thetas).any():
        return Interval(value, None, None)
    low, high = np.percentile(thetas, [50 * (1 - level), 50 * (1 + level)])
    return Interval(value, float(low), float(high))


def mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and standard deviation (n − 1) over seeds; std ``None`` with one seed, both with a missing value."""
    if not values or any(v is None for v in values):
        return None, None
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else None
    return mean, std


def bootstrap(samples: list[RunSample], n_boot: int = B, level: float = LEVEL, seed: int = SEED) -> dict[str, Interval]:
    """Each metric of :func:`continual_ft.metrics.summary`, mean over ``samples`` (one per seed), with its
    bootstrap interval over seeds and test examples."""
    observed = [s.summary() for s in samples]
    thetas = _replicates([(s,) for s in samples], n_boot, seed)[0]
    return {key: _interval(mean_std([o[key] for o in observed])[0], thetas[key], level) for key in observed[0]}


def paired_bootstrap(
    a: list[RunSample], b: list[RunSample], n_boot: int = B, level: float = LEVEL, seed: int = SEED
) -> dict[str, Interval]:
    """Each metric's difference A − B, mean over seeds, with its paired bootstrap interval; ``a[i]`` and
    ``b[i]`` are runs of the same seed, scored on the same test examples."""
    if len(a) != len(b) or not all(x.same_examples(y) for x, y in zip(a, b)):
        raise ValueError("a paired bootstrap needs runs of the same seeds on the same test examples")
    obs_a, obs_b = [s.summary() for s in a], [s.summary() for s in b]
    theta_a, theta_b = _replicates(list(zip(a, b)), n_boot, seed)
    out = {}
    for key in obs_a[0]:
        diffs = [None if x[key] is None or y[key] is None else x[key] - y[key] for x, y in zip(obs_a, obs_b)]
        out[key] = _interval(mean_std(diffs)[0], theta_a[key] - theta_b[key], level)
    return out
