"""Per-example predictions: the stored file format, per-class precision and recall, macro-F1."""

import json

import numpy as np
import pytest

from continual_ft.eval import predictions


def test_majority_label_predictor_scores_high_accuracy_and_low_macro_f1():
    # 80 of 100 test examples are class 0 (think 907 Permissive against 163 Copyleft licenses)
    gold = [0] * 80 + [1] * 12 + [2] * 8
    chosen = [0] * 100
    accuracy = np.mean(np.array(gold) == np.array(chosen))
    f1 = predictions.macro_f1(gold, chosen)
    assert accuracy == pytest.approx(0.8)
    # F1_0 = 2·0.8 / (1 + 0.8); classes 1 and 2 are gold but never chosen: F1 = 0
    assert f1 == pytest.approx(2 * 0.8 / 1.8 / 3)
    assert f1 < 0.3 < accuracy
    assert predictions.macro_f1(gold, gold) == 1.0


def test_per_class_precision_and_recall():
    labels = ["Permissive", "Copyleft", "Proprietary"]
    gold = [0, 0, 0, 1, 1]
    chosen = [0, 0, 1, 1, 0]
    pc = predictions.per_class(gold, chosen, labels)
    assert pc["Permissive"] == {"precision": 2 / 3, "recall": 2 / 3, "n": 3}
    assert pc["Copyleft"] == {"precision": 1 / 2, "recall": 1 / 2, "n": 2}
    assert pc["Proprietary"] == {"precision": None, "recall": None, "n": 0}  # never gold, never chosen
    # macro-F1 averages the classes that occur: (2/3 + 1/2) / 2; Proprietary does not count as a 0
    assert predictions.macro_f1(gold, chosen) == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_macro_f1_vectorised_over_resamples_equals_one_at_a_time():
    rng = np.random.default_rng(0)
    gold = rng.integers(3, size=(5, 40))
    chosen = np.where(rng.random((5, 40)) < 0.6, gold, rng.integers(3, size=(5, 40)))
    one_by_one = [predictions.macro_f1(g, c) for g, c in zip(gold, chosen)]
    assert predictions.macro_f1(gold, chosen) == pytest.approx(one_by_one)


def test_row_file_round_trip_is_compact_one_line_per_example(tmp_path):
    preds = {
        "legal": [{"gold": 1, "chosen": 0, "loglik": [-0.5, -2.25], "answer": "Permissive"}] * 3,
        "medical": [{"gold": 0, "chosen": 0, "loglik": [-0.1, -4.0], "answer": "yes ü"}] * 2,
    }
    path = predictions.write_row(tmp_path, 2, preds)
    assert path == tmp_path / "predictions" / "row2.jsonl"
    lines = path.read_text().splitlines()
    assert len(lines) == 5 and " " not in lines[0] and json.loads(lines[3])["task"] == "medical"
    assert predictions.load_row(tmp_path, 2) == preds
    results = {"rows": ["before training", "after legal", "after medical"]}
    assert predictions.load_all(tmp_path, results) is None  # rows 0 and 1 have none
    assert [p.name for p in (tmp_path / "predictions").iterdir()] == ["row2.jsonl"]  # no temporary file left


def test_correct_per_example_for_accuracy_and_exact_match():
    labels = ["yes", "no"]
    preds = [
        {"gold": 0, "chosen": 0, "answer": " Yes.\nbecause"},
        {"gold": 1, "chosen": 0, "answer": "no"},
        {"gold": 1, "chosen": 1, "answer": "maybe"},
    ]
    assert predictions.correct(preds, "accuracy", labels).tolist() == [1.0, 0.0, 1.0]
    assert predictions.correct(preds, "exact_match", labels).tolist() == [1.0, 1.0, 0.0]
    with pytest.raises(ValueError):
        predictions.correct(preds, "macro_f1", labels)
