"""Metrics on hand-computed matrices (values worked out on paper in the comments)."""

import pytest

from continual_ft.eval import metrics

# rows: before training, after stage 1, 2, 3; columns: tasks learned in stages 1, 2, 3
R = [
    [0.2, 0.1, 0.3],
    [0.8, 0.2, 0.3],
    [0.9, 0.7, 0.4],  # task 0 peaks after stage 2, not right after it was trained
    [0.6, 0.5, 0.9],
]
FIRST = [1, 2, 3]


def test_average_accuracy():
    assert metrics.average_accuracy(R, FIRST) == pytest.approx((0.6 + 0.5 + 0.9) / 3)


def test_backward_transfer():
    # task 0: 0.6 - 0.8 = -0.2 ; task 1: 0.5 - 0.7 = -0.2
    assert metrics.backward_transfer(R, FIRST) == pytest.approx(-0.2)


def test_forward_transfer_against_zero_shot_row():
    # task 1: R[1][1] - R[0][1] = 0.1 ; task 2: R[2][2] - R[0][2] = 0.1
    assert metrics.forward_transfer(R, FIRST) == pytest.approx(0.1)


def test_forgetting_is_max_based_not_first_minus_last():
    # task 0: max(0.8, 0.9) - 0.6 = 0.3 ; task 1: 0.7 - 0.5 = 0.2
    assert metrics.forgetting(R, FIRST) == pytest.approx(0.25)
    first_minus_last = ((0.8 - 0.6) + (0.7 - 0.5)) / 2
    assert first_minus_last == pytest.approx(0.2)
    assert metrics.forgetting(R, FIRST) != pytest.approx(first_minus_last)


def test_multitask_stage_and_undefined_metrics():
    # stage 1 trains tasks a and b together, stage 2 trains c
    R2 = [[0.1, 0.2, 0.3], [0.7, 0.8, 0.4], [0.5, 0.8, 0.9]]
    s = metrics.summary(R2, [1, 1, 2])
    assert s["acc"] == pytest.approx((0.5 + 0.8 + 0.9) / 3)
    assert s["bwt"] == pytest.approx(((0.5 - 0.7) + (0.8 - 0.8)) / 2)
    assert s["fwt"] == pytest.approx(0.4 - 0.3)
    assert s["forgetting"] == pytest.approx((0.2 + 0.0) / 2)
    assert s["max_drop"] == pytest.approx(0.2) and s["aia"] == pytest.approx(
        ((0.7 + 0.8) / 2 + (0.5 + 0.8 + 0.9) / 3) / 2
    )
    joint = metrics.summary([[0.1, 0.2], [0.6, 0.7]], [1, 1])
    assert joint["bwt"] is None and joint["fwt"] is None and joint["forgetting"] is None
    assert joint["max_drop"] is None and joint["aia"] == pytest.approx(0.65)


def test_bad_shapes_raise():
    with pytest.raises(ValueError):
        metrics.summary([[0.1, 0.2]], [1, 1])
    with pytest.raises(ValueError):
        metrics.summary([[0.1], [0.2]], [2])


def test_average_incremental_accuracy_means_each_stage_over_the_tasks_seen_so_far():
    # stage 1: task 0 only, 0.8 ; stage 2: (0.9 + 0.7) / 2 = 0.8 ; stage 3: (0.6 + 0.5 + 0.9) / 3
    expected = (0.8 + 0.8 + 2.0 / 3) / 3
    assert metrics.average_incremental_accuracy(R, FIRST) == pytest.approx(expected)
    assert metrics.summary(R, FIRST)["aia"] == pytest.approx(expected)


def test_largest_drop_is_from_the_best_earlier_value_to_any_later_row():
    # task 0: 0.8, 0.9, 0.6 -> 0.9 - 0.6 ; task 1: 0.7, 0.5 -> 0.2 ; task 2: trained last, nothing after it
    drops = metrics.largest_drops(R, FIRST)
    assert drops[0] == pytest.approx(0.3) and drops[1] == pytest.approx(0.2) and drops[2] is None
    assert metrics.summary(R, FIRST)["max_drop"] == pytest.approx(0.3)
    # a task that only ever improves has dropped by nothing (not by a negative amount)
    assert metrics.largest_drops([[0.1, 0.1], [0.5, 0.2], [0.9, 0.8]], [1, 2]) == [0.0, None]


def test_a_collapse_in_the_middle_that_recovers_shows_in_the_largest_drop_not_in_bwt():
    # task 0 collapses after stage 2 and comes back when the related task 2 is trained in stage 3
    Rc = [
        [0.1, 0.1, 0.1],
        [0.8, 0.1, 0.1],
        [0.2, 0.7, 0.1],
        [0.8, 0.7, 0.9],
    ]
    s = metrics.summary(Rc, FIRST)
    assert s["bwt"] == pytest.approx(((0.8 - 0.8) + (0.7 - 0.7)) / 2) == 0  # the final row hides it
    assert s["forgetting"] == pytest.approx(0.0)
    assert metrics.largest_drops(Rc, FIRST)[:2] == [pytest.approx(0.6), pytest.approx(0.0)]
    assert s["max_drop"] == pytest.approx(0.6)
    # AIA pays for the collapse: stage 2 averages (0.2 + 0.7) / 2 where the final row alone has no dip
    assert s["aia"] == pytest.approx((0.8 + 0.45 + 0.8) / 3)
    no_dip = [row[:] for row in Rc]
    no_dip[2][0] = 0.8
    assert metrics.summary(no_dip, FIRST)["aia"] > s["aia"] and metrics.summary(no_dip, FIRST)["max_drop"] == 0
