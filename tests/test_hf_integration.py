"""The HF Trainer integration: penalties reach the loss, the hooks fire in order, the adapter trains."""

import pytest
import torch
from conftest import make_examples
from loop_effects import LOOP_CASES, two_stages

from continual_ft.config import LoraConfig
from continual_ft.errors import ContinualFTError
from continual_ft.integrations import hf_trainer as hf
from continual_ft.integrations.hf_trainer import Collator, ContinualTrainer, ExampleDataset, stage_info, train_stage_hf
from continual_ft.model.adapters import start_stage
from continual_ft.model.loading import load_model
from continual_ft.strategies import Strategy
from continual_ft.strategies.agem import AGEM, AGEMConfig
from continual_ft.strategies.lwf import LwF
from continual_ft.train.batching import Encoder
from continual_ft.train.losses import mean_token_loss

pytest.importorskip("accelerate")  # transformers.Trainer needs it
from transformers import TrainingArguments  # noqa: E402


class Constant(Strategy):
    """A penalty of 5.0 with no gradient: it must show in the loss and change nothing else."""

    name = "constant"

    def penalty(self, model, batch, outputs):
        return torch.tensor(5.0)


class Recorder(Strategy):
    """Records every hook call (Avalanche's MockPlugin)."""

    name = "recorder"

    def __init__(self):
        self.calls = []

    def train_data(self, stage, examples):
        self.calls.append("train_data")
        return examples

    def before_stage(self, model, stage):
        self.calls.append("before_stage")

    def penalty(self, model, batch, outputs):
        assert outputs.logits.shape[1] == batch["logits_to_keep"]  # logits_to_keep reached the forward
        assert batch["labels"].shape[1] == batch["logits_to_keep"] - 1
        assert all(t == "a" for t in batch["tasks"])
        self.calls.append("penalty")
        return None

    def after_backward(self, model, stage, step):
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad) and stage is not None
        self.calls.append(f"after_backward {step}")

    def after_stage(self, model, stage):
        self.calls.append("after_stage")


def _setup(seed=0):
    model, tokenizer = load_model("tiny", seed=seed)
    model = start_stage(model, "continue", 0, LoraConfig(r=4, alpha=8))
    return model, tokenizer, Encoder(tokenizer, max_length=64, chat_template=False)


def _args(tmp_path, **kw):
    return TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=kw.pop("max_steps", 3),
        per_device_train_batch_size=4,
        learning_rate=kw.pop("learning_rate", 1e-2),
        lr_scheduler_type="constant",
        logging_steps=1,
        seed=0,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        dataloader_pin_memory=False,
        **kw,
    )


def _train(tmp_path, strategies, examples):
    model, tokenizer, encoder = _setup()
    trainer = train_stage_hf(
        model, tokenizer, examples, strategies, stage_info(0, examples, encoder), _args(tmp_path), encoder=encoder
    )
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return model, losses


def test_penalty_raises_the_reported_loss_and_the_adapter_trains(tmp_path):
    examples = make_examples("a", 16)
    plain_model, plain = _train(tmp_path / "plain", [], examples)
    model, penalised = _train(tmp_path / "penalised", [Constant()], examples)
    assert len(plain) == len(penalised) == 3
    for a, b in zip(plain, penalised):
        assert b - a == pytest.approx(5.0, abs=1e-3)

    fresh, _, _ = _setup()
    trained = dict(model.named_parameters())
    moved = [n for n, p in fresh.named_parameters() if p.requires_grad and not torch.equal(p, trained[n])]
    assert moved and any("lora_B" in n for n in moved)
    for p, q in zip(model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(p, q)  # a constant has no gradient: the same training as without it


def test_compute_loss_is_the_mean_answer_token_loss(tmp_path):
    model, tokenizer, encoder = _setup()
    items = ExampleDataset(make_examples("a", 4), encoder)
    batch = Collator(tokenizer.pad_token_id)([items[i] for i in range(len(items))])
    trainer = ContinualTrainer(model=model, args=_args(tmp_path), strategies=[Constant()])
    model.eval()  # penalties are for training only: eval_loss is the plain task loss
    with torch.no_grad():
        torch.testing.assert_close(trainer.compute_loss(model, batch), mean_token_loss(model, batch))
        model.train()
        torch.testing.assert_close(trainer.compute_loss(model, batch), mean_token_loss(model, batch) + 5.0)


def test_train_stage_hf_calls_the_hooks_in_order(tmp_path):
    model, tokenizer, encoder = _setup()
    examples = make_examples("a", 16)
    recorder = Recorder()
    train_stage_hf(
        model,
        tokenizer,
        examples,
        [recorder],
        stage_info(0, examples, encoder),
        _args(tmp_path, max_steps=2, gradient_accumulation_steps=2),
        encoder=encoder,
    )
    steps = [*["penalty", "penalty", "after_backward 1"], *["penalty", "penalty", "after_backward 2"]]
    assert recorder.calls == ["train_data", "before_stage", *steps, "after_stage"]  # a step's gradient is complete


class ZeroGradient(Strategy):
    """Zeroes every gradient in ``after_backward``: the optimizer must then leave the weights alone."""

    name = "zero"

    def after_backward(self, model, stage, step):
        for p in model.parameters():
            if p.grad is not None:
                p.grad.zero_()


def test_after_backward_comes_before_the_optimizer_step(tmp_path):
    model, _ = _train(tmp_path, [ZeroGradient()], make_examples("a", 16))
    fresh, _, _ = _setup()
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(p, q)  # AdamW (no weight decay) with zero gradients: no change


def test_agem_consults_its_memory_every_step_inside_the_trainer(tmp_path):
    model, tokenizer, encoder = _setup()
    agem = AGEM(AGEMConfig(memory_size=4, reference_batch=4))
    agem.after_stage(model, stage_info(0, make_examples("a", 8), encoder))
    examples = make_examples("b", 16)
    train_stage_hf(
        model, tokenizer, examples, [agem], stage_info(1, examples, encoder), _args(tmp_path), encoder=encoder
    )
    assert agem.steps == 3 and 0 <= agem.stats()["projected_share"] <= 1


def test_gradient_hooks_are_refused_over_several_processes(tmp_path, monkeypatch):
    monkeypatch.setattr(TrainingArguments, "world_size", property(lambda self: 2))
    model, _, _ = _setup()
    with pytest.raises(ContinualFTError, match="^strategy=agem needs its after_backward hook, which the HF Trainer"):
        ContinualTrainer(model=model, args=_args(tmp_path), strategies=[AGEM()])


def test_lwf_choosing_rows_per_process_is_refused_over_several_processes(tmp_path, monkeypatch):
    from continual_ft.strategies.lwf import LwFConfig

    monkeypatch.setattr(TrainingArguments, "world_size", property(lambda self: 2))
    model, _, _ = _setup()
    with pytest.raises(ContinualFTError, match="^strategy=lwf with lwf.fraction=0.5 and the HF Trainer over 2"):
        ContinualTrainer(model=model, args=_args(tmp_path), strategies=[LwF()])
    ContinualTrainer(model=model, args=_args(tmp_path), strategies=[LwF(LwFConfig(fraction=1.0))])


def test_a_strategy_with_a_loop_of_its_own_is_refused(tmp_path):
    from continual_ft.strategies import build

    model, _, _ = _setup()
    (avalanche_ewc,) = build("avalanche:ewc")  # trained by Avalanche's loop: every hook of it is a no-op
    with pytest.raises(ContinualFTError, match="^strategy=avalanche:ewc trains in a loop of its own"):
        ContinualTrainer(model=model, args=_args(tmp_path), strategies=[avalanche_ewc])


def test_lwf_works_inside_the_trainer(tmp_path):
    model, tokenizer, encoder = _setup()
    lwf = LwF()
    seen = []
    original = lwf.penalty

    def spy(model, batch, outputs):
        value = original(model, batch, outputs)
        seen.append(value.item())
        return value

    lwf.penalty = spy
    examples = make_examples("a", 16)
    train_stage_hf(
        model, tokenizer, examples, [lwf], stage_info(1, examples, encoder), _args(tmp_path), encoder=encoder
    )
    assert seen[0] == pytest.approx(0.0, abs=1e-6) and seen[-1] > 0  # equal to its teacher, then it moved away


@pytest.mark.parametrize("name", list(LOOP_CASES))
def test_each_strategy_acts_inside_the_trainer(name, tmp_path, monkeypatch):
    """Two stages through ``train_stage_hf`` show each strategy's effect (tests/loop_effects.py): what the
    Trainer was given to train on (task_balanced's resampled shares, joint's earlier stage, replay's and
    SSR's examples in stage 2, naive's own), or a penalty with a gradient in stage 2 (EWC, LwF, and O-LoRA
    with a new adapter per stage)."""
    given = []

    class Recording(ExampleDataset):
        def __init__(self, examples, encoder):
            super().__init__(examples, encoder)
            given.append(self.items)

    monkeypatch.setattr(hf, "ExampleDataset", Recording)

    def loop(model, encoder, k, examples, strategies, final):
        stage = stage_info(k, examples, encoder, batch_size=4, final=final)
        args = _args(tmp_path / f"stage{k}", learning_rate=1e-3)  # at 1e-2 the tiny model answers SSR blank
        train_stage_hf(model, encoder.tokenizer, examples, strategies, stage, args, encoder=encoder)
        return given[-1]

    LOOP_CASES[name].effect(two_stages(name, loop))
