"""Continual-learning metrics computed from the accuracy matrix R.

R has one row per evaluation point and one column per task: row 0 is the model before any
training (zero-shot), row i the model after stage i (i = 1..S). ``first[j]`` is the stage
(1-based) that first trains task j, so stages may hold one task (sequential) or several
(multi-task). With S stages and N tasks:

* ACC  = 1/N Σ_j R[S][j]                                  final average accuracy
* BWT  = 1/|P| Σ_{j∈P} (R[S][j] − R[first_j][j])           backward transfer (Lopez-Paz & Ranzato 2017)
* FWT  = 1/|Q| Σ_{j∈Q} (R[first_j − 1][j] − R[0][j])       forward transfer, against the zero-shot row
* F    = 1/|P| Σ_{j∈P} (max_{l∈[first_j, S−1]} R[l][j] − R[S][j])   forgetting (Chaudhry et al. 2018)
* AIA  = 1/S Σ_{i=1..S} 1/|T_i| Σ_{j∈T_i} R[i][j]           average incremental accuracy (Rebuffi et al. 2017)
* D_j  = max(0, max_{first_j ≤ l < m ≤ S} (R[l][j] − R[m][j]))  task j's largest drop anywhere along the stream
* Dmax = max_{j∈P} D_j                                        the largest drop of any task

where P = {j : first_j < S} (tasks learned before the last stage) and Q = {j : first_j > 1}
(tasks that had an earlier stage to benefit from), T_i = {j : first_j ≤ i} (tasks seen by
stage i). A metric over an empty set is ``None``: a single joint stage has no backward transfer
to speak of. Negative BWT means forgetting.

BWT and F look at the last row only (F through its max, at one drop from the peak to the end):
a task that collapses in the middle of the stream and comes back when a related task is trained
later looks fine in both. AIA averages every stage, and D_j is the worst fall from any earlier
best to any later row, recovered or not.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "average_accuracy",
    "backward_transfer",
    "forward_transfer",
    "forgetting",
    "average_incremental_accuracy",
    "largest_drops",
    "summary",
]

Matrix = Sequence[Sequence[float]]


def _check(R: Matrix, first: Sequence[int]) -> int:
    S = len(R) - 1
    if S < 1:
        raise ValueError("R needs a zero-shot row and at least one stage row")
    if any(len(row) != len(first) for row in R):
        raise ValueError("every row of R needs one entry per task")
    if any(not 1 <= f <= S for f in first):
        raise ValueError(f"first-trained stages must lie in 1..{S}, got {list(first)}")
    return S


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def average_accuracy(R: Matrix, first: Sequence[int]) -> float:
    """ACC = 1/N Σ_j R[S][j]."""
    S = _check(R, first)
    return sum(R[S]) / len(R[S])


def backward_transfer(R: Matrix, first: Sequence[int]) -> float | None:
    """BWT = mean over tasks learned before the last stage of R[S][j] − R[first_j][j]."""
    S = _check(R, first)
    return _mean([R[S][j] - R[f][j] for j, f in enumerate(first) if f < S])


def forward_transfer(R: Matrix, first: Sequence[int]) -> float | None:
    """FWT = mean over tasks not learned in stage 1 of R[first_j − 1][j] − R[0][j]."""
    _check(R, first)
    return _mean([R[f - 1][j] - R[0][j] for j, f in enumerate(first) if f > 1])


def forgetting(R: Matrix, first: Sequence[int]) -> float | None:
    """F = mean over tasks learned before the last stage of max_{first_j ≤ l < S} R[l][j] − R[S][j].

    Max-based (Chaudhry et al. 2018): a task that peaked after a later stage and then
    dropped counts its drop from the peak, not from where it was right after training.
    """
    S = _check(R, first)
    return _mean([max(R[l][j] for l in range(f, S)) - R[S][j] for j, f in enumerate(first) if f < S])


def average_incremental_accuracy(R: Matrix, first: Sequence[int]) -> float:
    """AIA = 1/S Σ_{i=1..S} (mean of R[i][j] over the tasks j with first_j ≤ i).

    The mean, over stages, of the accuracy on the tasks seen so far (Rebuffi et al. 2017, iCaRL):
    a collapse after any stage lowers it, even when the last row has recovered.
    """
    S = _check(R, first)
    seen = [[R[i][j] for j, f in enumerate(first) if f <= i] for i in range(1, S + 1)]
    seen = [row for row in seen if row]  # every stage trains a task, so only hand-made ``first`` skips one
    return sum(sum(row) / len(row) for row in seen) / len(seen)


def largest_drops(R: Matrix, first: Sequence[int]) -> list[float | None]:
    """Per task, D_j = max(0, max_{first_j ≤ l < m ≤ S} R[l][j] − R[m][j]): the largest fall from the best
    value so far to any later row, from the stage that first trains j on; ``None`` for a task first
    trained in the last stage (nothing comes after it)."""
    S = _check(R, first)
    drops = []
    for j, f in enumerate(first):
        if f == S:
            drops.append(None)
            continue
        best, drop = R[f][j], 0.0
        for m in range(f + 1, S + 1):
            drop = max(drop, best - R[m][j])
            best = max(best, R[m][j])
        drops.append(drop)
    return drops


def summary(R: Matrix, first: Sequence[int]) -> dict[str, float | None]:
    """The scalar metrics, keyed ``acc``, ``bwt``, ``fwt``, ``forgetting``, ``aia`` and ``max_drop``
    (the largest of the tasks' :func:`largest_drops`)."""
    drops = [d for d in largest_drops(R, first) if d is not None]
    return {
        "acc": average_accuracy(R, first),
        "bwt": backward_transfer(R, first),
        "fwt": forward_transfer(R, first),
        "forgetting": forgetting(R, first),
        "aia": average_incremental_accuracy(R, first),
        "max_drop": max(drops) if drops else None,
    }
