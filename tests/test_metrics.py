"""Metrics on hand-computed matrices (values worked out on paper in the comments)."""

import pytest

from continual_ft import metrics

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
    joint = metrics.summary([[0.1, 0.2], [0.6, 0.7]], [1, 1])
    assert joint["bwt"] is None and joint["fwt"] is None and joint["forgetting"] is None


def test_bad_shapes_raise():
    with pytest.raises(ValueError):
        metrics.summary([[0.1, 0.2]], [1, 1])
    with pytest.raises(ValueError):
        metrics.summary([[0.1], [0.2]], [2])
