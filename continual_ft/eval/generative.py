"""Scoring a generative task: the model writes each answer, greedy, and every metric of the task scores it.

Decoding is :func:`continual_ft.train.generation.sample` at temperature 0 over batches of prompts of
similar length (little padding): the tokens every prompt of a batch starts with (chat template, the
task's instruction) are prefilled once, each row leaves the batch and the KV cache as soon as it ends
(end of sequence, a ``stop`` string, or ``max_new_tokens``), so a short answer never waits for a long
one. The answers are those of one ``model.generate(do_sample=False)`` call per example, token for token
(``tests/test_generative.py``); ``bench/decode.py`` times the two.

``max_new_tokens`` defaults to the longest training answer of the task in tokens plus
:data:`MARGIN`, at most :data:`CAP`: enough for any answer the task trains, little wasted on a
model that would ramble. The per-example scores of every metric go into the row's predictions, so
intervals resample them (:mod:`continual_ft.study.intervals`).
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch

from continual_ft.data.tasks import Task
from continual_ft.eval import text_metrics
from continual_ft.eval.score import TaskScore, length_batches, test_prompts
from continual_ft.train.batching import Encoder
from continual_ft.train.distributed import Dist
from continual_ft.train.generation import sample

__all__ = ["evaluate_generative", "answer_budget", "greedy_answers", "MARGIN", "CAP"]

MARGIN = 8  # tokens beyond the longest training answer
CAP = 256  # tokens at most, whatever the training answers


def answer_budget(encoder: Encoder, task: Task) -> int:
    """The task's ``max_new_tokens``, or the longest training answer in tokens (end of text included) + MARGIN."""
    if task.max_new_tokens:
        return task.max_new_tokens
    longest = max((len(encoder.answer_ids(ex.answer, eos=True)) for ex in task.train), default=32)
    return min(longest + MARGIN, CAP)


@torch.inference_mode()
def greedy_answers(
    model,
    tokenizer,
    prompts: list[list[int]],
    order: list[int],
    *,
    max_new_tokens: int,
    batch_size: int,
    stop: tuple[str, ...] = (),
    autocast=nullcontext,
) -> tuple[list[list[int]], int]:
    """Greedy new tokens for the prompts ``order`` lists (length-sorted), and the tokens fed to the model."""
    out: list[list[int]] = [[] for _ in prompts]
    tokens = 0
    for idx in length_batches(order, [len(p) for p in prompts], max_new_tokens, batch_size):
        with autocast():
            new = sample(model, [prompts[i] for i in idx], max_new_tokens, tokenizer=tokenizer, stop=stop)
        for i, ids in zip(idx, new):
            out[i] = ids
            tokens += len(prompts[i]) + len(ids)
    return out, tokens


def evaluate_generative(
    model,
    encoder: Encoder,
    task: Task,
    *,
    batch_size: int = 16,
    autocast=None,
    dist: Dist | None = None,
) -> TaskScore:
    """Generate an answer to every test example and score it with each of ``task.metrics``.

    Over several processes each rank decodes its share of the length-sorted examples and the
    answers are gathered, as :func:`continual_ft.eval.scoring.evaluate_task` does.
    """
    start = time.perf_counter()
    answers, tokens = _answers(model, encoder, task, batch_size, autocast or nullcontext, dist)
    seconds = time.perf_counter() - start
    if dist is not None and dist.world > 1:
        seconds = dist.broadcast(seconds)
    gold = [ex.answer for ex in task.test]
    per_example = text_metrics.score_all(answers, gold, list(task.metrics))
    predictions = [
        {"gold": g, "answer": a, "scores": {m: round(per_example[m][i], 4) for m in task.metrics}}
        for i, (g, a) in enumerate(zip(gold, answers))
    ]
    means = {m: sum(v) / len(v) for m, v in per_example.items()}
    return TaskScore(
        accuracy=None,
        exact_match=means.get("exact_match"),
        n=len(task.test),
        seconds=seconds,
        tokens_per_s=tokens / max(seconds, 1e-9),
        predictions=predictions,
        scores=means,
    )


def _answers(model, encoder: Encoder, task: Task, batch_size: int, autocast, dist: Dist | None):
    """The greedy answer to each test example (text, stripped), and the tokens fed; gathered over processes."""
    sharded = dist is not None and dist.world > 1
    model, prompts, order = test_prompts(model, encoder, task, dist)
    tok = encoder.tokenizer
    was_training = model.training
    model.eval()
    try:
        with dist.lockstep(model) if sharded else nullcontext():
            ids, tokens = greedy_answers(
                model,
                tok,
                prompts,
                order,
                max_new_tokens=answer_budget(encoder, task),
                batch_size=batch_size,
                stop=task.stop,
                autocast=autocast,
            )
    finally:
        model.train(was_training)
    answers = [tok.decode(x, skip_special_tokens=True).strip() if x else "" for x in ids]
    if sharded:
        for i, answer in dist.gather([(i, answers[i]) for i in order]):
            answers[i] = answer
        tokens = dist.sum(tokens)
    return answers, tokens
