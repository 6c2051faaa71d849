"""Token-budget batches and packing: the same examples give the same loss and gradients as padded batches."""

import random

import pytest
import torch
from conftest import make_examples

from continual_ft.train.batching import Encoder, collate, collate_packed, length_grouped_batches
from continual_ft.train.losses import token_loss


@pytest.fixture
def encoded(tiny_model_and_tokenizer):
    _, tokenizer = tiny_model_and_tokenizer
    encoder = Encoder(tokenizer, 64, chat_template=False)
    long = [
        e.__class__(e.task, e.prompt + " with some more words" * (i % 4), e.answer, e.group)
        for i, e in enumerate(make_examples("a", 12))
    ]
    return [encoder.encode(e) for e in long + make_examples("b", 12, labels=("maybe not", "yes"))]


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    summed, n, _ = token_loss(model, batch)
    summed.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    return summed.item(), n, grads


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_packed_loss_and_gradients_equal_padded(tiny_model_and_tokenizer, encoded, dtype, rtol):
    model, tokenizer = tiny_model_and_tokenizer
    with torch.no_grad():  # a trained-looking adapter: B = 0 would make every LoRA A gradient 0
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    model.to(dtype)
    for n, p in model.named_parameters():  # PEFT keeps LoRA weights in fp32
        if "lora_" in n:
            p.data = p.data.float()
    items = encoded[:10]
    padded = _loss_and_grads(model, collate(items, tokenizer.pad_token_id))
    packed = _loss_and_grads(model, collate_packed(items))
    assert packed[1] == padded[1] == sum(len(e.answer_ids) for e in items)
    assert packed[0] == pytest.approx(padded[0], rel=rtol)
    for k, g in padded[2].items():
        assert (packed[2][k] - g).abs().max() <= rtol * g.abs().max() + 1e-6, k


def test_packed_examples_do_not_attend_to_each_other(tiny_model_and_tokenizer, encoded):
    model, _ = tiny_model_and_tokenizer
    a, b, c = encoded[0], encoded[1], encoded[13]
    with torch.no_grad():
        alone, _, _ = token_loss(model, collate_packed([c]))
        after_a, _, _ = token_loss(model, collate_packed([a, c]))
        after_b, _, _ = token_loss(model, collate_packed([b, c]))
        first_a, _, _ = token_loss(model, collate_packed([a]))
        first_b, _, _ = token_loss(model, collate_packed([b]))
    # The row's loss is the sum of its examples' losses: c's part is the same whatever precedes it.
    assert (after_a - first_a).item() == pytest.approx(alone.item(), rel=1e-5)
    assert (after_b - first_b).item() == pytest.approx(alone.item(), rel=1e-5)


@pytest.mark.parametrize("multiple", [1, 16])
@pytest.mark.parametrize("packed", [False, True])
def test_token_budget_batches_respect_the_budget_and_cover_every_example(encoded, packed, multiple):
    """The budget counts what the collator builds: the padded width (rounded up to ``multiple``) × rows."""
    budget = 120
    grouped = length_grouped_batches(encoded, 8, random.Random(0), max_tokens=budget, packed=packed, multiple=multiple)
    batches = list(grouped)
    seen = sorted(id(e) for b in batches for e in b)
    assert seen == sorted(id(e) for e in encoded)
    for b in batches:
        built = collate_packed(b, 0, multiple) if packed else collate(b, 0, multiple)
        assert built["input_ids"].numel() <= budget or len(b) == 1
    sizes = {len(b) for b in batches}
    assert len(sizes) > 1  # batches hold as many examples as fit, not a fixed count
