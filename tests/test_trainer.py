"""Trainer invariants and effects on a tiny model."""

import copy
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from continual_ft.config import LoraConfig, TrainConfig
from continual_ft.data.tasks import Example
from continual_ft.model.adapters import start_stage
from continual_ft.model.loading import load_model
from continual_ft.train.batching import Encoder, collate, length_grouped_batches
from continual_ft.train.loop import backward_step, train_stage, validation_loss


def examples(n=16, seed=0):
    rng = random.Random(seed)
    labels = ["red", "blue", "green"]
    out = []
    for i in range(n):
        c = rng.choice(labels)
        out.append(Example("colors", f"Color of the {c} thing number {i}?\nAnswer:", c))
    return out


@pytest.fixture
def setup():
    model, tok = load_model("tiny", seed=0)
    model = start_stage(model, "continue", 0, LoraConfig(r=4, alpha=8))
    return model, Encoder(tok, max_length=64, chat_template=False)


def _grads(model):
    return [p.grad.clone() for p in model.parameters() if p.requires_grad]


def test_batch8_accum1_equals_batch1_accum8(setup):
    model, enc = setup
    items = [enc.encode(e) for e in examples(8)]
    pad = enc.tokenizer.pad_token_id
    m1, m2 = model, copy.deepcopy(model)
    backward_step(m1, [collate(items, pad)])
    backward_step(m2, [collate([it], pad) for it in items])
    for a, b in zip(_grads(m1), _grads(m2)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_loss_only_on_answer_tokens(setup):
    _, enc = setup
    items = [enc.encode(e) for e in examples(4)]
    batch = collate(items, enc.tokenizer.pad_token_id)
    assert int((batch["labels"] != -100).sum()) == sum(len(it.answer_ids) for it in items)
    for row, it in enumerate(items):
        targets = batch["labels"][row][batch["labels"][row] != -100].tolist()
        assert targets == list(it.answer_ids)
        assert targets[-1] == enc.tokenizer.eos_token_id


def test_length_grouping_wastes_little_padding(setup):
    _, enc = setup
    items = [enc.encode(Example("t", "word " * random.Random(i).randint(1, 40), "red")) for i in range(256)]
    rng = random.Random(0)
    real = padded = 0
    for b in length_grouped_batches(items, 8, rng):
        batch = collate(b, enc.tokenizer.pad_token_id)
        real += batch["n_tokens"]
        padded += batch["input_ids"].numel()
    assert real / padded > 0.9


def test_training_lowers_validation_loss_and_changes_only_adapters(setup):
    model, enc = setup
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
    data = examples(32)
    before = validation_loss(model, enc, data, 8, lambda: torch.autocast("cpu", enabled=False))
    train_stage(model, enc, data, [], TrainConfig(lr=1e-2, epochs=12, batch_size=8, max_grad_norm=0), progress=False)
    after = validation_loss(model, enc, data, 8, lambda: torch.autocast("cpu", enabled=False))
    assert after < before - 0.5
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], p) for n, p in frozen.items())
    assert any(not torch.equal(params[n], p) for n, p in trainable.items())


def test_early_stopping_keeps_best_weights(setup):
    model, enc = setup
    data = examples(32)
    # A learning rate this large makes validation loss climb after the first steps.
    cfg = TrainConfig(
        lr=3.0,
        schedule="constant",
        warmup_steps=0,
        max_steps=20,
        batch_size=4,
        eval_every=1,
        patience=2,
        max_grad_norm=0,
    )
    stats = train_stage(model, enc, data, data[:8], cfg, progress=False)
    assert stats.stopped_early and stats.steps < 20
    final = validation_loss(model, enc, data[:8], 4, lambda: torch.autocast("cpu", enabled=False))
    assert final == pytest.approx(stats.best_val_loss, rel=1e-5)
    assert stats.best_val_loss == min(stats.val_losses)


def test_same_seed_same_weights():
    outs = []
    for _ in range(2):
        model, tok = load_model("tiny", seed=0)
        model = start_stage(model, "continue", 0, LoraConfig(r=4))
        enc = Encoder(tok, max_length=64, chat_template=False)
        train_stage(
            model, enc, examples(16), [], TrainConfig(lr=1e-2, max_steps=3, batch_size=4), seed=1, progress=False
        )
        outs.append([p.detach().clone() for p in model.parameters() if p.requires_grad])
    assert all(torch.equal(a, b) for a, b in zip(*outs))


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak reset needs Linux /proc")
def test_peak_memory_is_per_run_after_a_reset():
    # A fresh process: in this one, earlier tests' freed memory may still be resident and hide the drop.
    code = """
import torch
from continual_ft.run.runner import peak_memory_mb, reset_peak_memory
cpu = torch.device("cpu")
reset_peak_memory(cpu)
big = torch.ones(300 * 2**20 // 4)  # 300 MB, touched
high = peak_memory_mb(cpu)
del big
reset_peak_memory(cpu)  # what run() does first: a later run in the same process starts afresh
print(high - peak_memory_mb(cpu))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(proc.stdout.split()[-1]) > 200


def _trained(model, enc, **train):
    cfg = TrainConfig(lr=1e-2, batch_size=8, max_steps=3, warmup_steps=0, **train)
    train_stage(model, enc, examples(16), [], cfg, progress=False)
    return [p.detach().clone() for p in model.parameters() if p.requires_grad]


def test_split_batches_train_the_same_steps(setup):
    """``train.micro_tokens`` splits a batch into forward passes of at most that many padded tokens: the same
    optimizer steps (the loss is normalised by the step's token count), in less memory per pass."""
    model, enc = setup
    widths = [len(enc.encode(e)) for e in examples(16)]
    assert 8 * max(widths) > 2 * max(widths)  # a budget of two rows does split every batch of 8
    whole = _trained(copy.deepcopy(model), enc, micro_tokens=-1)
    split = _trained(copy.deepcopy(model), enc, micro_tokens=2 * max(widths))
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(whole, [p for p in model.parameters() if p.requires_grad]))


def test_split_batch_respects_the_budget(setup):
    from continual_ft.train.batching import collate, padded_width, split_batch

    _, enc = setup
    items = [enc.encode(e) for e in examples(8)]
    budget = 3 * max(len(it) for it in items)
    parts = split_batch(items, budget)
    assert len(parts) > 1 and sorted(map(id, sum(parts, []))) == sorted(map(id, items))
    assert all(len(p) * max(len(it) for it in p) <= budget for p in parts)
    assert split_batch(items, 0) == [items]
    # The collator rounds widths up to the pad multiple: the budget holds for what is computed, padding included.
    for multiple in (16, 64):
        parts = split_batch(items, budget, multiple=multiple)
        assert sorted(map(id, sum(parts, []))) == sorted(map(id, items))
        widths = [padded_width(max(len(it) for it in p), multiple) for p in parts]
        assert all(len(p) * w <= budget for p, w in zip(parts, widths) if len(p) > 1)
        assert all(collate(p, 0, multiple)["input_ids"].numel() <= budget for p in parts if len(p) > 1)
    rounded = split_batch(items, budget, multiple=64)
    assert len(rounded) >= len(split_batch(items, budget))


def test_training_attention_is_set_while_training_and_restored(setup):
    model, enc = setup
    base = model.get_base_model()
    seen = []
    hook = base.model.layers[0].self_attn.register_forward_pre_hook(
        lambda module, args: seen.append(module.config._attn_implementation)
    )
    before = base.config._attn_implementation
    try:
        _trained(model, enc, attention="eager" if before != "eager" else "sdpa")
    finally:
        hook.remove()
    assert seen and set(seen) == {"eager" if before != "eager" else "sdpa"}
    assert base.config._attn_implementation == before


def test_gradient_checkpointing_trains_the_same_steps_and_recomputes(setup):
    """``train.gradient_checkpointing`` recomputes each decoder layer in the backward pass (its forward runs
    twice per micro-batch), trains the same weights, and is off again once the stage is done."""
    model, enc = setup
    layer = model.get_base_model().model.layers[0].mlp  # a module inside the recomputed layer
    calls = {"n": 0}

    def count(module, args):
        calls["n"] += 1

    plain = _trained(copy.deepcopy(model), enc, micro_tokens=-1)
    ckpt_model = copy.deepcopy(model)
    hook = ckpt_model.get_base_model().model.layers[0].mlp.register_forward_pre_hook(count)
    try:
        ckpt = _trained(ckpt_model, enc, micro_tokens=-1, gradient_checkpointing=True)
    finally:
        hook.remove()
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert calls["n"] == 2 * 3  # 3 steps of one micro-batch: a forward and its recomputation each
    assert not any(getattr(m, "gradient_checkpointing", False) for m in ckpt_model.modules())
    hook = layer.register_forward_pre_hook(count)  # and without it, one forward per step
    calls["n"] = 0
    try:
        _trained(model, enc, micro_tokens=-1)
    finally:
        hook.remove()
    assert calls["n"] == 3


def test_padding_to_a_multiple_trains_the_same_steps(setup):
    """``train.pad_to_multiple_of`` only widens the (masked) padding: the same weights, in fewer distinct shapes."""
    from continual_ft.train.batching import collate, collate_packed

    model, enc = setup
    items = [enc.encode(e) for e in examples(5)]
    longest = max(len(it) for it in items)
    for multiple in (1, 7, 64):
        padded, packed = collate(items, 0, multiple), collate_packed(items, 0, multiple)
        assert padded["input_ids"].shape[1] == -(-longest // multiple) * multiple
        assert packed["input_ids"].shape[1] % multiple == 0
        assert padded["n_tokens"] == packed["n_tokens"] == sum(len(it) for it in items)
    assert collate(items, 0, 64)["input_ids"].shape[1] > longest  # the test does widen the rows
    plain = _trained(copy.deepcopy(model), enc, micro_tokens=-1, pad_to_multiple_of=1)
    for packing in (False, True):
        wide = _trained(copy.deepcopy(model), enc, micro_tokens=-1, pad_to_multiple_of=64, packing=packing)
        for a, b in zip(plain, wide):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
