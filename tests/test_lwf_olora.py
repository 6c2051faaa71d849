"""LwF and O-LoRA: their penalties vanish where the method says they should and bite elsewhere."""

import dataclasses

import pytest
import torch
from conftest import make_examples, make_stage
from peft.tuners.lora import LoraLayer

from continual_ft.config import LoraConfig, make_config
from continual_ft.errors import ContinualFTError
from continual_ft.model.adapters import start_stage
from continual_ft.run.runner import run
from continual_ft.strategies import STRATEGIES
from continual_ft.strategies.lwf import LwF, LwFConfig, select_rows, spread_rows
from continual_ft.strategies.olora import OLoRA, OLoRAConfig
from continual_ft.train.losses import model_inputs, token_loss


def _perturb(model, scale=0.5, only=None):
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and (only is None or only in name):
                p.add_(scale * torch.randn_like(p))


def _stage_batch(model, tokenizer, index):
    stage = make_stage(model, tokenizer, index, make_examples("a", 8))
    return stage, next(iter(stage.batches(stage.examples)))


# ---- LwF ---------------------------------------------------------------------------------------


def test_lwf_has_no_teacher_in_the_first_stage(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    stage, batch = _stage_batch(model, tokenizer, 0)
    lwf = LwF()
    lwf.before_stage(model, stage)
    assert lwf.penalty(model, batch, token_loss(model, batch)[2]) is None


def test_lwf_is_zero_at_the_teacher_and_positive_after_a_perturbation(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    stage, batch = _stage_batch(model, tokenizer, 1)
    lwf = LwF(LwFConfig(alpha=1.0, temperature=2.0))
    lwf.before_stage(model, stage)
    assert lwf.penalty(model, batch, token_loss(model, batch)[2]).item() == pytest.approx(0.0, abs=1e-6)

    _perturb(model)
    summed, n, outputs = token_loss(model, batch)
    penalty = lwf.penalty(model, batch, outputs)
    assert penalty.item() > 1e-4
    (summed / n + penalty).backward()  # the teacher's swap left the autograd graph intact
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


def test_lwf_scales_with_alpha(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    stage, batch = _stage_batch(model, tokenizer, 1)
    one, three = LwF(LwFConfig(alpha=1.0)), LwF(LwFConfig(alpha=3.0))
    one.before_stage(model, stage)
    three.before_stage(model, stage)
    _perturb(model)
    outputs = token_loss(model, batch)[2]
    assert three.penalty(model, batch, outputs).item() == pytest.approx(3 * one.penalty(model, batch, outputs).item())


def test_spread_rows_and_select_rows_keep_each_rows_logits(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    assert spread_rows(8, 0.5).tolist() == [0, 2, 5, 7]
    assert spread_rows(8, 1.0).tolist() == list(range(8)) and spread_rows(3, 0.01).tolist() == [0]
    short, long = make_examples("a", 2), make_examples("b", 2)
    long = [dataclasses.replace(e, prompt="many more words " * 6 + e.prompt) for e in long]
    batch = next(iter(make_stage(model, tokenizer, 1, short + long).batches(short + long)))  # sorted by length
    rows = torch.tensor([0, 1])
    sub = select_rows(batch, rows)
    assert sub["tasks"] == ["a", "a"] and torch.equal(sub["labels"], batch["labels"][:2])
    assert sub["input_ids"].shape[1] < batch["input_ids"].shape[1]  # the long rows' padding is gone
    model.eval()
    with torch.no_grad():
        whole = model(**model_inputs(batch)).logits[:2]
        part = model(**model_inputs(sub)).logits
    torch.testing.assert_close(part, whole, rtol=1e-4, atol=1e-4)  # trimmed padding changes nothing


def test_lwf_fraction_distils_on_that_share_of_the_batch(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    stage, batch = _stage_batch(model, tokenizer, 1)
    half, whole = LwF(LwFConfig(fraction=0.5)), LwF(LwFConfig(fraction=1.0))
    for lwf in (half, whole):
        lwf.before_stage(model, stage)
    _perturb(model)
    seen = []
    teacher = half.teacher_logits
    half.teacher_logits = lambda m, b: seen.append(len(b["tasks"])) or teacher(m, b)
    outputs = token_loss(model, batch)[2]
    rows = spread_rows(len(batch["tasks"]), 0.5)
    sub = select_rows(batch, rows)
    expected = whole.penalty(model, sub, token_loss(model, sub)[2])  # the full-fraction KL over those rows alone
    assert half.penalty(model, batch, outputs).item() == pytest.approx(expected.item(), rel=1e-4)
    assert seen == [len(rows)] and 0 < len(rows) < len(batch["tasks"])


def test_lwf_teacher_forward_leaves_parameters_unchanged(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    stage, batch = _stage_batch(model, tokenizer, 1)
    lwf = LwF()
    lwf.before_stage(model, stage)
    model.eval()
    with torch.no_grad():
        before_logits = token_loss(model, batch)[2].logits
    _perturb(model)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    teacher = lwf.teacher_logits(model, batch)
    torch.testing.assert_close(teacher, before_logits)  # the snapshot's model, not the current one
    assert model.training
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n]), n


def test_lwf_with_new_adapter_teaches_the_previous_model(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    _perturb(model)  # stands in for training stage 1's adapter (its B is no longer zero)
    stage, batch = _stage_batch(model, tokenizer, 1)
    model.eval()
    with torch.no_grad():
        previous = token_loss(model, batch)[2].logits
    model = start_stage(model, "new", 1, LoraConfig())
    lwf = LwF()
    lwf.before_stage(model, stage)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(lwf.teacher) == trainable and all(".stage2." in n for n in trainable)
    torch.testing.assert_close(lwf.teacher_logits(model, batch), previous)
    model.train()
    assert lwf.penalty(model, batch, token_loss(model, batch)[2]).item() == pytest.approx(0.0, abs=1e-6)
    _perturb(model, only=".stage2.")
    assert lwf.penalty(model, batch, token_loss(model, batch)[2]).item() > 1e-4


def test_lwf_config_checks():
    with pytest.raises(ContinualFTError, match="lwf.temperature must be > 0"):
        LwFConfig(temperature=0)
    with pytest.raises(ContinualFTError, match="lwf.alpha must be >= 0"):
        LwFConfig(alpha=-1)


# ---- O-LoRA ------------------------------------------------------------------------------------


@pytest.fixture
def two_adapters(tiny_model_and_tokenizer):
    """The tiny model with an old adapter (``default``, frozen) and a new one (``stage2``, trainable)."""
    model, tokenizer = tiny_model_and_tokenizer
    model = start_stage(model, "new", 1, LoraConfig(r=8))
    stage, batch = _stage_batch(model, tokenizer, 1)
    return model, stage, batch


def _lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def test_olora_is_zero_for_orthogonal_factors_and_positive_otherwise(two_adapters):
    model, stage, batch = two_adapters
    olora = OLoRA(OLoRAConfig(lam=1.0, l2=0.0))
    olora.before_stage(model, stage)
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in _lora_layers(model):
            old, new = layer.lora_A["default"].weight, layer.lora_A["stage2"].weight
            r, d = old.shape
            q, _ = torch.linalg.qr(torch.randn(d, d))  # orthonormal columns: rows of A_old ⟂ rows of A_new
            old.copy_(q[:, :r].T)
            new.copy_(q[:, r : 2 * r].T)
    assert olora.penalty(model, batch, None).item() == pytest.approx(0.0, abs=1e-4)

    _perturb(model, scale=0.1, only="lora_A.stage2")
    expected = sum(
        (layer.lora_A["default"].weight @ layer.lora_A["stage2"].weight.T).abs().sum() for layer in _lora_layers(model)
    )
    penalty = olora.penalty(model, batch, None)
    assert penalty.item() > 1e-2
    assert penalty.item() == pytest.approx(expected.item(), rel=1e-5)


def test_olora_gradient_reaches_only_the_new_adapter(two_adapters):
    model, stage, batch = two_adapters
    _perturb(model, scale=0.1, only="lora_B.stage2")  # B starts at 0, where ‖B‖₂ has no gradient
    olora = OLoRA(OLoRAConfig(lam=1.0, l2=0.1))
    olora.before_stage(model, stage)
    olora.penalty(model, batch, None).backward()
    for name, p in model.named_parameters():
        if ".stage2." in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name  # A from both terms, B from the L2 term
        else:
            assert p.grad is None, name


def test_olora_first_stage_has_nothing_to_be_orthogonal_to():
    from continual_ft.model.loading import load_model

    model, tokenizer = load_model("tiny", seed=0)
    model = start_stage(model, "new", 0, LoraConfig())
    stage, batch = _stage_batch(model, tokenizer, 0)
    olora = OLoRA(OLoRAConfig(lam=1.0, l2=0.0))
    olora.before_stage(model, stage)
    assert olora.penalty(model, batch, None) is None
    olora = OLoRA(OLoRAConfig(lam=1.0, l2=0.5))
    olora.before_stage(model, stage)
    assert olora.penalty(model, batch, None).item() > 0  # only the L2 term


def test_olora_refuses_a_single_shared_adapter(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer  # adapter=continue
    stage, _ = _stage_batch(model, tokenizer, 1)
    with pytest.raises(ContinualFTError, match="adapter=new or stack"):
        OLoRA().before_stage(model, stage)


def test_runner_refuses_olora_without_a_new_adapter_per_stage(tmp_path):
    config = make_config(
        ["strategy=olora", "adapter=continue", "model=tiny", f"output_dir={tmp_path}"], strategy_names=tuple(STRATEGIES)
    )
    with pytest.raises(ContinualFTError, match="^strategy=olora needs adapter=new or stack: under adapter=continue "):
        run(config, progress=False)
    assert not any(tmp_path.iterdir())


def test_olora_config_checks():
    with pytest.raises(ContinualFTError, match="olora.lam must be >= 0"):
        OLoRAConfig(lam=-1)
    with pytest.raises(ContinualFTError, match="olora.l2 must be >= 0"):
        OLoRAConfig(l2=-0.1)
