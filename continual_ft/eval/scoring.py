"""Scoring a choice task: accuracy by log-likelihood over its labels, and exact match of greedy answers.

* ``accuracy``: the prediction is the label ℓ maximising Σ_t log p(ℓ_t | prompt, ℓ_<t) among
  the task's labels (summed, not length-normalised, as lm-evaluation-harness's ``acc``).
* ``exact_match``: the greedy continuation, cut at end-of-sequence or newline, equals the
  gold label after stripping whitespace and a trailing period (case-insensitive).

Both come from one forward pass per batch of prompts. The task's labels form a token trie
(``Copyleft`` and ``Copyleft Limited`` share their first tokens); its nodes are appended to
every prompt, and a tree attention mask lets each node see the prompt and its own ancestors
only, at the positions it would have right after the prompt. The logits at the prompt's last
token and at every node then give every label's log-likelihood, and every greedy step that
stays on a label's path. Only a row whose greedy answer leaves the trie while it could still
match a label (``permissive``, ``Copyleft.``) decodes further, token by token from a KV cache.
A greedy answer stops at end-of-sequence, at ``max_new_tokens``, or as soon as more tokens
cannot change whether it matches (a newline ended its first line, or no label starts with it).
"""

from __future__ import annotations

import copy
import time
from contextlib import nullcontext

import torch

from continual_ft.data.tasks import Task, normalize_answer
from continual_ft.errors import ContinualFTError
from continual_ft.eval.generative import evaluate_generative
from continual_ft.eval.score import TaskScore, length_batches, test_prompts
from continual_ft.train.batching import Encoder
from continual_ft.train.distributed import Dist
from continual_ft.train.generation import prefix_cache
from continual_ft.train.losses import cache_kwarg, cache_of, last_positions

__all__ = ["TaskScore", "evaluate_task", "normalize_answer"]


class _LabelTrie:
    """The labels' token sequences as a trie. Logit position 0 is the prompt's last token, node j is position j + 1."""

    def __init__(self, label_ids: list[tuple[int, ...]]):
        self.tokens: list[int] = []
        self.parent: list[int] = []  # logit position that predicts node j's token
        self.depth: list[int] = []
        self.child: dict[tuple[int, int], int] = {}  # (logit position, token) -> node
        self.paths: list[list[int]] = []  # per label, its nodes
        for ids in label_ids:
            pos, path = 0, []
            for t in ids:
                if (pos, t) not in self.child:
                    self.child[pos, t] = len(self.tokens)
                    self.tokens.append(t)
                    self.parent.append(pos)
                    self.depth.append(len(path))
                node = self.child[pos, t]
                path.append(node)
                pos = node + 1
            self.paths.append(path)
        n = len(self.tokens)
        # sees[i, j]: node i attends to node j (an ancestor of i, or i itself)
        self.sees = torch.eye(n, dtype=torch.bool)
        for i in range(n):
            p = self.parent[i]
            if p:
                self.sees[i] |= self.sees[p - 1]

    def __len__(self) -> int:
        return len(self.tokens)

    def label_logprobs(self, logp: torch.Tensor) -> torch.Tensor:
        """(B, K) Σ_t log p(ℓ_t | prompt, ℓ_<t) from (B, 1 + nodes, V) log-probabilities."""
        cols = []
        for path in self.paths:
            first, *rest = path
            score = logp[:, self.parent[first], self.tokens[first]]
            if rest:
                score = score + torch.stack([logp[:, self.parent[j], self.tokens[j]] for j in rest], -1).sum(-1)
            cols.append(score)
        return torch.stack(cols, -1)


class _Answer:
    """Decides when a greedy answer is settled: more tokens could not change whether it matches a label."""

    def __init__(self, tokenizer, labels: list[str]):
        self.tokenizer = tokenizer
        # Compared without case and whitespace, so a settled answer is never wrongly cut.
        self.labels = [_squash(normalize_answer(label)) for label in labels]

    def text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def done(self, ids: list[int], max_new_tokens: int) -> bool:
        """Greedy decoding of this answer stops here."""
        return ids[-1] == self.tokenizer.eos_token_id or len(ids) >= max_new_tokens or self.settled(self.text(ids))

    def settled(self, text: str) -> bool:
        head = text.lstrip()
        if "\n" in head:
            return True  # the first line, the part that is compared, is complete
        if "\ufffd" in head:
            return False  # a character split across tokens: wait for the rest
        s = _squash(head)
        return not any(
            label.startswith(s) or (s.startswith(label) and not s[len(label) :].strip(".")) for label in self.labels
        )


def _squash(text: str) -> str:
    return "".join(text.casefold().split())


def _left_pad(seqs: list[tuple[int, ...]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, s in enumerate(seqs):
        ids[row, width - len(s) :] = torch.tensor(s)
        mask[row, width - len(s) :] = 1
    return ids, mask


def _tree_logits(model, prompts: list[tuple[int, ...]], trie: _LabelTrie, pad_id: int, device, prefix=None, P=0):
    """Logits at each prompt's last token and at every trie node after it: (B, 1 + nodes, V).

    Each row is the left-padded rest of a prompt after its ``P`` shared tokens (their KV cache
    ``prefix``), followed by the trie's tokens. Prompt tokens attend to the shared tokens and
    causally to their own; node j attends to the whole prompt and to its ancestors, at position
    ``len(prompt) + depth(j)``, so its logits are those of the prompt followed by j's path.
    """
    ids, real = _left_pad([p[P:] for p in prompts], pad_id)
    B, W, N = len(prompts), ids.shape[1], len(trie)
    ids = torch.cat([ids, torch.tensor(trie.tokens).expand(B, N)], 1)
    position = P + torch.cat(
        [(real.cumsum(-1) - 1).clamp(min=0), real.sum(-1, keepdim=True) + torch.tensor(trie.depth)], 1
    )
    allowed = torch.zeros((B, W + N, P + W + N), dtype=torch.bool)
    allowed[:, :, :P] = True
    allowed[:, :W, P : P + W] = torch.ones(W, W, dtype=torch.bool).tril() & real.bool()[:, None, :]
    allowed[:, W:, P : P + W] = real.bool()[:, None, :]
    allowed[:, W:, P + W :] = trie.sees
    allowed[:, :, P:] |= torch.eye(W + N, dtype=torch.bool)  # padding attends to itself: no row without any key
    mask = allowed[:, None]
    attention = getattr(model.config, "_attn_implementation", "eager")
    if attention == "eager":  # adds the mask to the scores
        mask = torch.zeros(mask.shape).masked_fill_(~mask, torch.finfo(torch.float32).min)
    elif attention != "sdpa":
        raise ContinualFTError(
            f"evaluation needs a model loaded with attn_implementation 'sdpa' or 'eager' (a 4D attention mask), "
            f"not {attention!r}"
        )
    cache = {}
    if prefix is not None:
        rows = copy.deepcopy(prefix)  # the forward appends to it
        rows.batch_repeat_interleave(B)
        cache = {cache_kwarg(model): rows}
    out = model(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        position_ids=position.to(device),
        use_cache=prefix is not None,
        logits_to_keep=last_positions(N + 1, W + N, device),
        **cache,
    )
    return out.logits


def _decode(model, prompts: list[tuple[int, ...]], starts: list[list[int]], budget: int, answer: _Answer, device):
    """Greedy answers continued from a KV cache after ``prompt + start`` until end-of-sequence, ``budget``
    tokens in all, or settled; ``start`` included."""
    tok = answer.tokenizer
    ids, mask = (t.to(device) for t in _left_pad([p + tuple(s) for p, s in zip(prompts, starts)], tok.pad_token_id))
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    answers = [list(s) for s in starts]
    open_rows, cache = list(range(len(prompts))), None
    while open_rows:
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=position,
            use_cache=True,
            logits_to_keep=last_positions(1, ids.shape[1], device),
            **({cache_kwarg(model): cache} if cache is not None else {}),
        )
        cache = cache_of(out)
        token = out.logits[:, -1].argmax(-1)
        for r in open_rows:
            answers[r].append(int(token[r]))
        open_rows = [r for r in open_rows if not answer.done(answers[r], budget)]
        ids, position = token[:, None], position[:, -1:] + 1
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return answers


def _walk(best: list[int], trie: _LabelTrie, answer: _Answer, max_new_tokens: int) -> tuple[list[int], bool]:
    """The greedy answer as far as the trie's logits give it (``best[p]``: the argmax at logit position p);
    returns it and whether it is settled."""
    ids, pos = [], 0
    while True:
        t = best[pos]
        ids.append(t)
        if answer.done(ids, max_new_tokens):
            return ids, True
        if (pos, t) not in trie.child:
            return ids, False  # off the labels' paths, yet it could still match one
        pos = trie.child[pos, t] + 1


@torch.inference_mode()
def _predict(model, encoder: Encoder, task: Task, order: list[int], batch_size: int, max_new_tokens: int, autocast):
    """Label log-likelihoods and greedy answers for the examples ``order`` lists (others stay empty)."""
    tok = encoder.tokenizer
    device = next(model.parameters()).device
    label_ids = [encoder.answer_ids(label, eos=False) for label in task.labels]
    max_new_tokens = max_new_tokens or max(len(l) for l in label_ids) + 3
    trie, answer = _LabelTrie(label_ids), _Answer(tok, task.labels)
    prompts = [encoder.encode(ex, answer="", eos=False).prompt_ids for ex in task.test]
    scores = torch.zeros(len(prompts), len(task.labels))
    answers = [""] * len(prompts)
    if not order:
        return scores, answers, 0
    with autocast():
        prefix, P = prefix_cache(model, [prompts[i] for i in order], device)
    tokens = 0
    for idx in length_batches(order, [len(p) - P for p in prompts], len(trie), batch_size):
        with autocast():
            logits = _tree_logits(model, [prompts[i] for i in idx], trie, tok.pad_token_id, device, prefix, P)
        tokens += sum(len(prompts[i]) + len(trie) for i in idx)  # as if the shared prefix were not shared
        scores[idx] = trie.label_logprobs(torch.log_softmax(logits.float(), -1)).cpu()
        best = logits.argmax(-1).tolist()
        walks = [_walk(best[row], trie, answer, max_new_tokens) for row in range(len(idx))]
        for i, (ids, _) in zip(idx, walks):
            answers[i] = answer.text(ids)
        rest = [(i, ids) for i, (ids, settled) in zip(idx, walks) if not settled]
        if rest:
            with autocast():
                more = _decode(
                    model, [prompts[i] for i, _ in rest], [ids for _, ids in rest], max_new_tokens, answer, device
                )
            for (i, _), ids in zip(rest, more):
                answers[i] = answer.text(ids)
                tokens += len(prompts[i]) + len(ids) - 1  # what this row fed, the same in any batch
    return scores, answers, tokens


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
    rank 0's wall time. A generative task is scored by :func:`continual_ft.eval.generative.evaluate_generative`.
    """
    if task.generative:
        return evaluate_generative(model, encoder, task, batch_size=batch_size, autocast=autocast, dist=dist)
    autocast = autocast or nullcontext
    sharded = dist is not None and dist.world > 1
    model, _, order = test_prompts(model, encoder, task, dist)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        with dist.lockstep(model) if sharded else nullcontext():
            scores, answers, tokens = _predict(model, encoder, task, order, batch_size, max_new_tokens, autocast)
    finally:
        model.train(was_training)
    scores = scores.clone()  # made under inference_mode: a normal tensor to fill in
    if sharded:
        for i, row, answer in dist.gather([(i, scores[i].tolist(), answers[i]) for i in order]):
            scores[i], answers[i] = torch.tensor(row), answer
        tokens = dist.sum(tokens)
    choice = scores.argmax(-1)
    seconds = time.perf_counter() - start
    if sharded:
        seconds = dist.broadcast(seconds)
    gold = torch.tensor([task.labels.index(ex.answer) for ex in task.test])
    accuracy = (choice == gold).float().mean().item()
    exact = sum(normalize_answer(a) == normalize_answer(ex.answer) for a, ex in zip(answers, task.test))
    predictions = [
        {"gold": int(g), "chosen": int(c), "loglik": [round(x, 4) for x in row], "answer": a}
        for g, c, row, a in zip(gold.tolist(), choice.tolist(), scores.tolist(), answers)
    ]
    return TaskScore(
        accuracy, exact / len(task.test), len(task.test), seconds, tokens / max(seconds, 1e-9), predictions
    )
