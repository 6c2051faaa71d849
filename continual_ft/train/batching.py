"""From examples to token batches: prompt formatting, answer-only labels, length grouping.

Batches are left-padded so every row's answer sits at the end; the model then computes
logits only for the last ``answer_len + 1`` positions (``logits_to_keep``), which skips the
vocabulary projection for prompt tokens, the part of the forward pass we never score.
Explicit ``position_ids`` keep left padding exact for any positional scheme.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from continual_ft.data.tasks import Example

__all__ = [
    "Encoded",
    "Encoder",
    "collate",
    "padded_width",
    "collate_packed",
    "length_grouped_batches",
    "split_batch",
    "split_rows",
    "in_global_batch",
    "to_device",
    "LengthFit",
    "length_fit",
    "MAX_CUT_SHARE",
]

#: A generative task whose training prompts would be cut (from the left, to fit ``train.max_length``) in more
#: than this share of its examples stops before training, naming the ``max_length`` that fits them.
MAX_CUT_SHARE = 0.1


@dataclass(frozen=True)
class Encoded:
    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]
    task: str

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.answer_ids)


class Encoder:
    """Turns an :class:`Example` into prompt and answer token ids, the same way for training and scoring."""

    def __init__(self, tokenizer, max_length: int = 256, chat_template: bool = True, system_prompt: str = ""):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.use_chat = chat_template and getattr(tokenizer, "chat_template", None) is not None
        self.system_prompt = system_prompt
        self._cache: dict[tuple[str, str, bool], Encoded] = {}

    def prompt_text(self, prompt: str) -> str:
        if not self.use_chat:
            return prompt
        messages = [{"role": "user", "content": prompt}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def answer_ids(self, answer: str, eos: bool = True) -> tuple[int, ...]:
        # A plain prompt ends in "Answer:", so the label follows a space; after a chat
        # template the assistant turn starts on a fresh line.
        text = answer if self.use_chat else " " + answer
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if eos and self.tokenizer.eos_token_id is not None:
            ids = ids + [self.tokenizer.eos_token_id]
        return tuple(ids)

    def encode(self, example: Example, answer: str | None = None, eos: bool = True) -> Encoded:
        answer = example.answer if answer is None else answer
        key = (example.prompt, answer, eos)
        if key not in self._cache:
            prompt = self.tokenizer(self.prompt_text(example.prompt), add_special_tokens=False)["input_ids"]
            ans = self.answer_ids(answer, eos)
            budget = max(self.max_length - len(ans), 1)
            # Keep the end: it holds the answer cue. Sources already cut long texts to a
            # character budget, so this only guards against a user's over-long inputs.
            prompt = prompt[-budget:]
            self._cache[key] = Encoded(tuple(prompt), ans, example.task)
        return self._cache[key]


def padded_width(longest: int, multiple: int = 1) -> int:
    """``longest`` rounded up to a multiple of ``multiple`` (``train.pad_to_multiple_of``)."""
    return -(-longest // max(multiple, 1)) * max(multiple, 1)


def collate(items: Sequence[Encoded], pad_id: int, multiple: int = 1) -> dict:
    """Left-pad a list of encodings to the longest, rounded up to ``multiple``; labels are -100 except on
    answer tokens. Padding is masked and positions count real tokens only, so the width changes no result."""
    width = padded_width(max(len(e) for e in items), multiple)
    keep = max(len(e.answer_ids) for e in items) + 1
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), keep - 1), -100, dtype=torch.long)
    attention = torch.zeros((len(items), width), dtype=torch.long)
    for i, e in enumerate(items):
        ids = e.prompt_ids + e.answer_ids
        input_ids[i, width - len(ids) :] = torch.tensor(ids)
        attention[i, width - len(ids) :] = 1
        labels[i, keep - 1 - len(e.answer_ids) :] = torch.tensor(e.answer_ids)
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "position_ids": position_ids,
        "labels": labels,  # targets of the last keep-1 positions
        "logits_to_keep": keep,
        "tasks": [e.task for e in items],
        "n_tokens": int(attention.sum()),
    }


def collate_packed(items: Sequence[Encoded], pad_id: int = 0, multiple: int = 1) -> dict:
    """Pack encodings into one row, padding-free: positions restart at 0 for every example and there is
    no attention mask, which transformers reads as packed sequences (a block-diagonal causal mask under
    SDPA and eager attention, variable-length kernels under FlashAttention), so no example attends to another.

    ``logits_to_keep`` is the tensor of positions whose next token is an answer token, plus the row's
    last position, so the model projects only those onto the vocabulary and ``labels`` line up with
    ``logits[:, :-1]`` exactly as for :func:`collate`. A row rounded up to ``multiple`` ends in a
    sequence of pad tokens of its own (positions restart), which no example attends to.
    """
    ids, positions, keep, labels = [], [], [], []
    for e in items:
        start = len(ids)
        seq = e.prompt_ids + e.answer_ids
        ids += seq
        positions += range(len(seq))
        first = start + len(e.prompt_ids) - 1  # predicts the first answer token
        keep += range(first, first + len(e.answer_ids))
        labels += e.answer_ids
    real, fill = len(ids), padded_width(len(ids), multiple) - len(ids)
    ids += [pad_id] * fill
    positions += range(fill)
    keep.append(len(ids) - 1)
    return {
        "input_ids": torch.tensor([ids]),
        "position_ids": torch.tensor([positions]),
        "labels": torch.tensor([labels]),
        "logits_to_keep": torch.tensor(keep),
        "tasks": [e.task for e in items],
        "n_tokens": real,
        "packed": True,
    }


def _cost(lengths: Sequence[int], packed: bool, multiple: int = 1) -> int:
    """Tokens a micro-batch computes on: its real tokens when packed, rows × longest row when padded,
    the width rounded up to ``multiple`` as the collator pads it."""
    width = padded_width(sum(lengths) if packed else max(lengths), multiple)
    return width if packed else len(lengths) * width


def _cut(
    order: list[int], items: Sequence[Encoded], batch_size: int, max_tokens: int, packed: bool, multiple: int = 1
) -> list:
    """Consecutive batches of ``order``: ``batch_size`` each, or as many as fit in ``max_tokens``."""
    if not max_tokens:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    batches, current = [], []
    for i in order:
        if current and _cost([len(items[j]) for j in current] + [len(items[i])], packed, multiple) > max_tokens:
            batches.append(current)
            current = []
        current.append(i)  # an example longer than the budget gets a batch of its own
    return batches + ([current] if current else [])


def length_grouped_batches(
    items: Sequence[Encoded],
    batch_size: int,
    rng: random.Random | None,
    mega: int = 32,
    *,
    max_tokens: int = 0,
    packed: bool = False,
    multiple: int = 1,
) -> Iterator[list[Encoded]]:
    """Shuffle, then sort by length inside chunks of ``mega`` batches so padding stays small.

    ``max_tokens`` forms batches by a token budget instead of ``batch_size`` examples: padded rows ×
    longest row, or the sum of lengths when the batch will be ``packed``, the width rounded up to
    ``multiple`` as the collator pads it. With ``rng=None`` the order is deterministic (sorted by
    length), as for evaluation.
    """
    order = list(range(len(items)))
    if rng is None:
        order.sort(key=lambda i: len(items[i]))
        batches = _cut(order, items, batch_size, max_tokens, packed, multiple)
    else:
        rng.shuffle(order)
        if max_tokens:  # chunks of about `mega` budgets' worth of examples
            mean = sum(len(e) for e in items) / max(len(items), 1)
            chunk = max(1, int(mega * max_tokens / max(mean, 1)))
        else:
            chunk = batch_size * mega
        batches = []
        for start in range(0, len(order), chunk):
            part = sorted(order[start : start + chunk], key=lambda i: len(items[i]))
            batches += _cut(part, items, batch_size, max_tokens, packed, multiple)
        rng.shuffle(batches)
    for b in batches:
        yield [items[i] for i in b]


def split_batch(
    items: Sequence[Encoded], max_tokens: int, packed: bool = False, multiple: int = 1
) -> list[list[Encoded]]:
    """``items`` in consecutive parts of at most ``max_tokens`` computed tokens each, widths rounded up to
    ``multiple`` as the collator pads them (one part if they fit; an example longer than that gets a part
    of its own). Sorted by length first, so padding stays small."""
    return [[items[i] for i in part] for part in split_rows(items, range(len(items)), max_tokens, packed, multiple)]


def split_rows(
    items: Sequence[Encoded], rows: Sequence[int], max_tokens: int, packed: bool = False, multiple: int = 1
) -> list[list[int]]:
    """:func:`split_batch` of the examples ``rows`` (indices into ``items``), as parts of those indices."""
    order = sorted(rows, key=lambda i: len(items[i]))
    if max_tokens <= 0 or _cost([len(items[i]) for i in rows], packed, multiple) <= max_tokens:
        return [list(rows)]
    return _cut(order, items, len(rows), max_tokens, packed, multiple)


def in_global_batch(batch: dict, whole: Sequence[Encoded], rows: Sequence[int]) -> dict:
    """``batch``, collated from the examples ``rows`` of ``whole``, told where they sit in it.

    ``whole`` is an optimizer step's global batch, which several processes (or parts cut to a token
    budget) share. ``global_rows`` are the indices of the batch's examples in ``whole``, in the batch's
    order (a padded batch's rows); ``global_answer_tokens`` the answer-token count of every example of
    ``whole``. A strategy whose penalty is a mean over chosen examples of the global batch (LwF) chooses
    and normalises with them as one process holding ``whole`` would; a batch without them is its own
    global batch.
    """
    batch["global_rows"] = list(rows)
    batch["global_answer_tokens"] = [len(e.answer_ids) for e in whole]
    return batch


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


@dataclass(frozen=True)
class LengthFit:
    """How a task's training examples fit ``max_length`` tokens: the prompt is cut from the left, never the
    answer; an answer of ``max_length`` tokens or more leaves no room for any prompt."""

    examples: int
    cut: int  # prompts cut from the left
    too_long: int  # answers that alone fill max_length: trained with one prompt token
    fits_all: int  # the max_length at which nothing is cut


def length_fit(encoder: Encoder, examples: Sequence) -> LengthFit:
    """Count the examples whose prompt + answer exceed ``encoder.max_length`` (tokenised once, as training does)."""
    tok, cut, too_long, longest = encoder.tokenizer, 0, 0, 0
    for ex in examples:
        prompt = len(tok(encoder.prompt_text(ex.prompt), add_special_tokens=False)["input_ids"])
        answer = len(encoder.answer_ids(ex.answer))
        cut += prompt + answer > encoder.max_length
        too_long += answer >= encoder.max_length
        longest = max(longest, prompt + answer)
    return LengthFit(len(examples), cut, too_long, longest)
