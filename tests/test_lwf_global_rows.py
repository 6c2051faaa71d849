"""LwF on shares of a global batch (several processes' micro-batches, or parts cut to a token budget) is LwF
on the whole batch: the same rows distilled, the KL averaged over the same answer tokens.

Computed in one process with the trainer's own step (``backward_step``): its micro-batches are the shares,
each weighted by its share of the step's answer tokens, which is what an N-process step sums to
(``W · n_r / N`` per rank, averaged by DDP; tests/test_distributed.py). The 2-process runs are in
tests/test_distributed_run.py (DDP) and tests/test_fsdp_strategies.py (FSDP).
"""

import pytest
import torch
from conftest import make_examples, make_stage

from continual_ft.config import TrainConfig
from continual_ft.strategies.lwf import LwF, distilled_rows, spread_rows
from continual_ft.train.batching import Encoder, collate, collate_packed, in_global_batch
from continual_ft.train.loop import backward_step, train_stage

#: Answers of 2 to 5 tokens with the end of text (the tiny model's tokenizer), so the shares' answer-token
#: counts differ and a mean per share is not the mean over the batch.
LABELS = ("yes", "no", "it may be so", "not at all, no")


def _whole(tokenizer, n: int = 8):
    encoder = Encoder(tokenizer, 64, chat_template=False)
    return [encoder.encode(e) for e in make_examples("a", n, LABELS)]


def _shares(whole, pad: int, world: int) -> list[dict]:
    """The global batch split as the trainer splits it over ``world`` processes (rows ``r::world``)."""
    parts = [list(range(len(whole)))[r::world] for r in range(world)]
    return [in_global_batch(collate([whole[i] for i in rows], pad), whole, rows) for rows in parts]


def _step(model, micro, lwf):
    """One step's gradients and penalty (trainer.backward_step, one process)."""
    model.zero_grad(set_to_none=True)
    _, _, penalty = backward_step(model, micro, [lwf])
    return [p.grad.clone() for p in model.parameters() if p.requires_grad], penalty


@pytest.fixture
def taught(tiny_model_and_tokenizer):
    """Stage 2's LwF with its teacher, the student moved away from it."""
    model, tokenizer = tiny_model_and_tokenizer
    lwf = LwF()
    lwf.before_stage(model, make_stage(model, tokenizer, 1, make_examples("a", 4)))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model, tokenizer, lwf


@pytest.mark.parametrize(("world", "fraction"), [(2, 0.5), (3, 0.25)])
def test_lwf_on_the_shares_of_a_global_batch_is_lwf_on_the_whole(taught, world, fraction):
    """(2, 0.5): rows 0, 2, 5, 7 are distilled, 2 in each share. (3, 0.25): rows 0 and 7, and the third share
    holds neither (its penalty is None)."""
    model, tokenizer, lwf = taught
    lwf.config.fraction = fraction
    whole = _whole(tokenizer)
    assert len({len(e.answer_ids) for e in whole}) > 1
    pad = tokenizer.pad_token_id
    shares = _shares(whole, pad, world)
    assert [len(distilled_rows(b, fraction)[0]) for b in shares] == ([2, 2] if world == 2 else [1, 1, 0])

    expected_grads, expected = _step(model, [collate(whole, pad)], lwf)
    grads, penalty = _step(model, shares, lwf)
    assert expected > 0 and penalty == pytest.approx(expected, rel=1e-5)
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6 * e.abs().max().item())

    # Without knowing their place, each share chooses among its own rows and averages over its own tokens.
    for b in shares:
        del b["global_rows"], b["global_answer_tokens"]
    assert _step(model, shares, lwf)[1] != pytest.approx(expected, rel=1e-3)


def test_distilled_rows_chosen_from_the_global_batch(tiny_model_and_tokenizer):
    _, tokenizer = tiny_model_and_tokenizer
    whole = _whole(tokenizer)
    answers = [len(e.answer_ids) for e in whole]
    chosen = spread_rows(8, 0.5).tolist()
    assert chosen == [0, 2, 5, 7]
    pad = tokenizer.pad_token_id
    rows, distilled, total = distilled_rows(collate(whole, pad), 0.5)  # no place given: its own global batch
    assert (rows.tolist(), distilled, total) == (chosen, sum(answers[i] for i in chosen), sum(answers))
    for r, share in enumerate(_shares(whole, pad, 2)):
        rows, distilled, total = distilled_rows(share, 0.5)
        assert [share["global_rows"][i] for i in rows.tolist()] == [g for g in chosen if g % 2 == r]
        assert (distilled, total) == (sum(answers[i] for i in chosen), sum(answers))
    packed = collate_packed(whole[:3], pad)  # one row: distilled whole
    n = sum(answers[:3])
    assert [(rows.tolist(), d, t) for rows, d, t in [distilled_rows(packed, 0.5)]] == [([0], n, n)]


def test_lwf_trains_the_same_steps_when_the_trainer_splits_its_batches(taught):
    """``train.micro_tokens`` cuts each batch of 8 into parts: LwF still distils the batch's chosen rows."""
    model, tokenizer, lwf = taught
    encoder = Encoder(tokenizer, 64, chat_template=False)
    examples = make_examples("a", 16, LABELS)
    start = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    widest = max(len(encoder.encode(e)) for e in examples)
    trained = []
    for micro_tokens in (-1, 2 * widest):  # whole batches; parts of at most 2 rows
        with torch.no_grad():
            for p, s in zip([p for p in model.parameters() if p.requires_grad], start):
                p.copy_(s)
        cfg = TrainConfig(lr=1e-2, batch_size=8, max_steps=3, warmup_steps=0, micro_tokens=micro_tokens)
        stats = train_stage(model, encoder, examples, [], cfg, [lwf], progress=False)
        trained.append(([p.detach().clone() for p in model.parameters() if p.requires_grad], stats.penalty))
    (whole, whole_penalty), (split, split_penalty) = trained
    assert whole_penalty > 0 and split_penalty == pytest.approx(whole_penalty, rel=1e-4)
    for a, b in zip(whole, split, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)  # observed 1e-7; they moved by up to 2e-2
    assert max((a - s).abs().max() for a, s in zip(whole, start)) > 1e-2
