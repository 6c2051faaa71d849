"""Generative tasks: the task type and its checks, greedy batched decoding against ``model.generate``, scoring."""

from __future__ import annotations

import json

import pytest
import torch

from continual_ft.data.tasks import Example, Task, TaskSpec, build_task
from continual_ft.errors import ContinualFTError
from continual_ft.eval.generative import answer_budget, evaluate_generative, greedy_answers
from continual_ft.eval.scoring import evaluate_task
from continual_ft.model.loading import load_model
from continual_ft.train.batching import Encoder
from continual_ft.train.generation import end_ids


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _free_text(path, n=200):
    """Answers that are nearly all distinct: "The sum is 37." for two numbers."""
    return _write(path, [{"text": f"What is {i} + {i % 7}?", "label": f"The sum is {i + i % 7}."} for i in range(n)])


def test_free_text_answers_without_a_type_stop_with_one_line(tmp_path):
    spec = TaskSpec(name="qa", source="jsonl", path=str(_free_text(tmp_path / "qa.jsonl")))
    with pytest.raises(
        ContinualFTError, match=r"200 distinct answers in 200 examples: give labels: .* or type: generate"
    ):
        build_task(spec)


def test_a_generative_task_keeps_every_answer_and_its_metrics(tmp_path):
    spec = TaskSpec(name="qa", source="jsonl", path=str(_free_text(tmp_path / "qa.jsonl")), type="generate")
    task = build_task(spec)
    assert task.generative and task.labels == []
    assert task.metrics == ("rouge_l", "exact_match", "token_f1", "chrf") and task.metric == "rouge_l"
    assert all(ex.answer.startswith("The sum is") for ex in task.train + task.test)
    own = TaskSpec(
        name="qa", source="jsonl", path=str(tmp_path / "qa.jsonl"), type="generate", metrics=["chrf", "bleu"]
    )
    assert build_task(own).metric == "chrf"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"metrics": ["rougeL"]}, r"unknown metric 'rougeL'; choose from: accuracy, .*edit_similarity"),
        (
            {"metrics": ["accuracy"]},
            r"accuracy does not fit a task of type generate; choose from: exact_match, token_f1",
        ),
        ({"labels": ["a", "b"]}, r"a task of type: generate writes its answer; give no labels:"),
        ({"max_new_tokens": 0}, r"max_new_tokens.*must be a positive integer, got 0"),
        ({"metric": "bleu"}, r"'bleu' is not one of this task's metrics: rouge_l, exact_match, token_f1, chrf"),
        ({"type": "write"}, r"unknown task type 'write'; choose from: choice, generate"),
        ({"stop": [""]}, r"stop.*must be a list of non-empty strings"),
    ],
)
def test_bad_generative_fields_are_one_line_errors(tmp_path, fields, message):
    fields = {"type": "generate", **fields}
    with pytest.raises(ContinualFTError, match=message):
        TaskSpec(name="qa", source="jsonl", path=str(_free_text(tmp_path / "qa.jsonl")), **fields)


def test_choice_only_settings_refused_on_a_choice_task(tmp_path):
    with pytest.raises(ContinualFTError, match=r"max_new_tokens.*applies to type: generate"):
        TaskSpec(name="qa", source="jsonl", path=str(_free_text(tmp_path / "qa.jsonl")), labels=["x"], max_new_tokens=4)


def test_an_empty_gold_answer_is_refused(tmp_path):
    path = _write(tmp_path / "qa.jsonl", [{"text": f"q{i}", "label": "" if i == 3 else f"a{i}"} for i in range(50)])
    with pytest.raises(ContinualFTError, match=r"line 4.*empty gold answer in field 'label'"):
        build_task(TaskSpec(name="qa", source="jsonl", path=str(path), type="generate"))


def test_a_built_in_source_gives_its_answer_field_to_a_generative_task():
    spec = TaskSpec(
        name="cat", source="icd10", type="generate", label_field="category", sizes={"train": 20, "test": 10}
    )
    task = build_task(spec)
    everything = build_task(spec, sample=False)
    assert "Type 2 diabetes mellitus" in {
        ex.answer for ex in everything.train + everything.validation + everything.test
    }
    assert len({ex.answer for ex in task.train}) > 10  # titles of many categories, not 8 chapters
    with pytest.raises(ContinualFTError, match=r"label_field.*does not apply to the built-in source icd10"):
        TaskSpec(name="cat", source="icd10", label_field="category")


def _prompts(tokenizer, n=9):
    texts = [f"Question {i}: " + "words " * (i % 5) + "answer?" for i in range(n)]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def test_greedy_batched_answers_equal_one_generate_call_per_example():
    torch.manual_seed(0)
    model, tok = load_model("tiny", seed=0)
    model.eval()
    prompts = _prompts(tok)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    ours, _ = greedy_answers(model, tok, prompts, order, max_new_tokens=12, batch_size=4)
    ends = end_ids(model, tok)
    for p, got in zip(prompts, ours):
        with torch.no_grad():
            out = model.generate(
                torch.tensor([p]),
                attention_mask=torch.ones(1, len(p), dtype=torch.long),
                do_sample=False,
                max_new_tokens=12,
                pad_token_id=tok.pad_token_id,
                eos_token_id=sorted(ends),
            )
        new = out[0, len(p) :].tolist()
        while new and new[-1] in ends:  # generate keeps the end token (and pads after it); we drop it
            new.pop()
        assert got == new


def _memorise(tmp_path):
    rows = [{"text": f"item {i}", "label": f"answer {i % 3}"} for i in range(60)]
    spec = TaskSpec(
        name="qa",
        source="jsonl",
        path=str(_write(tmp_path / "qa.jsonl", rows)),
        type="generate",
        metrics=["exact_match", "chrf", "rouge_l"],
    )
    return build_task(spec)


def test_generative_scores_each_example_by_every_metric(tmp_path):
    torch.manual_seed(0)
    model, tok = load_model("tiny", seed=0)
    task = _memorise(tmp_path)
    encoder = Encoder(tok, 64, chat_template=False)
    score = evaluate_task(model, encoder, task, batch_size=4)
    assert score.accuracy is None and set(score.scores) == {"exact_match", "chrf", "rouge_l"}
    assert len(score.predictions) == len(task.test)
    for m, mean in score.scores.items():
        per = [p["scores"][m] for p in score.predictions]
        assert mean == pytest.approx(sum(per) / len(per), abs=1e-3)
    assert all(p["gold"] == ex.answer for p, ex in zip(score.predictions, task.test))
    assert answer_budget(encoder, task) == max(len(encoder.answer_ids(e.answer)) for e in task.train) + 8


def test_a_stop_string_ends_the_answer(tmp_path):
    torch.manual_seed(0)
    model, tok = load_model("tiny", seed=0)
    task = _memorise(tmp_path)
    encoder = Encoder(tok, 64, chat_template=False)
    free = evaluate_generative(model, encoder, task, batch_size=4)
    first = next(p["answer"] for p in free.predictions if len(p["answer"]) > 2)
    cut = Task(**{**task.__dict__, "stop": (first[1],)})
    stopped = evaluate_generative(model, encoder, cut, batch_size=4)
    assert all(p["answer"].count(first[1]) <= 1 for p in stopped.predictions)
    assert sum(len(p["answer"]) for p in stopped.predictions) < sum(len(p["answer"]) for p in free.predictions)


def test_an_example_of_a_choice_task_is_unchanged():
    task = Task("t", ["yes", "no"], [Example("t", "q", "yes")], [], [Example("t", "q", "yes")])
    assert not task.generative and task.metric == "accuracy"


def test_the_task_schema_and_the_metric_registry_agree():
    from continual_ft.data.spec import METRIC_TYPES, TASK_TYPES
    from continual_ft.eval import text_metrics

    assert TASK_TYPES == text_metrics.TASK_TYPES
    assert METRIC_TYPES == {name: m.types for name, m in text_metrics.METRICS.items()}


def test_length_fit_counts_cut_prompts_and_answers_that_fill_the_budget():
    from continual_ft.model.loading import tiny_tokenizer
    from continual_ft.train.batching import length_fit

    tok = tiny_tokenizer()
    encoder = Encoder(tok, 24, chat_template=False)
    short = Example("t", "q?", "a")
    long_prompt = Example("t", "word " * 40 + "?", "a")
    long_answer = Example("t", "q?", "word " * 40)
    fit = length_fit(encoder, [short, long_prompt, long_answer])
    assert (fit.examples, fit.cut, fit.too_long) == (3, 2, 1)
    wide = Encoder(tok, fit.fits_all, chat_template=False)
    assert length_fit(wide, [short, long_prompt, long_answer]).cut == 0


def _mixed_scenario(root):
    """A choice task, then a generative one whose answers are free text (the new user's case)."""
    root.mkdir(parents=True, exist_ok=True)
    _write(
        root / "colors.jsonl", [{"text": f"the {c} thing {i}", "label": c} for i, c in enumerate(["red", "blue"] * 40)]
    )
    _free_text(root / "qa.jsonl", n=120)
    (root / "mixed.yaml").write_text(
        """description: a choice task, then a generative one
tasks:
  colors:
    source: jsonl
    path: colors.jsonl
    prompt: "Color of: {text}\\nAnswer:"
    labels: [red, blue]
    sizes: {train: 16, validation: 4, test: 8}
  qa:
    source: jsonl
    path: qa.jsonl
    type: generate
    prompt: "{text}\\nAnswer:"
    metrics: [rouge_l, exact_match, chrf]
    sizes: {train: 16, validation: 4, test: 8}
stages:
  - {name: colors, tasks: [colors]}
  - {name: qa, tasks: [qa]}
"""
    )
    return root / "mixed.yaml"


def _tiny_run(scenario, tmp_path, *extra):
    from continual_ft.config import make_config
    from continual_ft.run.runner import run
    from continual_ft.strategies import STRATEGIES

    overrides = [f"scenario={scenario}", "model=tiny", "precision=fp32", "train.max_steps=2", "train.batch_size=4"]
    return run(make_config([*overrides, f"output_dir={tmp_path / 'runs'}", *extra], tuple(STRATEGIES)), progress=False)


def test_a_mixed_stream_keeps_an_r_per_metric_and_scores_by_each_tasks_primary(tmp_path):
    from continual_ft.eval.predictions import load_row
    from continual_ft.report.results import load_results

    results = _tiny_run(_mixed_scenario(tmp_path / "data"), tmp_path)
    d = load_results(results.run_dir)
    assert d["primary_metric"] == "primary"
    assert list(d["R"]) == ["accuracy", "exact_match", "macro_f1", "rouge_l", "chrf", "primary"]
    assert all(len(rows) == 3 for rows in d["R"].values())
    for row in range(3):
        assert d["R"]["accuracy"][row][1] is None and d["R"]["rouge_l"][row][0] is None
        assert d["R"]["primary"][row] == [d["R"]["accuracy"][row][0], d["R"]["rouge_l"][row][1]]
    assert set(d["metrics"]) == set(d["R"]) and "qa" not in d["largest_drop"]["accuracy"]
    assert all(set(p) == {"colors"} for p in d["per_class"])  # per class: the choice task only
    preds = load_row(results.run_dir, 2)["qa"]
    assert len(preds) == 8 and set(preds[0]["scores"]) == {"rouge_l", "exact_match", "chrf"}
    mean = sum(p["scores"]["rouge_l"] for p in preds) / len(preds)
    assert d["R"]["rouge_l"][2][1] == pytest.approx(mean, abs=1e-3)
    assert (results.run_dir / "forgetting_matrix_rouge_l.png").is_file()


def test_the_cli_refuses_an_unknown_metric_in_one_line_and_writes_nothing(tmp_path, capsys):
    from continual_ft.cli import main

    path = _mixed_scenario(tmp_path / "data")
    path.write_text(path.read_text().replace("metrics: [rouge_l, exact_match, chrf]", "metrics: [rougeL]"))
    with pytest.raises(SystemExit) as stop:
        main(["run", f"scenario={path}", "model=tiny", f"output_dir={tmp_path / 'runs'}"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "unknown metric 'rougeL'" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()
