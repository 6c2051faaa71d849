"""A-GEM: the projection formula, its exactness on the tiny model, its effect on forgetting, its state."""

import tempfile
from pathlib import Path

import pytest
import torch
from conftest import make_examples, make_stage

from continual_ft.config import LoraConfig, TrainConfig
from continual_ft.data.tasks import Example
from continual_ft.errors import ContinualFTError
from continual_ft.model.adapters import start_stage
from continual_ft.model.loading import load_model
from continual_ft.state_codec import load_tree, save_tree
from continual_ft.strategies import Strategy, build
from continual_ft.strategies.agem import AGEM, AGEMConfig, project
from continual_ft.train.batching import Encoder
from continual_ft.train.loop import train_stage, validation_loss
from continual_ft.train.protocol import run_stage


def flipped(examples: list[Example]) -> list[Example]:
    """The same prompts with the other answer: a stage that contradicts ``examples``."""
    return [Example("b", e.prompt, "no" if e.answer == "yes" else "yes", f"{e.group}b") for e in examples]


STEP = 1e-2  # length of the hand-made SGD step in parameter space


def fp32():
    return torch.autocast("cpu", enabled=False)


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def flat(tensors):
    return torch.cat([t.reshape(-1).float() for t in tensors])


def memory_loss(model, stage, examples) -> float:
    """The mean answer-token loss over ``examples`` in eval mode."""
    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for batch in stage.batches(examples):
            n = int((batch["labels"] != -100).sum())
            total, tokens = total + n * float(stage.loss_fn(model, batch)), tokens + n
    return total / tokens


def set_grads(params, g):
    offset = 0
    for p in params:
        p.grad = g[offset : offset + p.numel()].view_as(p).clone()
        offset += p.numel()


def memory_gradient(model, stage, examples):
    """∇ of the mean answer-token loss over ``examples`` in eval mode, computed apart from A-GEM."""
    model.eval()
    params = trainable(model)
    total, tokens = torch.zeros(sum(p.numel() for p in params)), 0
    for batch in stage.batches(examples):
        n = int((batch["labels"] != -100).sum())
        total += n * flat(torch.autograd.grad(stage.loss_fn(model, batch), params))
        tokens += n
    model.train()
    return total / tokens


@pytest.fixture
def agem_setup(tiny_model_and_tokenizer):
    """A-GEM whose memory holds all 8 examples of stage 0, and a stage 1 that contradicts them."""
    model, tokenizer = tiny_model_and_tokenizer
    with torch.no_grad():  # B = 0 at init would leave A without gradient
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    first = make_examples("a", 8)
    agem = AGEM(AGEMConfig(memory_size=8, reference_batch=8))
    agem.after_stage(model, make_stage(model, tokenizer, 0, first))
    return model, agem, make_stage(model, tokenizer, 1, flipped(first)), first


def test_projection_formula_on_hand_made_vectors():
    ref = torch.tensor([-1.0, 1.0, 0.0])
    g = torch.tensor([1.0, 0.0, 2.0])  # g·ref = -1 < 0
    out, projected = project(g, ref)
    assert projected
    torch.testing.assert_close(out, torch.tensor([0.5, 0.5, 2.0]))  # g − (−1 / 2) ref
    assert torch.dot(out, ref) == 0
    for g in (torch.tensor([1.0, 2.0, 0.0]), torch.tensor([1.0, 1.0, 5.0])):  # g·ref > 0 and = 0: untouched
        out, projected = project(g, ref)
        assert not projected and out is g
    gen = torch.Generator().manual_seed(0)
    g, ref = torch.randn(1000, generator=gen), torch.randn(1000, generator=gen)
    g = g - (torch.dot(g, ref) / torch.dot(ref, ref) + 1) * ref  # g·ref = −ref·ref
    out, _ = project(g, ref)
    assert abs(torch.dot(out, ref)) < 1e-3 * ref.norm() * g.norm()
    torch.testing.assert_close(out, g + ref)  # only the component along ref is removed


def test_projection_is_exact_and_leaves_an_agreeing_gradient_untouched(agem_setup):
    model, agem, stage, first = agem_setup
    params = trainable(model)
    ref = memory_gradient(model, stage, first)
    gen = torch.Generator().manual_seed(2)
    for sign in (-1.0, 1.0):  # against the memory's gradient, then along it
        noise = torch.randn(ref.shape, generator=gen)
        g = sign * ref + 0.5 * ref.norm() * noise / noise.norm()
        set_grads(params, g)
        before = [p.grad.clone() for p in params]
        agem.after_backward(model, stage, step=1)
        after = flat(p.grad for p in params)
        if sign < 0:
            torch.testing.assert_close(after, g - torch.dot(g, ref) / torch.dot(ref, ref) * ref, rtol=1e-4, atol=1e-7)
            assert abs(torch.dot(after, ref)) < 1e-4 * after.norm() * ref.norm()
        else:
            assert all(torch.equal(p.grad, b) for p, b in zip(params, before))  # bit for bit: the pass left it
    assert (agem.steps, agem.projected) == (2, 1)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_a_projected_step_does_not_raise_the_memory_loss(agem_setup):
    """A small SGD step along the projected gradient keeps the memory's loss (first order), the plain one raises it."""
    model, agem, stage, first = agem_setup
    params = trainable(model)
    ref = memory_gradient(model, stage, first)
    start = [p.detach().clone() for p in params]
    noise = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3))
    g = -ref + 0.5 * ref.norm() * noise / noise.norm()  # climbs the memory's loss, plus a part it may take

    def memory_loss_after_step(project_it: bool) -> float:
        with torch.no_grad():
            for p, s in zip(params, start):
                p.copy_(s)
        set_grads(params, g)
        if project_it:
            agem.after_backward(model, stage, step=1)
        with torch.no_grad():
            for p in params:
                p.sub_(STEP / float(g.norm()) * p.grad)
        return memory_loss(model, stage, first)

    before = memory_loss(model, stage, first)
    naive, projected = memory_loss_after_step(False) - before, memory_loss_after_step(True) - before
    assert naive > 0 and abs(projected) < 0.05 * naive, (naive, projected)


def test_agem_forgets_less_than_naive_on_contradicting_stages(tiny_model_and_tokenizer):
    """Stage 2 gives stage 1's prompts the other answer; A-GEM's memory holds stage 1.

    The final norm's weight is raised ×10 so the model can fit its answers: the stock tiny model
    (tied embeddings of std 0.02 after a unit RMSNorm) keeps every logit within about ±1.3, so the
    tokens both answers share (space, EOS) stay far from fitted and keep the two stages' gradients
    aligned. Observed: stage 1's loss 0.085, then +1.29 under naive and +0.44 under A-GEM.
    """
    _, tokenizer = tiny_model_and_tokenizer
    encoder = Encoder(tokenizer, 64, chat_template=False)
    first = make_examples("a", 8)
    rises = {}
    for spec in ("naive", "agem"):
        model, _ = load_model("tiny", seed=0)
        with torch.no_grad():
            model.model.norm.weight.mul_(10)
        model = start_stage(model, "continue", 0, LoraConfig(r=4, alpha=8))
        strategies = build(spec, {"agem": {"memory_size": 8, "reference_batch": 8}} if spec == "agem" else None)
        losses = []
        for k, (own, steps) in enumerate([(first, 30), (flipped(first), 15)]):
            cfg = TrainConfig(lr=5e-3, max_steps=steps, batch_size=4, warmup_steps=0, schedule="constant")
            stage = make_stage(model, tokenizer, k, own)

            def train(examples, model=model, stage=stage, cfg=cfg, strategies=strategies):
                return train_stage(model, encoder, examples, [], cfg, strategies, stage, progress=False)

            run_stage(model, stage, strategies, train)
            losses.append(validation_loss(model, encoder, first, 8, fp32))
        rises[spec] = losses[1] - losses[0]
        if spec == "agem":
            assert strategies[0].stats()["projected_share"] > 0
    assert rises["naive"] > 0.5  # naive forgets stage 1
    assert rises["agem"] < 0.6 * rises["naive"], rises


class GradientRecorder(Strategy):
    """Records the hook order and what ``after_backward`` sees; optionally zeroes the step's gradient."""

    name = "grad_recorder"

    def __init__(self, zero: bool = False):
        self.calls, self.zero = [], zero

    def penalty(self, model, batch, outputs):
        self.calls.append("penalty")
        return None

    def after_backward(self, model, stage, step):
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(g is not None for g in grads) and stage is not None
        self.calls.append(f"after_backward {step}")
        if self.zero:
            for g in grads:
                g.zero_()


def _fresh():
    model, tokenizer = load_model("tiny", seed=0)
    return start_stage(model, "continue", 0, LoraConfig(r=4, alpha=8)), tokenizer


def _train_trainer(strategies, stage_index=0, **cfg):
    model, tokenizer = _fresh()
    examples = make_examples("a", 16)
    stage = make_stage(model, tokenizer, stage_index, examples)
    config = TrainConfig(lr=1e-2, batch_size=4, warmup_steps=0, weight_decay=0.0, **cfg)
    encoder = Encoder(tokenizer, 64, chat_template=False)
    train_stage(model, encoder, examples, [], config, strategies, stage, progress=False)
    return model


def test_our_trainer_calls_after_backward_once_per_step_before_the_update():
    recorder = GradientRecorder()
    _train_trainer([recorder], max_steps=2, grad_accum=2)
    assert recorder.calls == ["penalty", "penalty", "after_backward 1", "penalty", "penalty", "after_backward 2"]
    fresh, _ = _fresh()
    zeroed = _train_trainer([GradientRecorder(zero=True)], max_steps=2)
    for p, q in zip(fresh.parameters(), zeroed.parameters()):
        assert torch.equal(p, q)  # the optimizer stepped with the gradient the hook left: none


def test_agem_combines_with_ewc_in_our_trainer(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    encoder = Encoder(tokenizer, 64, chat_template=False)
    strategies = build("ewc+agem", {"ewc": {"fisher_batches": 1}, "agem": {"memory_size": 4, "reference_batch": 4}})
    cfg = TrainConfig(lr=1e-2, max_steps=3, batch_size=4, warmup_steps=0)
    first = make_examples("a", 8)
    for k, own in enumerate([first, flipped(first)]):
        stage = make_stage(model, tokenizer, k, own)

        def train(examples, stage=stage):
            return train_stage(model, encoder, examples, [], cfg, strategies, stage, progress=False)

        done = run_stage(model, stage, strategies, train)
    ewc, agem = strategies
    assert done.result.penalty > 0  # EWC's penalty was in the gradient A-GEM saw
    assert agem.steps == 3  # the memory (stage 1's) was consulted at every step of stage 2
    assert len(agem.memory.buffer) == 4 and {e.task for e in agem.memory.buffer} == {"a", "b"}


def test_reference_every_n_steps_reuses_the_latest_reference_gradient(
    agem_setup, tiny_model_and_tokenizer, monkeypatch
):
    """reference_every=3: g_ref drawn at steps 1, 4, 7 (seeded by that step) and every step projected onto the
    latest; a new stage or a resumed object draws afresh; the paper's every-step rule is reference_every=1."""
    model, agem, stage, first = agem_setup
    agem.config.reference_every = 3
    params = trainable(model)
    drawn = []
    real = AGEM.reference_gradient

    def recording(self, model, stage, params, step):
        drawn.append((stage.index, step))
        return real(self, model, stage, params, step)

    monkeypatch.setattr(AGEM, "reference_gradient", recording)
    ref = memory_gradient(model, stage, first)  # the memory holds 8 = reference_batch: every draw is all of it
    for step in range(1, 8):
        g = -ref + 0.1 * step * torch.randn(ref.shape, generator=torch.Generator().manual_seed(step))
        set_grads(params, g)
        agem.after_backward(model, stage, step=step)
        after = flat(p.grad for p in params)
        assert abs(torch.dot(after, ref)) < 1e-4 * after.norm() * ref.norm()  # projected onto the kept g_ref
    assert drawn == [(1, 1), (1, 4), (1, 7)] and agem.stats()["references"] == 3 and agem.steps == 7
    resumed = AGEM(agem.config)  # a stage resumed at step 5: draws for its period's step, 4, at once
    resumed.memory.buffer = list(agem.memory.buffer)
    set_grads(params, -ref)
    resumed.after_backward(model, stage, step=5)
    resumed.after_backward(model, stage, step=6)
    assert drawn[3:] == [(1, 4)]
    agem.after_backward(model, make_stage(model, tiny_model_and_tokenizer[1], 2, first), step=1)
    assert drawn[-1] == (2, 1)  # the next stage's step 1 never reuses stage 1's g_ref
    agem.config.reference_every = 1
    drawn.clear()
    for step in (1, 2):
        agem.after_backward(model, stage, step=step)
    assert drawn == [(1, 1), (1, 2)]


def test_agem_without_memory_or_without_a_stage():
    agem = AGEM()
    agem.after_backward(None, None, step=1)  # stage 0: nothing to project onto, nothing run
    agem.memory.buffer = make_examples("a", 2)
    with pytest.raises(ContinualFTError, match="strategy=agem needs the stage"):
        agem.after_backward(None, None, step=1)


def roundtrip(state):
    """What the runner's files give back: ``save_tree`` as a stage ends, ``load_tree`` as ``resume`` reads it."""
    with tempfile.TemporaryDirectory() as root:
        save_tree(Path(root) / "state", state)
        return load_tree(Path(root) / "state")


def test_agem_state_round_trips(agem_setup):
    model, agem, stage, _ = agem_setup
    restored = AGEM(agem.config)
    restored.load_state_dict(roundtrip(agem.state_dict()))  # through the runner's own files
    assert restored.memory.buffer == agem.memory.buffer and len(restored.memory.buffer) == 8
    params = trainable(model)
    for step in (1, 2):  # the same reference batch for the same step: the same g_ref, bit for bit
        assert torch.equal(
            restored.reference_gradient(model, stage, params, step), agem.reference_gradient(model, stage, params, step)
        )


@pytest.mark.parametrize(
    "args, match",
    [
        ({"memory_size": 0}, r"agem\.memory_size must be >= 1, got 0"),
        ({"reference_batch": 0}, r"agem\.reference_batch must be >= 1, got 0"),
        ({"reference_every": 0}, r"agem\.reference_every must be >= 1, got 0"),
        ({"policy": "fifo"}, r"agem\.policy must be one of reservoir, task_balanced, got 'fifo'"),
    ],
)
def test_agem_config_checks(args, match):
    with pytest.raises(ContinualFTError, match=match):
        build("agem", {"agem": args})


def test_two_processes_project_as_one(tmp_path):
    """DDP (2 gloo processes): each rank scores its share of the reference batches and the shares are
    summed, so every rank projects the all-reduced gradient onto the same g_ref, the one process's."""
    from test_distributed import torchrun

    torchrun(Path(__file__).with_name("_agem_dist_worker.py"), tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["world"] == 2 and ranks[0]["projected"] == ranks[1]["projected"] == 1
    assert torch.equal(ranks[0]["hooked"], ranks[1]["hooked"])  # the same projection on every rank
    torch.testing.assert_close(ranks[0]["hooked"], ranks[0]["expected"], rtol=1e-5, atol=1e-7)
    assert torch.equal(ranks[0]["weights"], ranks[1]["weights"])  # and the ranks stay identical
