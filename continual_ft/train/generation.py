"""Batched sampling for strategies that write text (self-synthesized rehearsal): rows leave the batch when
they finish, and several samples of one prompt share its prefill.

HF ``generate`` steps every row of a batch until the last one stops. SSR's written inputs average 19 to
32 tokens of their 64-token budget, yet one long row in 64 keeps the whole batch stepping to 64, so
most of its decode computed rows that were already done. Here a row that reaches end of text or one
of the stop strings is dropped from the batch and from the KV cache (``Cache.batch_select_indices``),
the tokens every prompt of a batch starts with (the chat template, a task's instruction) are prefilled
once, and ``samples`` continuations of a prompt are drawn from one prefill whose cache is repeated
(``Cache.batch_repeat_interleave``). Each step is the usual decoding rule: greedy at ``temperature=0``,
else temperature, then nucleus (top-p, HF's ``TopPLogitsWarper`` rule: :func:`nucleus`), then a draw from
torch's generator.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from continual_ft.train.losses import cache_kwarg, cache_of, last_positions

__all__ = ["end_ids", "nucleus", "prefix_cache", "sample"]


def end_ids(model, tokenizer) -> set[int]:
    """The tokens that end a text: the model's generation config's end of sequence (the chat turn's end
    for an instruct model) and the tokenizer's."""
    config = getattr(model, "generation_config", None)
    ids = getattr(config, "eos_token_id", None)
    ids = set(ids if isinstance(ids, (list, tuple)) else [ids]) | {tokenizer.eos_token_id}
    return {int(i) for i in ids if i is not None}


@torch.no_grad()
def sample(
    model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    tokenizer,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: Sequence[str] = (),
    samples: int = 1,
) -> list[list[int]]:
    """New tokens after each prompt (token ids), ``samples`` rows per prompt in prompt order.

    A row ends at one of :func:`end_ids` (not returned) or once its decoded text contains one of
    ``stop`` (kept), or after ``max_new_tokens``. The prompts' common first tokens are prefilled once
    (:func:`prefix_cache`), the rest left-padded after them; positions count real tokens.
    """
    device = next(model.parameters()).device
    cache, logits, mask, position = _prefill(model, prompts, tokenizer.pad_token_id, device)
    if samples > 1:
        cache.batch_repeat_interleave(samples)
        logits, mask, position = (t.repeat_interleave(samples, 0) for t in (logits, mask, position))
    ends = end_ids(model, tokenizer)
    texts: list[list[int]] = [[] for _ in range(len(prompts) * samples)]
    rows = list(range(len(texts)))  # the rows still in the batch, as indices into texts
    for step in range(max_new_tokens):
        token = _pick(logits.float(), temperature, top_p)
        keep = _extend(texts, rows, token.tolist(), ends, tokenizer, stop)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(rows):
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            token, mask, position = token[index], mask[index], position[index]
            rows = [rows[i] for i in keep]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        position = position[:, -1:] + 1
        out = model(
            input_ids=token[:, None],
            attention_mask=mask,
            position_ids=position,
            use_cache=True,
            **{cache_kwarg(model): cache},
        )
        cache, logits = cache_of(out), out.logits[:, -1]
    return texts


def _prefill(model, prompts: Sequence[Sequence[int]], pad: int, device):
    """The prompts through the model, their shared first tokens once: the KV cache, each row's last logits,
    its attention mask (the shared tokens, then the left-padded rest) and its last position."""
    cache, shared = prefix_cache(model, prompts, device) if len(prompts) > 1 else (None, 0)
    if cache is not None:
        cache.batch_repeat_interleave(len(prompts))
    rest = [list(p[shared:]) for p in prompts]
    width = max(len(r) for r in rest)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rest], device=device)
    real = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rest], device=device)
    mask = torch.cat([real.new_ones(len(rest), shared), real], 1)
    position = shared + (real.cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=position,
        use_cache=True,
        logits_to_keep=last_positions(1, width, device),
        **({cache_kwarg(model): cache} if cache is not None else {}),
    )
    return cache_of(out), out.logits[:, -1], mask, position


def _extend(texts: list[list[int]], rows: list[int], tokens: list[int], ends: set[int], tokenizer, stop) -> list[int]:
    """Append each row's new token to its text; returns the positions in ``rows`` of those still writing
    (not at an end token, no stop string in the text yet)."""
    keep = []
    for i, (row, t) in enumerate(zip(rows, tokens)):
        if t in ends:
            continue
        texts[row].append(t)
        if not any(s in tokenizer.decode(texts[row], skip_special_tokens=True) for s in stop):
            keep.append(i)
    return keep


def prefix_cache(model, prompts: Sequence[Sequence[int]], device):
    """The KV cache of the tokens every prompt starts with (chat template, instruction, options), computed
    once (batch of one), and their number; ``(None, 0)`` when they share nothing. At least one token of
    each prompt is left. Evaluation scores from it; :func:`sample` repeats it for each prompt."""
    shared = list(os.path.commonprefix(list(prompts))[: min(len(p) for p in prompts) - 1])
    if not shared:
        return None, 0
    out = model(
        input_ids=torch.tensor([shared], device=device),
        position_ids=torch.arange(len(shared), device=device)[None],
        use_cache=True,
        logits_to_keep=last_positions(1, len(shared), device),
    )
    return cache_of(out), len(shared)


def _pick(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The next token of each row: the argmax at temperature 0, else a draw from the tempered nucleus."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, -1)
    if top_p >= 1:
        return torch.multinomial(probs, 1).squeeze(1)
    top, ids = nucleus(probs, top_p)
    return ids.gather(-1, torch.multinomial(top, 1)).squeeze(1)


def nucleus(probs: torch.Tensor, top_p: float, k: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-p filtering as HF's ``TopPLogitsWarper``: a token stays when the tokens more probable than it
    hold less than ``top_p`` of the mass (so the most probable always stays). Returns the kept
    probabilities (0 for the dropped, not renormalised) and their token ids, most probable first.

    The candidates are the ``k`` most probable, k growing fourfold until the first left out is dropped
    in every row: sorting the whole vocabulary (49k tokens for SmolLM2) every step, as the warper does,
    was 15% of SSR's writing.
    """
    vocab = probs.shape[-1]
    while True:
        k = min(k, vocab)
        top, ids = probs.topk(k, -1)
        if k == vocab or bool((top.sum(-1) >= top_p).all()):
            break
        k *= 4
    before = top.cumsum(-1) - top  # the mass of the more probable candidates
    return top.masked_fill(before >= top_p, 0.0), ids
