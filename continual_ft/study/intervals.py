"""Confidence intervals: over seeds from each seed's metrics; with one seed, over its test examples.

A configuration run with seeds s_1..s_n has, per seed, its metrics θ_1..θ_n (ACC, BWT, ...:
:func:`continual_ft.eval.metrics.summary` of that seed's R, every test example counted once). The seed
sets the initialisation, the data order and which groups form the test split (``data.split_of``
hashes seed and group), so θ_i = θ + the seed's effect + its test split's sampling error, independent
across seeds, and their spread s² = 1/(n−1) Σ_i (θ_i − θ̄)² holds both sources of noise at once.

* n ≥ 2 seeds: the Student t interval (Student 1908)

      θ̄ ± t_{(1+level)/2, n−1} · s / √n

  exact when the θ_i are normal, and close when they are means of 100+ test examples each;
  t_{0.975, n−1} is 4.30 at 3 seeds, 2.78 at 5 (:func:`t_quantile`).
* A paired difference θ_A − θ_B (a configuration against naive or joint): d_i = θ_A,i − θ_B,i on the
  seeds both were run with, and the same interval over d_1..d_n (the paired t interval). The same
  seed gives both the same test examples, so noise the two share cancels in d_i. It is significant
  at the 5% level where the interval excludes 0, the two-sided paired t test.
* n = 1: there is no seed level. A percentile bootstrap over the test examples (Efron & Tibshirani
  1993, ch. 13): B = 1000 replicates, each drawing n_t of every task's test examples with replacement
  (the same ones in every row of R), recomputing R and the metrics from the stored per-example
  predictions (:class:`RunSample`); the interval is [q_2.5, q_97.5], from a generator with a fixed
  seed. It covers test-example sampling only: another seed would move the run by more. A paired
  difference draws the same examples for both runs.

Why not the two-level bootstrap used before (seeds with replacement, then each drawn seed's test
examples): at n = 3 drawing seeds with replacement sees the plug-in variance (n−1)/n · σ² and its
percentiles behave like normal quantiles (1.96 where t_{0.975, 2} is 4.30), the "narrowness bias" of
the percentile bootstrap in small samples (Hesterberg 2015; Davison & Hinkley 1997, ch. 5);
resampling the examples as well (counting their noise twice) does not make up for it once seeds
really differ. In the simulation of ``tests/test_intervals.py`` (seed effects plus per-example noise,
200 of its trials) its "95%" interval covered the truth 80–87% of the time at 3 seeds (89–92% at 5)
and called a true paired difference of 0 significant 20–25% of the time (10–13% at 5); the t interval
covers 94.6–95.4% and errs 4.8–5.2% (its 2,000 and 5,000 trials). Treating the seed, with the split
it draws, as the unit whose variance is measured is Bouthillier et al. (2021).

References: Student, "The probable error of a mean", Biometrika 6 (1908). B. Efron & R. Tibshirani,
An Introduction to the Bootstrap (1993). A. C. Davison & D. V. Hinkley, Bootstrap Methods and their
Application (1997). T. Hesterberg, "What teachers should know about the bootstrap", The American
Statistician 69 (2015). X. Bouthillier et al., "Accounting for variance in machine learning
benchmarks", MLSys (2021).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from continual_ft.eval import metrics, predictions

__all__ = [
    "RunSample",
    "Interval",
    "intervals",
    "paired_intervals",
    "t_interval",
    "student_t",
    "t_quantile",
    "mean_std",
    "B",
    "LEVEL",
]

B = 1000  # bootstrap replicates (one seed)
LEVEL = 0.95
SEED = 0  # the bootstrap generator's seed: a report's intervals are reproducible


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
        # ``primary``: each task by its own primary metric; a metric some task is not scored by has no sample
        own = {t: results["task_primary"][t] if metric == "primary" else metric for t in tasks}
        if any(own[t] not in results.get("task_metrics", {}).get(t, [own[t]]) for t in tasks):
            return None
        if (metric == "macro_f1" and results.get("task_types")) or (metric == "primary" and "macro_f1" in own.values()):
            return None  # macro-F1 beside other metrics in one R: no per-example sample to draw
        for t in tasks:
            gold.append(np.array([p["gold"] for p in rows[0][t]]))
            if metric == "macro_f1":
                scores.append(np.array([[p["chosen"] for p in row[t]] for row in rows]))
            else:
                labels = results.get("labels", {}).get(t, [])
                scores.append(np.stack([predictions.correct(row[t], own[t], labels) for row in rows]))
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


def mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and standard deviation (n − 1) over seeds; std ``None`` with one seed, both with a missing value."""
    if not values or any(v is None for v in values):
        return None, None
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else None
    return mean, std


def _t_two_sided(t: float, df: int) -> float:
    """P(|T| ≤ t) for Student's t with ``df`` degrees of freedom, by the finite series of Abramowitz &
    Stegun 26.7.3-4 (θ = atan(t/√df)): odd df 2/π (θ + sinθ cosθ Σ_k a_k cos^{2k}θ), even df sinθ Σ_k b_k cos^{2k}θ."""
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    term, total = 1.0, 1.0
    if df % 2:
        for k in range(1, (df - 1) // 2):  # a_k = (2·4···2k) / (3·5···(2k+1))
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        return 2 / math.pi * (theta + (math.sin(theta) * math.cos(theta) * total if df > 1 else 0.0))
    for k in range(1, df // 2):  # b_k = (1·3···(2k−1)) / (2·4···2k)
        term *= c2 * (2 * k - 1) / (2 * k)
        total += term
    return math.sin(theta) * total


@lru_cache
def t_quantile(p: float, df: int) -> float:
    """The p quantile (p > 0.5) of Student's t with ``df`` ≥ 1 degrees of freedom: bisection on
    :func:`_t_two_sided`, to 1e-12."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError("t_quantile needs 0.5 < p < 1 and df >= 1")
    target, low, high = 2 * p - 1, 0.0, 1.0
    while _t_two_sided(high, df) < target:
        high *= 2
    while high - low > 1e-12 * max(1.0, high):
        mid = (low + high) / 2
        low, high = (mid, high) if _t_two_sided(mid, df) < target else (low, mid)
    return (low + high) / 2


def student_t(mean: float | None, std: float | None, n: int, level: float = LEVEL) -> Interval:
    """mean ± t_{(1+level)/2, n−1} · std / √n; no bounds with fewer than 2 values or a missing one."""
    if mean is None or std is None or n < 2:
        return Interval(mean, None, None)
    half = t_quantile((1 + level) / 2, n - 1) * std / math.sqrt(n)
    return Interval(mean, mean - half, mean + half)


def t_interval(values: list[float | None], level: float = LEVEL) -> Interval:
    """The t interval over per-seed values (each seed's metric on its whole test split)."""
    return student_t(*mean_std(values), len(values), level)


def _example_replicates(unit: tuple[RunSample, ...], n_boot: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Each member's metrics on ``n_boot`` resamples of the test examples, the same examples for every
    member (runs of one seed): per member ``{metric key: (n_boot,)}``, NaN where a metric is undefined."""
    rng = np.random.default_rng(seed)
    idx = [rng.integers(len(g), size=(n_boot, len(g))) for g in unit[0].gold]
    out = []
    for sample in unit:
        values: dict[str, np.ndarray] = {}
        for b, R in enumerate(sample.R(idx)):
            for key, v in metrics.summary(R.tolist(), sample.first).items():
                values.setdefault(key, np.full(n_boot, np.nan))[b] = np.nan if v is None else v
        out.append(values)
    return out


def _percentile(value: float | None, thetas: np.ndarray | None, level: float) -> Interval:
    if value is None or thetas is None or np.isnan(thetas).any():
        return Interval(value, None, None)
    low, high = np.percentile(thetas, [50 * (1 - level), 50 * (1 + level)])
    return Interval(value, float(low), float(high))


def _difference(x: float | None, y: float | None) -> float | None:
    return None if x is None or y is None else x - y


def intervals(
    observed: list[dict[str, float | None]],
    samples: list[RunSample] | None = None,
    n_boot: int = B,
    level: float = LEVEL,
    seed: int = SEED,
) -> dict[str, Interval]:
    """Each metric of ``observed`` (one :func:`metrics.summary` dict per seed), mean over seeds, with its
    t interval over seeds; with one seed, the bootstrap interval over ``samples[0]``'s test examples
    (no bounds without ``samples``)."""
    if len(observed) > 1:
        return {key: t_interval([o.get(key) for o in observed], level) for key in observed[0]}
    thetas = _example_replicates((samples[0],), n_boot, seed)[0] if samples else {}
    return {key: _percentile(v, thetas.get(key), level) for key, v in observed[0].items()}


def paired_intervals(
    observed_a: list[dict[str, float | None]],
    observed_b: list[dict[str, float | None]],
    a: list[RunSample] | None = None,
    b: list[RunSample] | None = None,
    n_boot: int = B,
    level: float = LEVEL,
    seed: int = SEED,
) -> dict[str, Interval]:
    """Each metric's difference A − B, mean over seeds, with its paired t interval; ``observed_a[i]`` and
    ``observed_b[i]`` are runs of the same seed. With one seed, a paired bootstrap over the test examples
    of ``a[0]`` and ``b[0]``, which must be the same examples (no bounds without them)."""
    if len(observed_a) != len(observed_b) or not observed_a:
        raise ValueError("a paired interval needs runs of the same seeds")
    diffs = [{k: _difference(x[k], y.get(k)) for k in x} for x, y in zip(observed_a, observed_b)]
    if len(diffs) > 1:
        return {key: t_interval([d[key] for d in diffs], level) for key in diffs[0]}
    if not a or not b:
        return {key: Interval(v, None, None) for key, v in diffs[0].items()}
    if not a[0].same_examples(b[0]):
        raise ValueError("a paired bootstrap needs runs of the same seed on the same test examples")
    theta_a, theta_b = _example_replicates((a[0], b[0]), n_boot, seed)
    return {
        key: _percentile(v, theta_a[key] - theta_b[key] if key in theta_a and key in theta_b else None, level)
        for key, v in diffs[0].items()
    }
