"""Bootstrap intervals over seeds and test examples, on synthetic predictions with a known truth."""

import numpy as np
import pytest

from continual_ft.intervals import RunSample, bootstrap, mean_std, paired_bootstrap

# true per-example accuracy after each row (rows) on each task (columns); task 0 trained in stage 1, task 1 in 2
TRUTH = np.array([[0.3, 0.2], [0.8, 0.3], [0.6, 0.9]])
FIRST = [1, 2]
TRUE_ACC = TRUTH[-1].mean()  # 0.75
TRUE_BWT = TRUTH[2, 0] - TRUTH[1, 0]  # -0.2


def synthetic(rng, n: int, truth=TRUTH) -> RunSample:
    """One seed's run: every test example right with its row's and task's true probability."""
    scores = [(rng.random((len(truth), n)) < truth[:, t, None]).astype(float) for t in range(truth.shape[1])]
    return RunSample("accuracy", FIRST, [np.zeros(n, int)] * truth.shape[1], scores)


def test_interval_covers_the_truth_at_about_the_stated_rate():
    rng = np.random.default_rng(1)
    covered = {"acc": 0, "bwt": 0}
    trials = 40
    for _ in range(trials):
        seeds = [synthetic(rng, 100) for _ in range(3)]
        iv = bootstrap(seeds, n_boot=300)
        covered["acc"] += iv["acc"].low <= TRUE_ACC <= iv["acc"].high
        covered["bwt"] += iv["bwt"].low <= TRUE_BWT <= iv["bwt"].high
    assert covered["acc"] / trials >= 0.85 and covered["bwt"] / trials >= 0.85


def test_interval_shrinks_with_more_test_examples_and_more_seeds():
    rng = np.random.default_rng(2)

    def width(n, seeds):
        iv = bootstrap([synthetic(rng, n) for _ in range(seeds)], n_boot=500)["acc"]
        return iv.high - iv.low

    small, large = width(50, 2), width(800, 2)
    assert large < small / 2.5  # ~1/√16 = 1/4 in theory
    # 8 seeds hold 8x the examples: 1/√8 of the width for examples alone; resampling the seeds as well
    # counts the examples' noise a second time through the seed means (at most √2 wider), hence ~1/2
    assert width(100, 8) < width(100, 1) / 1.5


def test_interval_is_reproducible_and_centred_on_the_mean_over_seeds():
    rng = np.random.default_rng(3)
    seeds = [synthetic(rng, 60) for _ in range(3)]
    a, b = bootstrap(seeds), bootstrap(seeds)
    assert a == b  # a fixed generator: the same report every time
    assert bootstrap(seeds, seed=1)["acc"] != a["acc"]  # and it does resample
    per_seed = [s.summary()["acc"] for s in seeds]
    assert a["acc"].value == pytest.approx(np.mean(per_seed))
    assert a["acc"].low < a["acc"].value < a["acc"].high
    assert mean_std(per_seed)[1] == pytest.approx(np.std(per_seed, ddof=1))
    assert mean_std([0.5]) == (0.5, None)


def test_single_seed_still_gets_an_interval_over_test_examples():
    iv = bootstrap([synthetic(np.random.default_rng(4), 200)])["acc"]
    assert iv.low < iv.value < iv.high and iv.high - iv.low > 0.02


def test_paired_difference_detects_a_real_gap_and_not_a_null_one():
    rng = np.random.default_rng(5)
    better = TRUTH.copy()
    better[-1] += 0.08  # +8 points on both tasks in the final row: ACC + 0.08, BWT + 0.08
    a = [synthetic(rng, 300, better) for _ in range(3)]
    b = [synthetic(rng, 300) for _ in range(3)]
    same = [synthetic(rng, 300) for _ in range(3)]
    gap = paired_bootstrap(a, b)["acc"]
    assert gap.excludes_zero and gap.low < 0.08 < gap.high
    null = paired_bootstrap(same, b)["acc"]
    assert not null.excludes_zero


def test_pairing_cancels_the_noise_two_runs_share():
    rng = np.random.default_rng(6)
    a = [synthetic(rng, 150) for _ in range(3)]
    b = []
    for s in a:  # the same answers except a few examples in the final row
        scores = [x.copy() for x in s.scores]
        scores[0][-1, :4] = 1 - scores[0][-1, :4]
        b.append(RunSample("accuracy", FIRST, s.gold, scores))
    paired = paired_bootstrap(a, b)["acc"]
    alone = bootstrap(a)["acc"]
    assert paired.high - paired.low < (alone.high - alone.low) / 3


def test_paired_runs_must_share_their_test_examples():
    rng = np.random.default_rng(7)
    a = [synthetic(rng, 20)]
    other = synthetic(rng, 20)
    other.gold = [g + 1 for g in other.gold]
    with pytest.raises(ValueError, match="same test examples"):
        paired_bootstrap(a, [other])


def test_macro_f1_interval_from_labels():
    rng = np.random.default_rng(8)
    n = 200
    gold = rng.integers(3, size=n)
    rows = np.stack([np.where(rng.random(n) < p, gold, rng.integers(3, size=n)) for p in (0.1, 0.9, 0.7)])
    sample = RunSample("macro_f1", FIRST, [gold, gold], [rows, rows])
    iv = bootstrap([sample], n_boot=300)["acc"]
    assert 0.6 < iv.low < iv.value < iv.high < 0.95
