"""The generative tasks' metrics against the libraries' own numbers, SQuAD's token F1 worked by hand, the registry's
one-line errors, a missing package named with its install, and an empty gold answer refused."""

from __future__ import annotations

import subprocess
import sys

import pytest
import sacrebleu
from rapidfuzz import fuzz
from rapidfuzz.distance import Indel
from rouge_score import rouge_scorer

from continual_ft.errors import ContinualFTError
from continual_ft.eval import text_metrics as tm

# (prediction, reference): normalisation, case, punctuation, partial overlap, reordering, no overlap, one word.
PAIRS = [
    ("The Cat.", "cat"),
    ("the cat sat on the mat", "A cat sat on a mat."),
    ("Acute bronchitis, unspecified", "Acute bronchitis"),
    ("mat the on sat cat the", "the cat sat on the mat"),
    ("apache-2.0", "Apache-2.0"),
    ("def f(x): return x + 1", "def f(x):\n    return x+1"),
    ("zebra", "licence notice"),
    ("gpl-2.0-plus", "gpl-2.0-plus"),
    ("Infections of the kidneys", "infection of kidney"),  # a stemmer would match these words
]
ROUGE = {"rouge_1": "rouge1", "rouge_2": "rouge2", "rouge_l": "rougeL"}


@pytest.mark.parametrize("prediction,reference", PAIRS)
@pytest.mark.parametrize("name", sorted(ROUGE))
def test_rouge_is_rouge_scores_f_measure_without_stemming(name, prediction, reference):
    kind = ROUGE[name]
    expected = rouge_scorer.RougeScorer([kind], use_stemmer=False).score(reference, prediction)[kind].fmeasure
    assert tm.METRICS[name].score(prediction, reference) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("prediction,reference", PAIRS)
def test_chrf_and_bleu_are_sacrebleus_sentence_scores_over_100(prediction, reference):
    assert tm.chrf(prediction, reference) == pytest.approx(
        sacrebleu.sentence_chrf(prediction, [reference]).score / 100, abs=1e-12
    )
    assert tm.bleu(prediction, reference) == pytest.approx(
        sacrebleu.sentence_bleu(prediction, [reference]).score / 100, abs=1e-12
    )


@pytest.mark.parametrize("prediction,reference", PAIRS)
def test_edit_similarity_is_rapidfuzz_ratio_over_100(prediction, reference):
    assert tm.edit_similarity(prediction, reference) == pytest.approx(fuzz.ratio(prediction, reference) / 100)
    assert tm.edit_similarity(prediction, reference) == pytest.approx(
        Indel.normalized_similarity(prediction, reference)
    )


def test_the_numbers_on_fixed_strings():
    # Pinned, so a library upgrade that moves a score shows up here and not as a silent shift in R.
    p, r = "the cat sat on the mat", "A cat sat on a mat."
    assert tm.rouge_1(p, r) == pytest.approx(2 * (4 / 6) * (4 / 6) / (4 / 6 + 4 / 6))  # cat sat on mat, of 6 each
    assert tm.edit_similarity("kitten", "sitting") == pytest.approx(1 - 5 / 13)  # Indel: 2 deletions + 3 insertions
    assert tm.rouge_2("cat", "cat") == 0.0  # one word has no bigram: rouge-score's definition, kept
    assert tm.rouge_l("Cat.", "cat") == 1.0  # rouge-score lower-cases and drops punctuation...
    assert tm.rouge_l("The Cat.", "cat") == pytest.approx(2 / 3)  # ...but keeps articles: P 1/2, R 1
    assert tm.chrf("The Cat.", "cat") < 1.0 and tm.bleu("The Cat.", "cat") < 1.0  # both are case-sensitive


def test_a_perfect_answer_scores_exactly_one_and_an_empty_one_zero():
    for name in tm.metrics_for("generate"):
        fn = tm.METRICS[name].score
        assert fn("the sum is 37", "the sum is 37") == 1.0, name  # BLEU's 100.00000000000004 clamped
        assert fn("", "the sum is 37") == 0.0, name
        assert type(fn("", "x")) is float, name


def test_several_references_score_the_best_as_the_libraries_do():
    p, refs = "Levi's Stadium", ["Santa Clara, California", "Levi's Stadium in the San Francisco Bay Area"]
    multi = rouge_scorer.RougeScorer(["rougeL"]).score_multi(refs, p)["rougeL"].fmeasure
    assert tm.rouge_l(p, refs) == pytest.approx(multi)
    assert tm.chrf(p, refs) == pytest.approx(sacrebleu.sentence_chrf(p, refs).score / 100)
    assert tm.bleu(p, refs) == pytest.approx(sacrebleu.sentence_bleu(p, refs).score / 100)
    assert tm.edit_similarity(p, refs) == pytest.approx(max(fuzz.ratio(p, r) for r in refs) / 100)
    assert tm.exact_match("levis stadium", refs + ["Levi's Stadium."]) == 1.0


def test_squad_normalisation():
    assert tm.normalize_squad("  The  Cat,\tsat. ") == "cat sat"
    assert tm.normalize_squad("An apple a day; the end!") == "apple day end"
    assert tm.normalize_squad("theory and another") == "theory and another"  # whole words only
    assert tm.exact_match("The Cat.", "cat") == 1.0
    assert tm.exact_match("an Apple!", "apple") == 1.0
    assert tm.exact_match("cats", "cat") == 0.0


def test_token_f1_on_squads_own_examples():
    # SQuAD v1.1 dev, "Where did Super Bowl 50 take place?", its three gold answers. The answer's tokens after
    # normalisation: levis stadium in santa clara (5).
    golds = [
        "Santa Clara, California",  # santa clara california: 2 shared, P 2/5, R 2/3 -> F1 1/2
        "Levi's Stadium",  # levis stadium: 2 shared, P 2/5, R 1 -> F1 4/7
        "Levi's Stadium in the San Francisco Bay Area at Santa Clara, California.",  # 11 tokens, 5 shared -> 5/8
    ]
    answer = "Levi's Stadium in Santa Clara"
    assert tm.token_f1(answer, golds[0]) == pytest.approx(0.5)
    assert tm.token_f1(answer, golds[1]) == pytest.approx(4 / 7)
    assert tm.token_f1(answer, golds[2]) == pytest.approx(2 * 1 * (5 / 11) / (1 + 5 / 11))
    assert tm.token_f1(answer, golds) == pytest.approx(5 / 8)  # the best gold answer
    # "Which NFL team represented the AFC at Super Bowl 50?" gold "Denver Broncos": P 2/3, R 1 -> 0.8.
    assert tm.token_f1("the Denver Broncos team", "Denver Broncos") == pytest.approx(0.8)
    assert tm.token_f1("the the cat cat", "cat") == pytest.approx(2 / 3)  # a bag: the second "cat" is unmatched
    assert tm.token_f1("Carolina Panthers", "Denver Broncos") == 0.0


def test_registry_names_each_metric_with_its_task_types_and_package():
    assert tm.metrics_for("choice") == ["accuracy", "macro_f1", "exact_match"]
    assert tm.metrics_for("generate") == [
        "exact_match",
        "token_f1",
        "rouge_1",
        "rouge_2",
        "rouge_l",
        "chrf",
        "bleu",
        "edit_similarity",
    ]
    for name, metric in tm.METRICS.items():
        assert set(metric.types) <= set(tm.TASK_TYPES) and metric.help, name
        assert (metric.score is None) == ("generate" not in metric.types), name
        assert (metric.package is None) == (metric.module is None), name
    assert {m.package for m in tm.METRICS.values()} == {None, "rouge-score", "sacrebleu", "rapidfuzz"}
    assert [n for n, m in tm.METRICS.items() if not m.per_example] == ["macro_f1"]


def test_unknown_metric_and_wrong_task_type_are_one_line_errors():
    with pytest.raises(ContinualFTError) as e:
        tm.check_metric("rougeL", "generate")
    assert str(e.value) == (
        "unknown metric 'rougeL'; choose from accuracy, bleu, chrf, edit_similarity, exact_match, macro_f1, "
        "rouge_1, rouge_2, rouge_l, token_f1"
    )
    with pytest.raises(ContinualFTError) as e:
        tm.check_metric("accuracy", "generate", where="task 'qa'")
    assert str(e.value) == (
        "task 'qa': metric accuracy does not fit a generative task; choose from bleu, chrf, edit_similarity, "
        "exact_match, rouge_1, rouge_2, rouge_l, token_f1"
    )
    with pytest.raises(ContinualFTError) as e:
        tm.check_metric("rouge_l", "choice")
    assert str(e.value) == "metric rouge_l does not fit a choice task; choose from accuracy, exact_match, macro_f1"
    with pytest.raises(ContinualFTError, match=r"^unknown task type 'gen'; choose from choice, generate$"):
        tm.check_metric("rouge_l", "gen")
    assert tm.check_metric("rouge_l", "generate") is tm.METRICS["rouge_l"]
    assert tm.check_metric("exact_match", "choice") is tm.METRICS["exact_match"]
    with pytest.raises(ContinualFTError, match="metric accuracy does not fit a generative task"):
        tm.score_all(["a"], ["a"], ["accuracy"])


@pytest.mark.parametrize(
    "module,package,metrics",
    [
        ("rouge_score", "rouge-score", ["rouge_1", "rouge_2", "rouge_l"]),
        ("sacrebleu", "sacrebleu", ["chrf", "bleu"]),
        ("rapidfuzz", "rapidfuzz", ["edit_similarity"]),
    ],
)
def test_a_missing_package_names_its_install(monkeypatch, module, package, metrics):
    tm.score_all(["a b"], ["a b"], metrics)  # the library objects built and cached: the check must not rely on them
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    for name in metrics:
        with pytest.raises(ContinualFTError) as e:
            tm.METRICS[name].score("a b", "a b")
        assert str(e.value) == f"{name} needs {package}: pip install {package}"
        with pytest.raises(ContinualFTError, match=f"^{name} needs {package}: pip install {package}$"):
            tm.score_all(["a b"], ["a b"], ["exact_match", name])
    # The other metrics do not need it.
    assert tm.score_all(["a b"], ["a b"], ["exact_match", "token_f1"]) == {"exact_match": [1.0], "token_f1": [1.0]}


def test_the_libraries_are_imported_only_for_their_metrics():
    code = (
        "import sys\n"
        "for m in ('rouge_score', 'sacrebleu', 'rapidfuzz', 'nltk'): sys.modules[m] = None\n"
        "from continual_ft.eval import text_metrics as tm\n"
        "print(tm.score_all(['The Cat.'], ['cat'], ['exact_match', 'token_f1']))\n"
        "try:\n    tm.chrf('a', 'a')\nexcept tm.ContinualFTError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == [
        "{'exact_match': [1.0], 'token_f1': [1.0]}",
        "chrf needs sacrebleu: pip install sacrebleu",
    ]


def test_an_empty_gold_answer_is_refused():
    assert tm.check_reference("37", "task 'qa', test example 3") == "37"
    assert tm.check_reference(["37", "thirty-seven"], "x") == ["37", "thirty-seven"]
    for bad in ("", "  \n\t", [], ["37", " "]):
        with pytest.raises(ContinualFTError) as e:
            tm.check_reference(bad, "task 'qa', test example 3")
        assert str(e.value) == "task 'qa', test example 3: empty gold answer"
    with pytest.raises(ContinualFTError, match="^example 1: empty gold answer$"):
        tm.score_all(["a", "b"], ["a", " "], ["token_f1"])


def test_score_all_gives_each_examples_score_for_each_metric_in_order():
    preds = [p for p, _ in PAIRS]
    refs: list = [r for _, r in PAIRS]
    refs[1] = [refs[1], "a dog"]
    names = ["edit_similarity", "rouge_l", "exact_match", "rouge_1", "bleu", "chrf", "token_f1", "rouge_2"]
    scores = tm.score_all(preds, refs, names)
    assert list(scores) == names
    for name in names:
        fn = tm.METRICS[name].score
        assert scores[name] == pytest.approx([fn(p, r) for p, r in zip(preds, refs)], abs=1e-12), name
        assert all(0.0 <= s <= 1.0 for s in scores[name])
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        tm.score_all(["a", "b"], ["a"], ["exact_match"])


def test_corpus_scores_are_sacrebleus_and_differ_from_the_mean():
    preds = ["the cat sat on the mat", "a dog", "Acute bronchitis"]
    refs = ["the cat sat on a mat", "the dog barked", ["Acute bronchitis, unspecified", "bronchitis"]]
    streams = [["the cat sat on a mat", "the dog barked", "Acute bronchitis, unspecified"], [None, None, "bronchitis"]]
    assert tm.corpus_score("bleu", preds, refs) == pytest.approx(sacrebleu.corpus_bleu(preds, streams).score / 100)
    assert tm.corpus_score("chrf", preds, refs) == pytest.approx(sacrebleu.corpus_chrf(preds, streams).score / 100)
    mean = sum(tm.score_all(preds, refs, ["bleu"])["bleu"]) / 3
    assert tm.corpus_score("bleu", preds, refs) != pytest.approx(mean)
    with pytest.raises(ValueError, match="no corpus-level score for 'rouge_l'"):
        tm.corpus_score("rouge_l", preds, refs)
