"""Per-example scores of generated text against its gold answer(s), and the registry of metric names.

Every score lies in [0, 1]; with several references an example scores its best one (as SQuAD, rouge-score's
``score_multi`` and sacrebleu's multi-reference scores do). An R cell is the mean of its examples' scores,
which is what ``predictions/row<i>.jsonl`` keeps and what a bootstrap resamples (``macro_f1``, a choice
metric, is the one that is not a mean: see :attr:`Metric.per_example`).

* ``exact_match``: 1 if the answer equals a reference after SQuAD v1.1 normalisation (lower case, no
  punctuation, no articles a/an/the, whitespace collapsed), else 0.
* ``token_f1``: F1 of the bag of normalised tokens, 2·P·R / (P + R) with P = |common| / |answer| and
  R = |common| / |reference| (SQuAD v1.1; 0 when nothing is in common).
* ``rouge_1`` / ``rouge_2`` / ``rouge_l``: rouge-score's F-measure of unigrams, bigrams, longest common
  subsequence.
* ``chrf`` / ``bleu``: sacrebleu's sentence chrF (character 6-grams, β = 2) and BLEU (exp smoothing, effective
  order, as ``sacrebleu.sentence_bleu``), divided by 100.
* ``edit_similarity``: rapidfuzz's ``fuzz.ratio`` / 100 = 1 − Indel distance / (|answer| + |reference|), which
  is how TRACE scores code completion (fuzzywuzzy's ``fuzz.ratio``, minus its rounding to an integer percent).

The three libraries are imported when one of their metrics is first asked for, so a missing one stops only the
runs that need it, with the line that installs it.
"""

from __future__ import annotations

import importlib
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache

from continual_ft.errors import ContinualFTError

__all__ = [
    "TASK_TYPES",
    "Metric",
    "METRICS",
    "normalize_squad",
    "exact_match",
    "token_f1",
    "rouge_1",
    "rouge_2",
    "rouge_l",
    "chrf",
    "bleu",
    "edit_similarity",
    "metrics_for",
    "check_metric",
    "require",
    "check_reference",
    "score_all",
    "corpus_score",
]

#: ``choice``: the model picks one of the task's labels; ``generate``: it writes its answer.
TASK_TYPES = ("choice", "generate")
_TYPE_WORDS = {"choice": "a choice task", "generate": "a generative task"}


def _refs(references: str | Sequence[str]) -> Sequence[str]:
    return (references,) if isinstance(references, str) else references


# SQuAD v1.1's official evaluation script (evaluate-v1.1.py, https://rajpurkar.github.io/SQuAD-explorer/):
# normalize_answer, exact_match_score and f1_score, with the max over references of metric_max_over_ground_truths.
_PUNCTUATION = str.maketrans("", "", string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_squad(text: str) -> str:
    """SQuAD v1.1's answer normalisation: lower case, punctuation removed, articles a/an/the removed,
    whitespace collapsed to single spaces."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


def exact_match(prediction: str, references: str | Sequence[str]) -> float:
    """1.0 if ``prediction`` equals a reference after :func:`normalize_squad`, else 0.0."""
    answer = normalize_squad(prediction)
    return float(any(answer == normalize_squad(ref) for ref in _refs(references)))


def _f1(answer: list[str], reference: list[str]) -> float:
    same = sum((Counter(answer) & Counter(reference)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(answer), same / len(reference)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, references: str | Sequence[str]) -> float:
    """SQuAD v1.1 token F1 against the best reference: 2·P·R / (P + R) over the bags of normalised tokens."""
    answer = normalize_squad(prediction).split()
    return max(_f1(answer, normalize_squad(ref).split()) for ref in _refs(references))


# Without the Porter stemmer: TRACE's ROUGE-L (the `rouge` package) and Hugging Face evaluate's default do not
# stem, and an answer is then credited only for the words it wrote ("infections" does not match "infection").
# rouge-score's tokenizer keeps only [a-z0-9] after lower-casing: text in other scripts scores 0 (use chrf there).
_ROUGE_TYPES = {"rouge_1": "rouge1", "rouge_2": "rouge2", "rouge_l": "rougeL"}


@cache
def _rouge_scorer(types: tuple[str, ...]):
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(types), use_stemmer=False)


def _rouge(types: tuple[str, ...], prediction: str, references: str | Sequence[str]) -> dict[str, float]:
    """F-measure of each rouge-score type in ``types``, each at its best reference."""
    scorer, refs = _rouge_scorer(types), _refs(references)
    scores = scorer.score(refs[0], prediction) if len(refs) == 1 else scorer.score_multi(refs, prediction)
    return {t: float(scores[t].fmeasure) for t in types}  # an answer with no [a-z0-9] token gets an int 0


def rouge_1(prediction: str, references: str | Sequence[str]) -> float:
    """rouge-score ROUGE-1 F-measure (unigram overlap), no stemming."""
    require("rouge_1")
    return _rouge(("rouge1",), prediction, references)["rouge1"]


def rouge_2(prediction: str, references: str | Sequence[str]) -> float:
    """rouge-score ROUGE-2 F-measure (bigram overlap), no stemming."""
    require("rouge_2")
    return _rouge(("rouge2",), prediction, references)["rouge2"]


def rouge_l(prediction: str, references: str | Sequence[str]) -> float:
    """rouge-score ROUGE-L F-measure (longest common subsequence of tokens), no stemming."""
    require("rouge_l")
    return _rouge(("rougeL",), prediction, references)["rougeL"]


@cache
def _sacrebleu(name: str):
    from sacrebleu.metrics import BLEU, CHRF

    # Made once: building a metric object sets up its tokenizer, which costs more than scoring one sentence.
    # Sentence BLEU takes sacrebleu.sentence_bleu's effective order (a one-word answer can score); corpus BLEU
    # takes corpus_bleu's default, without it.
    return {"chrf": CHRF, "bleu": lambda: BLEU(effective_order=True), "bleu_corpus": BLEU}[name]()


def _percent(score: float) -> float:
    # BLEU goes through exp(mean log precision): a perfect answer comes out as 100.00000000000004.
    return min(score / 100, 1.0)


def _chrf(prediction: str, references: str | Sequence[str]) -> float:
    return _percent(_sacrebleu("chrf").sentence_score(prediction, list(_refs(references))).score)


def _bleu(prediction: str, references: str | Sequence[str]) -> float:
    return _percent(_sacrebleu("bleu").sentence_score(prediction, list(_refs(references))).score)


def chrf(prediction: str, references: str | Sequence[str]) -> float:
    """sacrebleu sentence chrF (character n-grams up to 6, β = 2, case-sensitive) / 100."""
    require("chrf")
    return _chrf(prediction, references)


def bleu(prediction: str, references: str | Sequence[str]) -> float:
    """sacrebleu sentence BLEU (13a tokenizer, exp smoothing, effective order) / 100."""
    require("bleu")
    return _bleu(prediction, references)


def _ratio(prediction: str, references: str | Sequence[str]) -> float:
    from rapidfuzz import fuzz

    return max(fuzz.ratio(prediction, ref) for ref in _refs(references)) / 100


def edit_similarity(prediction: str, references: str | Sequence[str]) -> float:
    """rapidfuzz ``fuzz.ratio`` / 100 against the best reference: 1 − Indel distance / (|prediction| + |reference|),
    on characters, case-sensitive (TRACE's code-completion score)."""
    require("edit_similarity")
    return _ratio(prediction, references)


@dataclass(frozen=True)
class Metric:
    """A metric a task may name in ``metrics:`` or ``metric:``."""

    help: str
    types: tuple[str, ...]
    #: ``(prediction, references) -> [0, 1]``; ``None`` for the choice metrics, scored from the chosen labels
    #: in :mod:`continual_ft.eval.predictions`.
    score: Callable[[str, str | Sequence[str]], float] | None = None
    package: str | None = None  #: what ``pip install`` takes
    module: str | None = None  #: what Python imports
    #: The R cell is the mean of per-example scores; ``macro_f1`` is computed over the whole test set instead.
    per_example: bool = True


_GEN = ("generate",)
METRICS: dict[str, Metric] = {
    "accuracy": Metric("the chosen label is the gold one (log-likelihood over the labels)", ("choice",)),
    "macro_f1": Metric("mean over classes of the F1 of the chosen labels", ("choice",), per_example=False),
    "exact_match": Metric(
        "the answer equals the gold one after SQuAD normalisation (on a choice task: the greedy answer against "
        "the gold label, as continual_ft.eval.scoring normalises it)",
        ("choice", "generate"),
        exact_match,
    ),
    "token_f1": Metric("F1 of the answer's words against the gold one's (SQuAD)", _GEN, token_f1),
    "rouge_1": Metric("ROUGE-1 F-measure: shared words", _GEN, rouge_1, "rouge-score", "rouge_score"),
    "rouge_2": Metric("ROUGE-2 F-measure: shared word pairs", _GEN, rouge_2, "rouge-score", "rouge_score"),
    "rouge_l": Metric(
        "ROUGE-L F-measure: longest common word subsequence", _GEN, rouge_l, "rouge-score", "rouge_score"
    ),
    "chrf": Metric("chrF: character n-gram F-score (any script)", _GEN, chrf, "sacrebleu", "sacrebleu"),
    "bleu": Metric("sentence BLEU: word n-gram precision", _GEN, bleu, "sacrebleu", "sacrebleu"),
    "edit_similarity": Metric(
        "1 - character edit distance, normalised (TRACE's code score)", _GEN, edit_similarity, "rapidfuzz", "rapidfuzz"
    ),
}


#: The scores without the package check, for score_all's loop over examples (it checks once).
_UNCHECKED = {"chrf": _chrf, "bleu": _bleu, "edit_similarity": _ratio}


def metrics_for(task_type: str) -> list[str]:
    """The metric names that fit ``task_type`` (``choice`` or ``generate``)."""
    _check_type(task_type)
    return [name for name, m in METRICS.items() if task_type in m.types]


def _check_type(task_type: str) -> None:
    if task_type not in TASK_TYPES:
        raise ContinualFTError(f"unknown task type {task_type!r}; choose from {', '.join(TASK_TYPES)}")


def check_metric(name: str, task_type: str, where: str | None = None) -> Metric:
    """The metric called ``name``, or a one-line error when there is none or it does not fit ``task_type``.

    ``where`` (``"task 'qa'"``) opens the message."""
    head = f"{where}: " if where else ""
    fits = metrics_for(task_type)
    if name not in METRICS:
        raise ContinualFTError(f"{head}unknown metric {name!r}; choose from {', '.join(sorted(METRICS))}")
    if name not in fits:
        raise ContinualFTError(
            f"{head}metric {name} does not fit {_TYPE_WORDS[task_type]}; choose from {', '.join(sorted(fits))}"
        )
    return METRICS[name]


def require(name: str) -> None:
    """A one-line error naming the install when the package metric ``name`` needs cannot be imported."""
    metric = METRICS[name]
    if metric.module is None:
        return
    try:
        importlib.import_module(metric.module)
    except ImportError as e:
        raise ContinualFTError(f"{name} needs {metric.package}: pip install {metric.package}") from e


def check_reference(text: str | Sequence[str], where: str) -> str | Sequence[str]:
    """``text`` itself, or a one-line error when a gold answer is empty or only whitespace (it would score
    every answer the same way, or not at all). ``where`` names it: ``"task 'qa', test example 12"``."""
    refs = _refs(text)
    if not refs or any(not isinstance(ref, str) or not ref.strip() for ref in refs):
        raise ContinualFTError(f"{where}: empty gold answer")
    return text


def score_all(
    predictions: Sequence[str], references: Sequence[str | Sequence[str]], metrics: Sequence[str]
) -> dict[str, list[float]]:
    """Per-example scores, ``{metric: [score of example i]}``, for generated ``predictions`` against their
    ``references`` (each one string, or several: an example scores its best).

    The library objects are built once and shared by all examples; the rouge metrics asked for are computed in
    one pass, so each text is tokenised once."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    for name in metrics:
        check_metric(name, "generate")
        require(name)
    for i, ref in enumerate(references):
        check_reference(ref, f"example {i}")
    out: dict[str, list[float]] = {}
    rouge = tuple(dict.fromkeys(_ROUGE_TYPES[m] for m in metrics if m in _ROUGE_TYPES))
    if rouge:
        rows = [_rouge(rouge, p, r) for p, r in zip(predictions, references)]
        out.update({m: [row[t] for row in rows] for m, t in _ROUGE_TYPES.items() if t in rouge})
    for name in metrics:
        if name not in out:
            fn = _UNCHECKED.get(name, METRICS[name].score)
            out[name] = [fn(p, r) for p, r in zip(predictions, references)]
    return {name: out[name] for name in metrics}


def corpus_score(name: str, predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """sacrebleu's corpus-level ``chrf`` or ``bleu`` / 100: n-gram statistics summed over the test set before the
    ratio, not the mean of sentence scores (which is what an R cell holds). For reporting next to R only."""
    if name not in ("chrf", "bleu"):
        raise ValueError(f"no corpus-level score for {name!r}: it is the mean of its per-example scores")
    require(name)
    refs = [list(_refs(r)) for r in references]
    width = max((len(r) for r in refs), default=1)
    # sacrebleu takes one stream per reference position; a missing reference is None.
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(width)]
    metric = _sacrebleu("bleu_corpus" if name == "bleu" else name)
    return _percent(metric.corpus_score(list(predictions), streams).score)
