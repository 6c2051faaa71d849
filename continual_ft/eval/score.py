"""What scoring a task gives back (:class:`TaskScore`), and how test prompts are batched for it: shared by
choice scoring (:mod:`continual_ft.eval.scoring`) and generative scoring (:mod:`continual_ft.eval.generative`)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

__all__ = ["TaskScore", "MAX_BATCH_TOKENS", "length_batches", "test_prompts"]

#: Prompt tokens (padding included) per evaluation forward pass, at most; ``batch_size`` caps the prompts.
MAX_BATCH_TOKENS = 8192


@dataclass
class TaskScore:
    accuracy: float | None  # None for a generative task
    exact_match: float | None
    n: int
    seconds: float
    # tokens scored per second: each prompt with the label trie, plus the tokens decoding fed; the same
    # count however the examples are batched or sharded (the prompts' shared start is counted in each)
    tokens_per_s: float
    # per test example, in order: gold and chosen label index, each label's Σ log p, the greedy answer
    # (choice); the gold text, the answer written and its score by each metric (generate)
    predictions: list[dict] = field(default_factory=list, repr=False)
    scores: dict[str, float] = field(default_factory=dict)  # generate: each metric's mean over the examples


def length_batches(order: list[int], lengths: list[int], extra: int, batch_size: int) -> Iterator[list[int]]:
    """Consecutive runs of the length-sorted ``order``: at most ``batch_size`` prompts and
    ``MAX_BATCH_TOKENS`` tokens (padded prompts plus ``extra`` tokens each) per run."""
    s = 0
    while s < len(order):
        n = 1
        while s + n < len(order) and n < batch_size and (n + 1) * (lengths[order[s + n]] + extra) <= MAX_BATCH_TOKENS:
            n += 1
        yield order[s : s + n]
        s += n


def test_prompts(model, encoder, task, dist) -> tuple:
    """What both scorers start from: the model to run (unwrapped over several processes), every test prompt's
    token ids, and this process's share of them in length order (all of them in one process)."""
    sharded = dist is not None and dist.world > 1
    if sharded:
        # Under FSDP the model is sharded in place (unwrap gives it back) and every forward all-gathers
        # its weights: scoring runs in dist.lockstep, so ranks with fewer forwards keep joining in.
        model = dist.unwrap(model)
    prompts = [encoder.encode(ex, answer="", eos=False).prompt_ids for ex in task.test]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    return model, prompts, dist.shard(order) if sharded else order
