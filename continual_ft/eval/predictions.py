"""Per-example predictions, stored for every row of R, and the class-level scores they give.

A run writes ``predictions/row<i>.jsonl`` for row i of R (0 = before training): one compact JSON
line per test example, tasks in the run's order, examples in test-split order::

    {"task": "legal", "gold": 2, "chosen": 0, "loglik": [-1.93, -4.1, -2.2], "answer": "Permissive"}

``gold`` and ``chosen`` index the task's labels (``results.json``'s ``labels``), ``loglik`` is each
label's Σ log p given the prompt, ``answer`` the greedy answer. Intervals (:mod:`continual_ft.study.intervals`)
and any later analysis start from these files, not from the summary in R.

Per class k of a task, with tp_k the examples of class k chosen as k:

* precision_k = tp_k / #{chosen = k}        (``None`` when k is never chosen)
* recall_k    = tp_k / #{gold = k}          (``None`` when k is not in the test split)
* F1_k        = 2 tp_k / (#{chosen = k} + #{gold = k})
* macro-F1    = 1/|K| Σ_{k∈K} F1_k,  K = the classes that are gold or chosen at least once

A model that answers the majority label m everywhere scores accuracy p (m's share of the test
split), but F1_m = 2p / (1 + p) and F1 = 0 on every other class: macro-F1 = 2p / ((1 + p)|K|).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from continual_ft.eval.scoring import normalize_answer
from continual_ft.files import atomic_write

__all__ = ["row_file", "write_row", "load_row", "load_all", "per_class", "macro_f1", "correct"]

FOLDER = "predictions"


def row_file(run_dir: Path, row: int) -> Path:
    return Path(run_dir) / FOLDER / f"row{row}.jsonl"


def write_row(run_dir: Path, row: int, predictions: dict[str, list[dict]]) -> Path:
    """Write row ``row``'s predictions ``{task: [per example]}`` atomically, one compact line each."""
    lines = [
        json.dumps({"task": task, **p}, separators=(",", ":"), ensure_ascii=False)
        for task, preds in predictions.items()
        for p in preds
    ]
    path = row_file(run_dir, row)
    atomic_write(path, "".join(line + "\n" for line in lines))
    return path


def load_row(run_dir: Path, row: int) -> dict[str, list[dict]]:
    """``{task: [per example]}`` of one row, in file order."""
    out: dict[str, list[dict]] = {}
    for line in row_file(run_dir, row).read_text().splitlines():
        p = json.loads(line)
        out.setdefault(p.pop("task"), []).append(p)
    return out


def load_all(run_dir: Path, results: dict) -> list[dict[str, list[dict]]] | None:
    """Every row's predictions, or ``None`` when a row has none stored (a run from before they were)."""
    rows = range(len(results["rows"]))
    if not all(row_file(run_dir, i).is_file() for i in rows):
        return None
    return [load_row(run_dir, i) for i in rows]


def _counts(gold: np.ndarray, chosen: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """tp, #chosen and #gold of class ``k`` along the last axis."""
    g, c = gold == k, chosen == k
    return (g & c).sum(-1), c.sum(-1), g.sum(-1)


def macro_f1(gold, chosen) -> np.ndarray | float:
    """Macro-F1 along the last axis of ``gold``/``chosen`` (label indices; they broadcast), over the classes
    that are gold or chosen at least once in each slice."""
    gold, chosen = np.broadcast_arrays(np.asarray(gold, dtype=np.int64), np.asarray(chosen, dtype=np.int64))
    shape, n = gold.shape[:-1], gold.shape[-1]
    k = int(max(gold.max(initial=0), chosen.max(initial=0))) + 1
    slices = int(np.prod(shape))
    offset = (np.arange(slices) * k)[:, None]  # one block of k counters per slice: a bincount counts them all
    g, c = (gold.reshape(slices, n) + offset).ravel(), (chosen.reshape(slices, n) + offset).ravel()
    n_gold, n_chosen = (np.bincount(x, minlength=slices * k).reshape(slices, k) for x in (g, c))
    tp = np.bincount(g, weights=(g == c), minlength=slices * k).reshape(slices, k)
    seen = n_gold + n_chosen
    f1 = np.where(seen > 0, 2 * tp / np.maximum(seen, 1), 0.0).sum(-1) / np.maximum((seen > 0).sum(-1), 1)
    return float(f1[0]) if not shape else f1.reshape(shape)


def per_class(gold: Sequence[int], chosen: Sequence[int], labels: Sequence[str]) -> dict[str, dict]:
    """``{label: {"precision", "recall", "n"}}`` for every label (``n``: its gold examples)."""
    gold, chosen = np.asarray(gold), np.asarray(chosen)
    out = {}
    for k, label in enumerate(labels):
        tp, n_chosen, n_gold = (int(x) for x in _counts(gold, chosen, k))
        out[label] = {
            "precision": tp / n_chosen if n_chosen else None,
            "recall": tp / n_gold if n_gold else None,
            "n": n_gold,
        }
    return out


def correct(predictions: list[dict], metric: str, labels: Sequence[str]) -> np.ndarray:
    """Per example, its score in [0, 1] under ``metric``: on a choice task 1.0 where it scores (``accuracy``:
    the chosen label is gold; ``exact_match``: the greedy answer is the gold label, as
    :func:`continual_ft.eval.scoring.normalize_answer` compares them), else 0.0; on a generative task the score
    its row stored for ``metric`` (rouge_l 0.67, ...)."""
    if predictions and "scores" in predictions[0]:
        if metric not in predictions[0]["scores"]:
            raise ValueError(f"no per-example score for {metric!r}")
        return np.array([p["scores"][metric] for p in predictions], dtype=float)
    if metric == "accuracy":
        return np.array([p["chosen"] == p["gold"] for p in predictions], dtype=float)
    if metric == "exact_match":
        return np.array(
            [normalize_answer(p["answer"]) == normalize_answer(labels[p["gold"]]) for p in predictions], dtype=float
        )
    raise ValueError(f"no per-example score for {metric!r}")
