"""Scoring a task: choice accuracy by log-likelihood and exact match of greedy answers.

* ``accuracy``: the prediction is the label ℓ maximising Σ_t log p(ℓ_t | prompt, ℓ_<t) among
  the task's labels (summed, not length-normalised, as lm-evaluation-harness's ``acc``).
* ``exact_match``: the greedy continuation, cut at end-of-sequence or newline, equals the
  gold label after stripping whitespace and a trailing period (case-insensitive).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from continual_ft.batching import Encoder, collate, model_inputs, to_device
from continual_ft.data import Task

__all__ = ["TaskScore", "evaluate_task", "normalize_answer"]


@dataclass
class TaskScore:
    accuracy: float
    exact_match: float
    n: int
    seconds: float
    tokens_per_s: float  # tokens processed per second (scored sequences + generated tokens)


def normalize_answer(text: str) -> str:
    return text.strip().split("\n")[0].strip().rstrip(".").strip().lower()


@torch.no_grad()
def _choice_scores(model, encoder: Encoder, task: Task, batch_size: int, device, autocast) -> tuple[torch.Tensor, int]:
    """Log-likelihood of every (test example, label) pair: a (n_examples, n_labels) tensor."""
    pairs = [encoder.encode(ex, answer=label, eos=False) for ex in task.test for label in task.labels]
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i]))
    scores = torch.empty(len(pairs))
    tokens = 0
    pad = encoder.tokenizer.pad_token_id
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = to_device(collate([pairs[i] for i in idx], pad), device)
        with autocast():
            logits = model(**model_inputs(batch)).logits[:, :-1].float()
        labels = batch["labels"]
        logp = -F.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
        per_seq = (logp * (labels != -100)).sum(-1).cpu()
        scores[idx] = per_seq
        tokens += batch["n_tokens"]
    return scores.view(len(task.test), len(task.labels)), tokens


@torch.no_grad()
def _greedy_answers(model, encoder: Encoder, task: Task, batch_size: int, max_new_tokens: int, device,
                    autocast) -> tuple[list[str], int]:
    tok = encoder.tokenizer
    prompts = [encoder.encode(ex, answer="", eos=False) for ex in task.test]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i].prompt_ids))
    answers: list[str] = [""] * len(prompts)
    tokens = 0
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(prompts[i].prompt_ids) for i in idx)
        ids = torch.full((len(idx), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(idx):
            p = prompts[i].prompt_ids
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        with autocast():
            out = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
            )
        new = out[:, width:].cpu()
        tokens += int(mask.sum()) + new.numel()
        for row, i in enumerate(idx):
            answers[i] = tok.decode(new[row], skip_special_tokens=True)
    return answers, tokens


def evaluate_task(model, encoder: Encoder, task: Task, *, batch_size: int = 32, max_new_tokens: int = 0,
                  autocast=None) -> TaskScore:
    """Score ``task.test`` both ways; the model is put in eval mode and restored after."""
    from contextlib import nullcontext

    autocast = autocast or nullcontext
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    scores, t1 = _choice_scores(model, encoder, task, batch_size, device, autocast)
    gold = torch.tensor([task.labels.index(ex.answer) for ex in task.test])
    accuracy = (scores.argmax(-1) == gold).float().mean().item()
    if max_new_tokens == 0:
        max_new_tokens = max(len(encoder.answer_ids(label, eos=False)) for label in task.labels) + 3
    answers, t2 = _greedy_answers(model, encoder, task, batch_size, max_new_tokens, device, autocast)
    exact = sum(normalize_answer(a) == normalize_answer(ex.answer) for a, ex in zip(answers, task.test))
    seconds = time.perf_counter() - start
    model.train(was_training)
    return TaskScore(accuracy, exact / len(task.test), len(task.test), seconds, (t1 + t2) / max(seconds, 1e-9))
