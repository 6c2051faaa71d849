"""Two toy stages through any loop that calls ``continual_ft.train.protocol.run_stage``, and what each strategy must
have done there: the same effect checks for the HF ``Trainer`` (test_hf_integration.py) and the plain loop
(test_examples.py).

A loop is ``train(model, encoder, index, examples, strategies, final) -> list[Encoded]``: it trains stage
``index`` on ``examples`` (the stage's own, before any strategy's ``train_data``) with the model as it is
(its adapter already set up here, by ``start_stage``), and returns the encodings it trained on.

Stage 1 holds tasks ``a`` (12 examples) and ``b`` (4), so resampling to equal task shares shows; stage 2
holds ``c`` (8).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from conftest import make_examples

from continual_ft.config import LoraConfig
from continual_ft.data.tasks import Example
from continual_ft.model.adapters import start_stage
from continual_ft.model.loading import load_model
from continual_ft.strategies import Strategy, build
from continual_ft.train.batching import Encoded, Encoder

Loop = Callable[[torch.nn.Module, Encoder, int, list[Example], list[Strategy], bool], list[Encoded]]

STAGES = [make_examples("a", 12) + make_examples("b", 4), make_examples("c", 8)]


@dataclass
class Seen:
    """What two stages through a loop showed."""

    own: list[list[Example]]  # each stage's own examples
    trained: list[Counter]  # each stage's encodings the loop trained on, with their counts
    penalties: list[list[tuple[float, bool] | None]]  # each stage's penalty calls: (value, requires_grad) or None
    strategies: list[Strategy]
    encoder: Encoder

    def encoded(self, examples: list[Example]) -> Counter:
        return Counter(self.encoder.encode(e) for e in examples)

    def extra(self, k: int) -> Counter:
        """What stage ``k`` trained on beyond its own examples, each of which it trained on once."""
        own = self.encoded(self.own[k])
        assert self.trained[k] & own == own
        return self.trained[k] - own


def mixed_in(ratio: float, n: int) -> int:
    """Examples replay and SSR add to a stage of ``n``: a ``ratio`` share of the mixed set."""
    return round(ratio / (1 - ratio) * n)


def adds_nothing(seen: Seen) -> None:
    """naive: every stage trains on exactly its own examples, and no penalty is added."""
    for k in range(2):
        assert seen.trained[k] == seen.encoded(seen.own[k])
        assert seen.penalties[k] and set(seen.penalties[k]) == {None}


def resamples_to_equal_task_shares(seen: Seen) -> None:
    """task_balanced (temperature 0): stage 1's 16 examples become 8 of a (distinct, of its 12) and 8 of b
    (each of its 4 twice); stage 2, one task, trains on its own."""
    by_task = Counter(e.task for e in seen.trained[0].elements())
    assert by_task == {"a": 8, "b": 8}
    a, b = (seen.encoded([e for e in seen.own[0] if e.task == t]) for t in "ab")
    assert set(seen.trained[0]) - set(a) - set(b) == set()
    assert all(seen.trained[0][e] == 1 for e in a & seen.trained[0])
    assert all(seen.trained[0][e] == 2 for e in b)
    assert seen.trained[1] == seen.encoded(seen.own[1])


def trains_on_every_stage_so_far(seen: Seen) -> None:
    """joint: stage 1 trains on its own; stage 2 on stage 1's examples and its own, each once."""
    assert seen.trained[0] == seen.encoded(seen.own[0])
    assert seen.trained[1] == seen.encoded(seen.own[0] + seen.own[1])


def replays_stage_one_examples(seen: Seen) -> None:
    """replay: stage 2 trains on its own plus round(ratio / (1 - ratio) · 8) of stage 1's examples."""
    assert seen.trained[0] == seen.encoded(seen.own[0])
    extra = seen.extra(1)
    assert extra.total() == mixed_in(seen.strategies[0].config.ratio, 8)
    assert set(extra) <= set(seen.encoded(seen.own[0]))


def rehearses_synthetic_examples(seen: Seen) -> None:
    """ssr: stage 2 trains on its own plus round(ratio / (1 - ratio) · 8) of the examples SSR wrote after
    stage 1 for a and b, none of them a real stage-1 example."""
    (ssr,) = seen.strategies
    assert seen.trained[0] == seen.encoded(seen.own[0])
    extra = seen.extra(1)
    assert extra.total() == mixed_in(ssr.config.ratio, 8)
    assert set(extra) <= set(seen.encoded(ssr.pool)) and {e.task for e in extra} <= {"a", "b"}
    assert not set(extra) & set(seen.encoded(seen.own[0]))


def penalises_in_stage_two(seen: Seen) -> None:
    """ewc, lwf, olora: no penalty in stage 1 (no anchor, no teacher, no earlier adapter); in stage 2 one at
    every step, > 0 by the last and with a gradient."""
    assert seen.penalties[0] and set(seen.penalties[0]) == {None}
    assert seen.penalties[1] and None not in seen.penalties[1]
    value, requires_grad = seen.penalties[1][-1]
    assert value > 0 and requires_grad


@dataclass(frozen=True)
class LoopCase:
    """A strategy's settings and adapter mode in these two stages, and the effect they must show."""

    settings: dict
    effect: Callable[[Seen], None]
    adapter: str = "continue"


LOOP_CASES: dict[str, LoopCase] = {
    "naive": LoopCase({}, adds_nothing),
    "task_balanced": LoopCase({"temperature": 0.0}, resamples_to_equal_task_shares),
    "joint": LoopCase({}, trains_on_every_stage_so_far),
    "replay": LoopCase({"buffer_size": 8, "ratio": 0.3}, replays_stage_one_examples),
    "ssr": LoopCase(
        {"per_task": 6, "demos": 3, "max_new_tokens": 12, "known_answers": False}, rehearses_synthetic_examples
    ),
    "ewc": LoopCase({"fisher_batches": 2, "lam": 10.0}, penalises_in_stage_two),
    "lwf": LoopCase({}, penalises_in_stage_two),
    # A new adapter per stage, built here as the runner's adapter=new does: the earlier one stays active, frozen.
    "olora": LoopCase({"l2": 0.0}, penalises_in_stage_two, adapter="new"),
}


def two_stages(name: str, loop: Loop) -> Seen:
    """Run ``name`` through ``loop`` over :data:`STAGES`, recording every penalty it added."""
    case = LOOP_CASES[name]
    torch.manual_seed(0)
    model, tokenizer = load_model("tiny", seed=0)
    encoder = Encoder(tokenizer, max_length=64, chat_template=False)
    strategies = build(name, {name: case.settings})
    penalties: list[list] = []
    for s in strategies:
        original = s.penalty

        def spy(model, batch, outputs, original=original):
            value = original(model, batch, outputs)
            penalties[-1].append(None if value is None else (value.item(), value.requires_grad))
            return value

        s.penalty = spy
    trained = []
    for k, own in enumerate(STAGES):
        model = start_stage(model, case.adapter, k, LoraConfig(r=4, alpha=8))
        penalties.append([])
        trained.append(Counter(loop(model, encoder, k, own, strategies, k == len(STAGES) - 1)))
    return Seen(STAGES, trained, penalties, strategies, encoder)
