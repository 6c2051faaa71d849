"""Scoring a task: choice accuracy by log-likelihood and exact match of greedy answers.

* ``accuracy``: the prediction is the label ℓ maximising Σ_t log p(ℓ_t | prompt, ℓ_<t) among
  the task's labels (summed, not length-normalised, as lm-evaluation-harness's ``acc``).
* ``exact_match``: the greedy continuation, cut at end-of-sequence or newline, equals the
  gold label after stripping whitespace and a trailing period (case-insensitive).

Both share one forward pass over each prompt: its KV cache is copied for greedy decoding
and repeated once per label for the choice scores, so a K-label task costs one prompt pass
plus a few label tokens per example, not K full passes.
"""

from __future__ import annotations

import copy
import inspect
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from accelerate.utils import DistributedType

from continual_ft.batching import Encoder
from continual_ft.data import Task
from continual_ft.distributed import Dist

__all__ = ["TaskScore", "evaluate_task", "normalize_answer"]


@dataclass
class TaskScore:
    accuracy: float
    exact_match: float
    n: int
    seconds: float
    tokens_per_s: float  # tokens processed per second: prompts, label tokens and generated tokens


def normalize_answer(text: str) -> str:
    return text.strip().split("\n")[0].strip().rstrip(".").strip().lower()


def _cache_kwarg(model) -> str:
    """transformers 5.x renames ``past_key_values`` to ``cache``; use whichever the model takes."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _left_pad(seqs: list[tuple[int, ...]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, s in enumerate(seqs):
        ids[row, width - len(s) :] = torch.tensor(s)
        mask[row, width - len(s) :] = 1
    return ids, mask


@torch.no_grad()
def _greedy(model, cache, last_logits, mask, max_new_tokens: int, eos_id: int | None) -> torch.Tensor:
    """Greedy tokens continuing from a prompt cache; (B, <= max_new_tokens)."""
    lengths = mask.sum(-1)
    out, done = [], torch.zeros(len(mask), dtype=torch.bool, device=mask.device)
    token = last_logits.argmax(-1)
    for step in range(max_new_tokens):
        out.append(token)
        done |= token == eos_id if eos_id is not None else done
        if done.all() or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        logits = model(
            input_ids=token[:, None],
            attention_mask=mask,
            position_ids=(lengths + step)[:, None],
            use_cache=True,
            **{_cache_kwarg(model): cache},
        ).logits[:, -1]
        token = logits.argmax(-1)
    return torch.stack(out, dim=1)


@torch.no_grad()
def _label_logprobs(model, cache, last_logits, mask, label_ids: list[tuple[int, ...]]) -> torch.Tensor:
    """Σ_t log p(label_t | prompt, label_<t) for every (prompt, label): a (B, K) tensor."""
    B, K = len(mask), len(label_ids)
    width = max(len(l) for l in label_ids)
    labels = torch.zeros((K, width), dtype=torch.long, device=mask.device)
    label_mask = torch.zeros_like(labels)
    for k, l in enumerate(label_ids):
        labels[k, : len(l)] = torch.tensor(l)
        label_mask[k, : len(l)] = 1
    first = torch.log_softmax(last_logits.float(), -1)[:, labels[:, 0]]  # (B, K): first label token
    if width == 1:
        return first
    cache.batch_repeat_interleave(K)
    lengths = mask.sum(-1).repeat_interleave(K)
    attn = torch.cat([mask.repeat_interleave(K, dim=0), label_mask.repeat(B, 1)], dim=1)
    # Right padding inside the label part is harmless: positions are causal, and we read
    # only the log-probabilities of real label tokens.
    logits = model(
        input_ids=labels[:, :-1].repeat(B, 1),
        attention_mask=attn[:, :-1],
        position_ids=lengths[:, None] + torch.arange(width - 1, device=mask.device),
        use_cache=True,
        **{_cache_kwarg(model): cache},
    ).logits
    logp = torch.log_softmax(logits.float(), -1)
    target = labels[:, 1:].repeat(B, 1)
    rest = logp.gather(-1, target[..., None])[..., 0] * label_mask[:, 1:].repeat(B, 1)
    return first + rest.sum(-1).view(B, K)


def evaluate_task(
    model,
    encoder: Encoder,
    task: Task,
    *,
    batch_size: int = 16,
    max_new_tokens: int = 0,
    autocast=None,
    dist: Dist | None = None,
) -> TaskScore:
    """Score ``task.test`` both ways; the model is put in eval mode and restored after.

    With ``dist`` over several processes each rank scores ``dist.shard`` of the length-sorted
    examples through the unwrapped module (no gradients, so nothing for DDP to sync), then the
    per-example results are gathered: every rank returns the same score of the whole split, with
    rank 0's wall time.
    """
    autocast = autocast or nullcontext
    sharded = dist is not None and dist.world > 1
    if sharded:
        if dist.accelerator.distributed_type == DistributedType.FSDP:
            # The unwrapped module holds only this rank's parameter shard, and the wrapped one
            # all-gathers in every forward, which needs equal forward counts on all ranks.
            raise NotImplementedError("sharded evaluation under FSDP is not supported yet")
        model = dist.unwrap(model)
    tok = encoder.tokenizer
    device = next(model.parameters()).device
    label_ids = [encoder.answer_ids(label, eos=False) for label in task.labels]
    max_new_tokens = max_new_tokens or max(len(l) for l in label_ids) + 3
    prompts = [encoder.encode(ex, answer="", eos=False).prompt_ids for ex in task.test]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    if sharded:
        order = dist.shard(order)
    choice = torch.empty(len(prompts), dtype=torch.long)
    answers = [""] * len(prompts)
    was_training = model.training
    model.eval()
    start, tokens = time.perf_counter(), 0
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        ids, mask = (t.to(device) for t in _left_pad([prompts[i] for i in idx], tok.pad_token_id))
        with torch.no_grad(), autocast():
            out = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                use_cache=True,
                logits_to_keep=1,
            )
            last, cache = out.logits[:, -1], out.past_key_values
            generated = _greedy(model, copy.deepcopy(cache), last, mask, max_new_tokens, tok.eos_token_id)
            scores = _label_logprobs(model, cache, last, mask, label_ids)
        choice[idx] = scores.argmax(-1).cpu()
        for row, i in enumerate(idx):
            answers[i] = tok.decode(generated[row], skip_special_tokens=True)
        tokens += int(mask.sum()) + generated.numel() + len(idx) * sum(len(l) for l in label_ids)
    if sharded:
        for i, chosen, answer in dist.gather([(i, int(choice[i]), answers[i]) for i in order]):
            choice[i], answers[i] = chosen, answer
        tokens = dist.sum(tokens)
    seconds = time.perf_counter() - start
    if sharded:
        seconds = dist.broadcast(seconds)
    model.train(was_training)
    gold = torch.tensor([task.labels.index(ex.answer) for ex in task.test])
    accuracy = (choice == gold).float().mean().item()
    exact = sum(normalize_answer(a) == normalize_answer(ex.answer) for a, ex in zip(answers, task.test))
    return TaskScore(accuracy, exact / len(task.test), len(task.test), seconds, tokens / max(seconds, 1e-9))
