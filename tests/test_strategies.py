"""Effects of each strategy on tiny inputs: what the buffer holds, what the penalty is, what gets sampled."""

import dataclasses
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import make_examples, make_stage

from continual_ft.config import LoraConfig
from continual_ft.model.adapters import start_stage
from continual_ft.state_codec import load_tree, save_tree
from continual_ft.strategies import StageInfo, build
from continual_ft.strategies.ewc import EWC, EWCConfig
from continual_ft.strategies.joint import Joint
from continual_ft.strategies.replay import Replay, ReplayConfig
from continual_ft.strategies.task_balanced import TaskBalanced, TaskBalancedConfig


def info(index, examples):
    """A StageInfo for strategies that never touch the model (batches/loss unused)."""
    return StageInfo(index, sorted({e.task for e in examples}), list(examples), batches=None, loss_fn=None)


def roundtrip(state):
    """What the runner's files give back: ``save_tree`` as a stage ends, ``load_tree`` as ``resume`` reads it."""
    with tempfile.TemporaryDirectory() as root:
        save_tree(Path(root) / "state", state)
        return load_tree(Path(root) / "state")


# --- replay -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["reservoir", "task_balanced"])
def test_replay_buffer_holds_only_earlier_tasks_within_size(policy):
    replay = Replay(ReplayConfig(buffer_size=10, ratio=0.5, policy=policy))
    for k, task in enumerate(["a", "b", "c", "d"]):
        own = make_examples(task, 30)
        stage = info(k, own)
        assert task not in {e.task for e in replay.buffer}
        data = replay.train_data(stage, own)
        assert data[: len(own)] == own
        replayed = data[len(own) :]
        assert len(replayed) == (0 if k == 0 else 30)
        assert {e.task for e in replayed} <= set("abcd"[:k])
        replay.after_stage(None, stage)
        assert len(replay.buffer) <= 10
        assert {e.task for e in replay.buffer} <= set("abcd"[: k + 1])
    assert len(replay.buffer) == 10


def test_reservoir_is_uniform_over_the_stream():
    per_task = Counter()
    seeds, size = 30, 100
    for seed in range(seeds):
        replay = Replay(ReplayConfig(buffer_size=size, policy="reservoir", seed=seed))
        for k in range(5):
            replay.after_stage(None, info(k, make_examples(f"t{k}", 200)))
        assert len(replay.buffer) == size and replay.seen == 1000
        per_task.update(e.task for e in replay.buffer)
    means = [per_task[f"t{k}"] / seeds for k in range(5)]
    assert all(abs(m - 20) < 3 for m in means), means  # each stage is 1/5 of the stream


def test_task_balanced_buffer_gives_equal_shares():
    replay = Replay(ReplayConfig(buffer_size=12, policy="task_balanced"))
    expected = [{"a": 12}, {"a": 6, "b": 6}, {"a": 4, "b": 4, "c": 4}]
    for k, task in enumerate("abc"):
        replay.after_stage(None, info(k, make_examples(task, 50)))
        assert Counter(e.task for e in replay.buffer) == expected[k]
    replay = Replay(ReplayConfig(buffer_size=10, policy="task_balanced"))
    replay.after_stage(None, info(0, make_examples("a", 50) + make_examples("b", 2)))  # a two-task stage
    replay.after_stage(None, info(1, make_examples("c", 50)))
    assert Counter(e.task for e in replay.buffer) == {"a": 4, "b": 2, "c": 3}  # b has only 2 to give


def test_replay_ratio_gives_expected_count():
    replay = Replay(ReplayConfig(buffer_size=5, ratio=0.25))
    replay.after_stage(None, info(0, make_examples("a", 5)))
    own = make_examples("b", 30)
    assert len(replay.train_data(info(1, own), own)) == 30 + 10  # 0.25 / 0.75 × 30
    replay.config.ratio = 0.5  # more than the buffer holds: whole passes over it
    replayed = replay.train_data(info(1, own), own)[30:]
    assert len(replayed) == 30 and set(Counter(replayed).values()) == {6}


def test_replay_state_round_trips():
    replay = Replay(ReplayConfig(buffer_size=7, policy="task_balanced", seed=3))
    for k, task in enumerate("ab"):
        replay.after_stage(None, info(k, make_examples(task, 20)))
    restored = Replay(replay.config)
    restored.load_state_dict(roundtrip(replay.state_dict()))
    assert (restored.buffer, restored.seen, restored.tasks) == (replay.buffer, replay.seen, replay.tasks)
    own = make_examples("c", 20)
    assert restored.train_data(info(2, own), own) == replay.train_data(info(2, own), own)


# --- EWC ----------------------------------------------------------------------------------------------


def trained_lora(model):
    """Give every LoRA B a non-zero value (B = 0 at init), as after a stage of training."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))


@pytest.fixture
def ewc_setup(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    trained_lora(model)
    stage = make_stage(model, tokenizer, 0, make_examples("a", 12))
    return model, tokenizer, stage


def test_ewc_penalty_zero_at_anchor_and_positive_after_perturbation(ewc_setup):
    model, _, stage = ewc_setup
    ewc = EWC(EWCConfig(lam=10.0, fisher_batches=2))
    batch = next(iter(stage.batches(stage.examples)))
    assert ewc.penalty(model, batch, None) is None  # nothing anchored yet
    ewc.after_stage(model, stage)
    assert ewc.penalty(model, batch, None).item() == 0.0
    name, param = next((n, p) for n, p in model.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        param.add_(0.1)
    penalty = ewc.penalty(model, batch, None)
    assert penalty.item() > 0 and penalty.requires_grad
    expected = 10.0 / 2 * (ewc.anchors[0]["fisher"][name] * 0.1**2).sum()
    torch.testing.assert_close(penalty.detach(), expected, rtol=1e-4, atol=0)
    assert all(p.grad is None for p in model.parameters())  # the Fisher pass leaves no stray gradients


def test_ewc_skips_the_fisher_after_the_runs_last_stage(ewc_setup):
    model, _, stage = ewc_setup
    ewc = EWC(EWCConfig(fisher_batches=2))
    calls = []
    ewc.fisher = lambda *a: calls.append(a) or EWC.fisher(ewc, *a)
    ewc.after_stage(model, dataclasses.replace(stage, final=True))
    assert calls == [] and ewc.anchors == []  # no later stage would be penalised with it
    ewc.after_stage(model, stage)
    assert len(calls) == 1 and len(ewc.anchors) == 1


def test_ewc_fisher_only_trainable_non_negative_normalised(ewc_setup):
    model, _, stage = ewc_setup
    ewc = EWC(EWCConfig(fisher_batches=2))
    ewc.after_stage(model, stage)
    fisher, anchor = ewc.anchors[0]["fisher"], ewc.anchors[0]["anchor"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(fisher) == set(anchor) == trainable and all("lora_" in n for n in trainable)
    assert sum(f.numel() for f in fisher.values()) < sum(p.numel() for p in model.parameters()) / 4
    assert all((f >= 0).all() and f.device.type == "cpu" for f in fisher.values())
    assert max(float(f.max()) for f in fisher.values()) == pytest.approx(1.0)
    assert sum(float(f.sum()) for f in fisher.values()) > 1  # more than the one normalising entry


def test_online_ewc_decays_old_fisher(ewc_setup):
    model, _, stage = ewc_setup
    online = EWC(EWCConfig(online=True, gamma=0.5, fisher_batches=2))
    plain = EWC(EWCConfig(fisher_batches=2))
    for ewc in (online, plain):
        ewc.after_stage(model, stage)
    first = {n: f.clone() for n, f in online.anchors[0]["fisher"].items()}
    for ewc in (online, plain):
        ewc.after_stage(model, stage)  # same weights, same data: F_new = F_old
    assert len(online.anchors) == 1 and len(plain.anchors) == 2
    for n, f in first.items():
        torch.testing.assert_close(online.anchors[0]["fisher"][n], 1.5 * f)  # γ·F_old + F_new


def test_ewc_skips_frozen_and_new_adapter_params(ewc_setup):
    model, _, stage = ewc_setup
    ewc = EWC(EWCConfig(fisher_batches=1))
    ewc.after_stage(model, stage)
    model = start_stage(model, "new", 1, LoraConfig())  # "default" frozen, "stage2" trainable and unanchored
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    batch = next(iter(stage.batches(stage.examples)))
    assert ewc.penalty(model, batch, None) is None


def test_ewc_state_round_trips(ewc_setup):
    model, _, stage = ewc_setup
    ewc = EWC(EWCConfig(fisher_batches=1))
    ewc.after_stage(model, stage)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_A" in n).add_(0.2)
    restored = EWC(ewc.config)
    restored.load_state_dict(roundtrip(ewc.state_dict()))
    batch = next(iter(stage.batches(stage.examples)))
    assert restored.penalty(model, batch, None).item() == ewc.penalty(model, batch, None).item() > 0


# --- task-balanced sampling ---------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.0, 0.5])
def test_task_balanced_proportions(temperature):
    sizes = {"a": 600, "b": 300, "c": 100}
    examples = [e for t, n in sizes.items() for e in make_examples(t, n)]
    out = TaskBalanced(TaskBalancedConfig(temperature=temperature, seed=1)).train_data(info(0, examples), examples)
    assert len(out) == len(examples)
    got = Counter(e.task for e in out)
    norm = sum(n**temperature for n in sizes.values())
    for t, n in sizes.items():
        assert abs(got[t] / len(out) - n**temperature / norm) < 0.002
    assert all(e.task in sizes for e in out)
    if temperature == 1.0:
        assert sorted(out, key=lambda e: e.group) == sorted(examples, key=lambda e: e.group)  # a permutation


def test_task_balanced_total_and_seed():
    examples = make_examples("a", 50) + make_examples("b", 10)
    tb = TaskBalanced(TaskBalancedConfig(temperature=0.0, total=40))
    out = tb.train_data(info(0, examples), examples)
    assert Counter(e.task for e in out) == {"a": 20, "b": 20}
    assert len(set(e for e in out if e.task == "a")) == 20  # subsampled without repetition
    assert out == tb.train_data(info(0, examples), examples)


def test_replay_then_task_balanced_rebalances_the_mixed_set():
    replay, balanced = build("replay+task_balanced", {"replay": {"buffer_size": 8, "ratio": 0.2}})
    replay.after_stage(None, info(0, make_examples("a", 40)))
    own = make_examples("b", 40)
    data = own
    for s in (replay, balanced):
        data = s.train_data(info(1, own), data)
    assert len(data) == 50 and Counter(e.task for e in data) == {"a": 25, "b": 25}


# --- joint --------------------------------------------------------------------------------------------


def test_joint_accumulates_all_tasks_so_far():
    joint = Joint()
    for k, task in enumerate("abc"):
        own = make_examples(task, 5)
        data = joint.train_data(info(k, own), own)
        assert Counter(e.task for e in data) == {t: 5 for t in "abc"[: k + 1]}
        joint.after_stage(None, info(k, own))
    own = make_examples("a", 5)  # a task seen again is not duplicated
    assert len(joint.train_data(info(3, own), own)) == 15
    restored = Joint()
    restored.load_state_dict(roundtrip(joint.state_dict()))
    assert restored.examples == joint.examples and len(joint.examples) == 15
