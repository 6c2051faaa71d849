"""Avalanche, both ways, on the tiny model: our scenario as an Avalanche benchmark, Avalanche's strategies
in our runner beside ours, our strategies as Avalanche plugins, and the two libraries' metrics.

Needs avalanche-lib, which needs a torch that torchvision is built for: ``bash scripts/install_avalanche.sh``
makes ``.venv-avalanche``, and ``scripts/test.sh`` runs this file there.
"""

import json
import warnings
from collections import Counter

import pytest

pytest.importorskip("avalanche", reason="needs avalanche-lib: bash scripts/install_avalanche.sh (its own venv)")

import torch  # noqa: E402
from avalanche.core import SupervisedPlugin  # noqa: E402
from avalanche.evaluation.metrics import BWT, Forgetting  # noqa: E402
from avalanche.training import Naive  # noqa: E402
from avalanche.training.plugins import EvaluationPlugin  # noqa: E402
from avalanche.training.plugins.ewc import EWCPlugin  # noqa: E402
from avalanche.training.templates import SupervisedMetaLearningTemplate  # noqa: E402
from conftest import make_examples  # noqa: E402
from recording import Recording, expected  # noqa: E402
from toy import write_toy_scenario  # noqa: E402

from continual_ft.config import LoraConfig, TrainConfig, make_config  # noqa: E402
from continual_ft.data.scenario import load_scenario  # noqa: E402
from continual_ft.data.tasks import Example  # noqa: E402
from continual_ft.errors import ContinualFTError  # noqa: E402
from continual_ft.eval import metrics  # noqa: E402
from continual_ft.integrations.avalanche import (  # noqa: E402
    CausalLMClassifier,
    StrategyPlugin,
    benchmark,
    experience,
    run_experience,
)
from continual_ft.model.adapters import start_stage  # noqa: E402
from continual_ft.model.loading import load_model  # noqa: E402
from continual_ft.run.checks import check_config  # noqa: E402
from continual_ft.strategies import STRATEGIES, Strategy, build, strategy_names  # noqa: E402
from continual_ft.strategies.agem import AGEM, AGEMConfig  # noqa: E402
from continual_ft.strategies.ewc import EWC, EWCConfig  # noqa: E402
from continual_ft.strategies.joint import Joint  # noqa: E402
from continual_ft.strategies.lwf import LwF  # noqa: E402
from continual_ft.strategies.olora import OLoRA  # noqa: E402
from continual_ft.strategies.replay import Replay, ReplayConfig  # noqa: E402
from continual_ft.strategies.ssr import SSR, SSRConfig  # noqa: E402
from continual_ft.strategies.task_balanced import TaskBalanced, TaskBalancedConfig  # noqa: E402
from continual_ft.study.compare import compare, format_table  # noqa: E402
from continual_ft.train.batching import Encoder, collate  # noqa: E402
from continual_ft.train.losses import mean_token_loss  # noqa: E402

TRAIN, TEST = 16, 6


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_toy_scenario(tmp_path_factory.mktemp("toy"), n=60, train=TRAIN, test=TEST)


@pytest.fixture
def lm_and_encoder():
    torch.manual_seed(0)
    model, tokenizer = load_model("tiny", seed=0)
    model = start_stage(model, "continue", 0, LoraConfig(r=4, alpha=8))
    return model, Encoder(tokenizer, max_length=64, chat_template=False)


def _naive(lm, plugins=(), lr=1e-2):
    wrapped = CausalLMClassifier(lm)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    return Naive(
        model=wrapped,
        optimizer=torch.optim.AdamW(params, lr=lr),
        criterion=torch.nn.CrossEntropyLoss(),
        train_mb_size=4,
        train_epochs=1,
        plugins=list(plugins),
        evaluator=EvaluationPlugin(loggers=[]),
    )


# 1. Scenario -> Avalanche benchmark


def test_benchmark_has_one_experience_per_stage_with_task_labels_and_sizes(toy, lm_and_encoder):
    _, encoder = lm_and_encoder
    scenario = load_scenario(str(toy))
    bm = benchmark(scenario, encoder)
    for stream, size in (("train", TRAIN), ("test", TEST)):
        exps = list(getattr(bm, f"{stream}_stream"))
        assert len(exps) == len(scenario.stages) == 2
        for i, (exp, stage) in enumerate(zip(exps, scenario.stages)):
            assert exp.current_experience == i
            assert exp.task_label == i and exp.task_labels == [i]  # colors 0, animals 1
            assert len(exp.dataset) == size
            items = [exp.dataset[k] for k in range(len(exp.dataset))]
            assert {it["example"].task for it in items} == set(stage.tasks)
            assert all(it["targets_task_labels"] == i for it in items)
            assert [it["example"] for it in items] == getattr(scenario.tasks[stage.tasks[0]], stream)


def test_a_multi_task_stage_is_one_experience_with_both_task_labels(toy, lm_and_encoder):
    joint = toy.parent / "joint.yaml"
    joint.write_text(toy.read_text().split("stages:")[0] + "stages:\n  - {name: both, tasks: [colors, animals]}\n")
    exp = next(iter(benchmark(load_scenario(str(joint)), lm_and_encoder[1]).train_stream))
    assert sorted(exp.task_labels) == [0, 1] and len(exp.dataset) == 2 * TRAIN


def test_the_classifier_view_gives_our_answer_token_loss(toy, lm_and_encoder):
    lm, encoder = lm_and_encoder
    exp = next(iter(benchmark(load_scenario(str(toy)), encoder).train_stream))
    x, y, t = exp.dataset.collate_fn([exp.dataset[k] for k in range(5)])
    assert t.tolist() == [0] * 5 and x["input_ids"].shape[0] == 5
    avalanche_loss = torch.nn.CrossEntropyLoss()(CausalLMClassifier(lm)(x), y)
    ours = mean_token_loss(lm, collate([encoder.encode(exp.dataset[k]["example"]) for k in range(5)], 0))
    assert torch.allclose(avalanche_loss, ours, atol=1e-5)


def test_avalanche_naive_trains_the_lora_adapter_on_the_benchmark(toy, lm_and_encoder):
    lm, encoder = lm_and_encoder
    before = {n: p.detach().clone() for n, p in lm.named_parameters() if p.requires_grad}
    strategy = _naive(lm)
    for exp in benchmark(load_scenario(str(toy)), encoder).train_stream:
        strategy.train(exp)
    moved = [n for n, p in lm.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any("lora_B" in n for n in moved)
    frozen = {n: p for n, p in lm.named_parameters() if not p.requires_grad}
    assert frozen and all(p.grad is None for p in frozen.values())


# 2. Avalanche's strategies in our runner, beside ours


def test_runner_writes_avalanche_runs_that_compare_lists_beside_ours(toy, tmp_path):
    grid = [
        f"scenario={toy}",
        "strategy=naive,avalanche:naive,ewc,avalanche:ewc",
        "model=tiny",
        "precision=fp32",
        f"output_dir={tmp_path}",
        "train.batch_size=4",
        "train.lr=1e-2",
        "eval.batch_size=16",
    ]
    result = compare(grid, out=tmp_path / "report", progress=False, log=lambda _: None)
    names = [e.name for e in result.entries]
    assert names == [f"toy-{s}-continue" for s in ("naive", "avalanche:naive", "ewc", "avalanche:ewc")]
    for e in result.entries:
        data = json.loads((e.run_dir / "results.json").read_text())
        assert data["complete"] and len(data["R"]["accuracy"]) == 3  # before training + one row per stage
        stats = data["stage_stats"]
        assert [s["steps"] for s in stats] == [TRAIN // 4] * 2 and all(s["tokens"] > 0 for s in stats)
        assert data["peak_memory_mb"] > 0 and "acc" in data["metrics"]["accuracy"]
    for name in names:
        assert f"| {name} " in result.table
    runs_table = format_table(result.entries)
    assert "peak memory (MB)" in runs_table.splitlines()[0] and runs_table in result.table
    # The same data, batch size, optimizer, schedule and clipping: Avalanche's Naive is our naive's twin
    # up to the order its loader draws batches, so the stage-1 loss is close.
    ours, theirs = (json.loads((e.run_dir / "results.json").read_text()) for e in result.entries[:2])
    assert abs(ours["stage_stats"][0]["train_loss"] - theirs["stage_stats"][0]["train_loss"]) < 0.5


def test_avalanche_ewc_in_our_runner_keeps_importances_of_every_parameter(toy, lm_and_encoder):
    """Avalanche's EWC is its own: after stage 1 its plugin holds importances for all parameters, non-zero
    only on the adapter (the only ones with gradients), and its penalty is in stage 2's loss."""
    lm, encoder = lm_and_encoder
    overrides = ["strategy=avalanche:ewc", "avalanche:ewc.ewc_lambda=1e6", "train.lr=1e-2", "train.batch_size=4"]
    config = make_config([*overrides, "train.warmup_steps=0"], strategy_names())
    (strategy,) = build(config.strategy, config.strategy_args)
    scenario = load_scenario(str(toy))
    penalties = []
    for i, stage in enumerate(scenario.stages):
        examples = scenario.tasks[stage.tasks[0]].train
        if i == 1:
            ewc = next(p for p in strategy.template.plugins if isinstance(p, EWCPlugin))
            imp = ewc.importances[0]
            assert len(imp) == len(list(lm.named_parameters()))  # a copy of the whole model, frozen base included
            frozen = [n for n, p in lm.named_parameters() if not p.requires_grad]
            assert frozen and all(float(imp["lm." + n].data.abs().sum()) == 0 for n in frozen)
            assert any(float(imp["lm." + n].data.abs().sum()) > 0 for n, p in lm.named_parameters() if p.requires_grad)
            probe = _LossProbe()
            strategy.template.plugins.insert(-3, probe)  # after EWC's before_backward, before evaluator and clock
        strategy.train_stage(lm, encoder, examples, [], config.train, seed=i)
        if i == 1:
            penalties = probe.extra
    assert len(penalties) == TRAIN // 4 and penalties[0] == 0  # the first step starts at the anchor
    assert all(x > 0 for x in penalties[1:])  # loss = criterion + λ Σ F (θ − θ*)²


class _LossProbe(SupervisedPlugin):
    """Records, at before_backward, what the loss holds beyond the criterion."""

    def __init__(self):
        super().__init__()
        self.extra = []

    def before_backward(self, strategy, **kwargs):
        self.extra.append(float(strategy.loss) - float(strategy._criterion(strategy.mb_output, strategy.mb_y)))


def test_avalanche_strategies_refuse_what_their_loop_cannot_do(monkeypatch):
    def check(*overrides):
        check_config(make_config(list(overrides), strategy_names()))

    check("strategy=avalanche:replay", "avalanche:replay.mem_size=50")
    for combined in ("avalanche:ewc+replay", "agem+avalanche:naive"):  # Avalanche's loop would call none of our hooks
        with pytest.raises(ContinualFTError, match=r"strategy=avalanche:\w+ runs alone"):
            check(f"strategy={combined}")
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun and accelerate launch set it
    with pytest.raises(ContinualFTError, match="strategy=avalanche:naive runs in one process"):
        check("strategy=avalanche:naive")
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(ContinualFTError, match="no train.packing"):
        check("strategy=avalanche:naive", "train.packing=true")
    with pytest.raises(ContinualFTError, match="no train.checkpoint_every"):
        check("strategy=avalanche:naive", "train.checkpoint_every=5")
    with pytest.raises(ContinualFTError, match="decay_factor"):
        check("strategy=avalanche:ewc", "avalanche:ewc.mode=online")
    (s,) = build("avalanche:lwf")
    with pytest.raises(ContinualFTError, match="cannot resume after stage 1"):
        s.load_state_dict({"stages": 1})


# 3. Our strategies as Avalanche plugins


def test_our_ewc_as_a_plugin_adds_its_penalty_after_the_first_experience(toy, lm_and_encoder):
    lm, encoder = lm_and_encoder
    ewc = EWC(EWCConfig(lam=1e4, fisher_batches=2))
    plugin = StrategyPlugin(ewc, encoder, batch_size=4)
    probe = _LossProbe()
    strategy = _naive(lm, [plugin, probe])
    seen = []
    for i, exp in enumerate(benchmark(load_scenario(str(toy)), encoder).train_stream):
        probe.extra.clear()
        strategy.train(exp)
        seen.append(list(probe.extra))
        assert len(ewc.anchors) == i + 1  # after_stage ran: one Fisher and anchor per experience
        assert all(n in dict(lm.named_parameters()) for n in ewc.anchors[0]["fisher"])  # the LM's own names
    assert seen[0] == [0.0] * (TRAIN // 4)  # nothing to hold on to in the first experience
    assert all(x > 0 for x in seen[1][1:])  # the first step starts at the anchor: penalty 0, then > 0
    assert float(plugin.last_penalty) == pytest.approx(seen[1][-1], rel=1e-4)


def test_our_replay_as_a_plugin_mixes_earlier_task_examples_into_the_data(toy, lm_and_encoder):
    lm, encoder = lm_and_encoder
    replay = Replay(ReplayConfig(buffer_size=6, ratio=0.5))
    recorded = []

    class DataProbe(_LossProbe):
        def before_training_exp(self, strategy, **kwargs):
            data = strategy.adapted_dataset
            recorded.append([data[k]["example"] for k in range(len(data))])

    strategy = _naive(lm, [StrategyPlugin(replay, encoder, batch_size=4), DataProbe()])
    bm = benchmark(load_scenario(str(toy)), encoder)
    exps = list(bm.train_stream)
    for exp in exps:
        strategy.train(exp)
    first, second = recorded
    own = [exps[1].dataset[k]["example"] for k in range(TRAIN)]
    assert {e.task for e in first} == {"colors"} and len(first) == TRAIN
    assert second[:TRAIN] == own
    replayed = second[TRAIN:]
    assert len(replayed) == TRAIN  # ratio 0.5: as many replayed as own, drawn from a 6-example buffer
    assert {e.task for e in replayed} == {"colors"} and len(set(replayed)) == 6
    assert set(replay.buffer) <= set(replayed) | {e for e in replay.buffer if e.task == "animals"}


def test_our_lwf_as_a_plugin_distils_in_the_second_experience(toy, lm_and_encoder):
    lm, encoder = lm_and_encoder
    plugin = StrategyPlugin(LwF(), encoder, batch_size=4)
    probe = _LossProbe()
    strategy = _naive(lm, [plugin, probe])
    for exp in benchmark(load_scenario(str(toy)), encoder).train_stream:
        probe.extra.clear()
        strategy.train(exp)
    assert max(probe.extra) > 0  # the student moved away from the teacher (the model after experience 1)


def _flipped(examples: list[Example]) -> list[Example]:
    """The same prompts with the other answer: a stage that contradicts ``examples``."""
    return [Example("b", e.prompt, "no" if e.answer == "yes" else "yes", f"{e.group}b") for e in examples]


def _flat_grad(params) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1).float() for p in params])


class _GradProbe(SupervisedPlugin):
    """At after_backward, the trainable gradient (flattened): placed after StrategyPlugin, what our after_backward
    left. Given ``memory`` (and placed before StrategyPlugin), it first computes g_ref, the gradient of the mean
    answer-token loss over those examples at the step's weights (eval mode, ``autograd.grad``: no ``.grad``
    touched), and sets the step's gradient to g = ±g_ref + noise of half its norm: against the memory on odd
    steps, along it on even ones."""

    def __init__(self, params, memory=(), stage=None):
        super().__init__()
        self.params, self.memory, self.stage = params, list(memory), stage
        self.grads, self.refs = [], []

    def after_backward(self, strategy, **kwargs):
        if self.memory:
            stage, model = self.stage(), strategy.model.lm
            model.eval()
            ref, tokens = torch.zeros_like(_flat_grad(self.params)), 0
            for batch in stage.batches(self.memory):
                n = int((batch["labels"] != -100).sum())
                grads = torch.autograd.grad(stage.loss_fn(model, batch), self.params)
                ref, tokens = ref + n * torch.cat([g.reshape(-1).float() for g in grads]), tokens + n
            model.train()
            ref = ref / tokens
            noise = torch.randn(ref.shape, generator=torch.Generator().manual_seed(len(self.refs)))
            sign = -1.0 if len(self.refs) % 2 == 0 else 1.0
            g = sign * ref + 0.5 * ref.norm() * noise / noise.norm()
            offset = 0
            for p in self.params:
                p.grad.copy_(g[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
            self.refs.append(ref)
        self.grads.append(_flat_grad(self.params))


def test_our_agem_as_a_plugin_projects_the_gradient_that_climbs_its_memory(lm_and_encoder):
    """Experience 1's 8 examples are A-GEM's whole memory (and so every reference batch). In experience 2 the
    optimizer gets g̃ = g − (g·g_ref / g_ref·g_ref) g_ref where g·g_ref < 0 (step 1, set so by the probe), and g
    itself, bit for bit, where g·g_ref > 0 (step 2)."""
    lm, encoder = lm_and_encoder
    with torch.no_grad():  # B = 0 at init would leave A without gradient
        for n, p in lm.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    first = make_examples("a", 8)
    agem = AGEM(AGEMConfig(memory_size=8, reference_batch=8))
    plugin = StrategyPlugin(agem, encoder, batch_size=4)
    params = [p for p in lm.parameters() if p.requires_grad]
    after = _GradProbe(params)
    strategy = _naive(lm, [plugin, after])
    ids = {"a": 0, "b": 1}
    strategy.train(experience(first, encoder, ids, 0), eval_streams=[])
    assert sorted(agem.memory.buffer, key=str) == sorted(first, key=str) and agem.steps == 0  # nothing to consult
    before = _GradProbe(params, first, lambda: plugin.stage)
    strategy.plugins.insert(strategy.plugins.index(plugin), before)
    after.grads.clear()
    strategy.train(experience(_flipped(first), encoder, ids, 1), eval_streams=[])
    (g1, g2), (ref1, ref2), (out1, out2) = before.grads, before.refs, after.grads
    assert torch.dot(g1, ref1) < 0 and torch.dot(g2, ref2) > 0
    torch.testing.assert_close(out1, g1 - torch.dot(g1, ref1) / torch.dot(ref1, ref1) * ref1, rtol=1e-4, atol=1e-6)
    assert abs(torch.dot(out1, ref1)) < 1e-4 * out1.norm() * ref1.norm()  # to first order, the memory's loss stays
    assert torch.equal(out2, g2)
    assert (agem.steps, agem.projected) == (2, 1) and plugin.stats()["agem"]["projected_share"] == 0.5


class _Recorder(Strategy):
    """Every hook of the protocol, recorded; ``zero`` zeroes the step's gradient in after_backward."""

    name = "recorder"

    def __init__(self, zero: bool = False):
        self.calls, self.zero, self.loaded = [], zero, None

    def train_data(self, stage, examples):
        self.calls.append(f"train_data {stage.index}")
        return examples

    def before_stage(self, model, stage):
        self.calls.append(f"before_stage {stage.index}")

    def penalty(self, model, batch, outputs):
        self.calls.append("penalty")
        return None

    def after_backward(self, model, stage, step):
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads) and stage is not None
        self.calls.append(f"after_backward {step}")
        if self.zero:
            for g in grads:
                g.zero_()

    def after_stage(self, model, stage):
        self.calls.append(f"after_stage {stage.index}")

    def state_dict(self):
        return {"calls": list(self.calls)}

    def load_state_dict(self, state):
        self.loaded = state

    def stats(self):
        return {"calls": float(len(self.calls))}


class _Updates(SupervisedPlugin):
    def __init__(self, calls):
        super().__init__()
        self.calls = calls

    def after_update(self, strategy, **kwargs):
        self.calls.append("update")


def _two_experiences(lm, encoder, recorder, monkeypatch):
    """Two 8-example experiences, 2 steps each, through run_experience (our schedule and clipping); clipping
    and optimizer steps are recorded among the recorder's calls."""
    real = torch.nn.utils.clip_grad_norm_

    def clip(*args, **kwargs):
        recorder.calls.append("clip")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    plugin = StrategyPlugin(recorder, encoder, batch_size=4)
    strategy = _naive(lm, [plugin, _Updates(recorder.calls)])
    cfg = TrainConfig(lr=1e-2, batch_size=4, warmup_steps=0, weight_decay=0.0, max_steps=2)
    first = make_examples("a", 8)
    for i, examples in enumerate([first, _flipped(first)]):
        run_experience(strategy, experience(examples, encoder, {"a": 0, "b": 1}, i), cfg)
    return plugin


def test_the_plugin_fires_every_hook_and_after_backward_once_per_step_before_clipping(lm_and_encoder, monkeypatch):
    lm, encoder = lm_and_encoder
    recorder = _Recorder()
    plugin = _two_experiences(lm, encoder, recorder, monkeypatch)
    step = ["penalty", "after_backward {}", "clip", "update"]
    expected = []
    for i in (0, 1):
        expected += [f"train_data {i}", f"before_stage {i}", *[c.format(k) for k in (1, 2) for c in step]]
        expected.append(f"after_stage {i}")
    assert recorder.calls == expected
    state = plugin.state_dict()
    assert state == {"recorder": {"calls": expected}}
    assert plugin.stats() == {"recorder": {"calls": float(len(expected))}}
    fresh = StrategyPlugin(_Recorder(), encoder)
    fresh.load_state_dict(state)
    assert fresh.strategies[0].loaded == {"calls": expected}


def test_the_plugin_calls_every_hook_in_the_order_of_every_loop(lm_and_encoder):
    """The recording strategy of tests/test_hook_order.py, through the plugin: Avalanche's SGD loop takes one
    optimizer step per mini-batch."""
    lm, encoder = lm_and_encoder
    recording = Recording()
    strategy = _naive(lm, [StrategyPlugin(recording, encoder, batch_size=4)])
    cfg = TrainConfig(lr=1e-2, batch_size=4, warmup_steps=0, max_steps=2)
    for i, task in enumerate("ab"):
        run_experience(strategy, experience(make_examples(task, 8), encoder, {"a": 0, "b": 1}, i), cfg)
    assert recording.calls == expected([[1, 1], [1, 1]])


def test_the_optimizer_steps_with_the_gradient_after_backward_left(lm_and_encoder, monkeypatch):
    """The hook zeroes every gradient: AdamW (no weight decay) must then leave the weights as they were."""
    lm, encoder = lm_and_encoder
    start = {n: p.detach().clone() for n, p in lm.named_parameters() if p.requires_grad}
    recorder = _Recorder(zero=True)
    _two_experiences(lm, encoder, recorder, monkeypatch)
    assert recorder.calls.count("update") == 4
    assert all(torch.equal(p, start[n]) for n, p in lm.named_parameters() if p.requires_grad)


def test_our_replay_state_round_trips_through_the_plugin(toy, lm_and_encoder):
    lm, encoder = lm_and_encoder
    plugin = StrategyPlugin(Replay(ReplayConfig(buffer_size=6)), encoder, batch_size=4)
    _naive(lm, [plugin]).train(next(iter(benchmark(load_scenario(str(toy)), encoder).train_stream)))
    restored = StrategyPlugin(Replay(ReplayConfig(buffer_size=6)), encoder)
    restored.load_state_dict(plugin.state_dict())
    assert len(plugin.strategies[0].buffer) == 6 and restored.strategies[0].buffer == plugin.strategies[0].buffer
    assert restored.stats()["replay"]["buffer_size"] == 6


def _trained_on(lm, encoder, strategy, stages: list[list[Example]]) -> list[list[Example]]:
    """Train one experience per list of examples with ``strategy`` in the plugin; what each experience trained on."""
    recorded = []

    class DataProbe(SupervisedPlugin):
        def before_training_exp(self, strategy, **kwargs):
            data = strategy.adapted_dataset
            recorded.append([data[k]["example"] for k in range(len(data))])

    template = _naive(lm, [StrategyPlugin(strategy, encoder, batch_size=4), DataProbe()])
    ids = {}
    for i, examples in enumerate(stages):
        ids.update({e.task: len(ids) for e in examples if e.task not in ids})
        template.train(experience(examples, encoder, ids, i), eval_streams=[])
    return recorded


def test_our_joint_as_a_plugin_trains_on_every_experience_so_far(lm_and_encoder):
    first = make_examples("a", 8)
    second = _flipped(first)
    one, two = _trained_on(*lm_and_encoder, Joint(), [first, second])
    assert sorted(one, key=str) == sorted(first, key=str)
    assert len(two) == 16 and set(two) == set(first) | set(second)  # D_1 ∪ D_2


def test_our_task_balanced_as_a_plugin_gives_each_task_its_share(lm_and_encoder):
    examples = make_examples("a", 12) + make_examples("b", 4)
    (data,) = _trained_on(*lm_and_encoder, TaskBalanced(TaskBalancedConfig(temperature=0.0)), [examples])
    assert Counter(e.task for e in data) == {"a": 8, "b": 8}  # temperature 0: an equal share per task, 16 in all
    assert set(data) <= set(examples)


def test_our_ssr_as_a_plugin_rehearses_what_it_wrote_after_the_first_experience(lm_and_encoder):
    ssr = SSR(SSRConfig(per_task=6, demos=3, max_new_tokens=12, known_answers=False))
    first = make_examples("a", 8)
    one, two = _trained_on(*lm_and_encoder, ssr, [first, make_examples("b", 8)])
    assert ssr.synthetic["a"] and {e.task for e in ssr.synthetic["a"]} == {"a"}  # written in after_stage
    rehearsed = [e for e in two if e.task == "a"]
    assert len(two) == 8 + len(rehearsed) and rehearsed and set(rehearsed) <= set(ssr.synthetic["a"])
    assert not set(rehearsed) & set(first)  # the model's own examples, not experience 1's


def test_our_olora_in_the_plugin_stops_at_the_second_experience_over_one_adapter(lm_and_encoder):
    """As in every loop that trains one adapter: O-LoRA's before_stage refuses before experience 2's first step."""
    lm, encoder = lm_and_encoder
    first = make_examples("a", 8)
    with pytest.raises(ContinualFTError, match=r"olora needs a new adapter per stage \(adapter=new or stack\)"):
        _trained_on(lm, encoder, OLoRA(), [first, _flipped(first)])


HOOKS = ("train_data", "before_stage", "penalty", "after_backward", "after_stage", "state_dict", "load_state_dict")

#: Each of our strategies -> the test of what it does inside StrategyPlugin.
PLUGIN_TESTS = {
    "naive": "test_every_strategy_has_a_plugin_test",  # overrides no hook: nothing to call
    "replay": "test_our_replay_as_a_plugin_mixes_earlier_task_examples_into_the_data",
    "ewc": "test_our_ewc_as_a_plugin_adds_its_penalty_after_the_first_experience",
    "lwf": "test_our_lwf_as_a_plugin_distils_in_the_second_experience",
    "agem": "test_our_agem_as_a_plugin_projects_the_gradient_that_climbs_its_memory",
    "joint": "test_our_joint_as_a_plugin_trains_on_every_experience_so_far",
    "task_balanced": "test_our_task_balanced_as_a_plugin_gives_each_task_its_share",
    "ssr": "test_our_ssr_as_a_plugin_rehearses_what_it_wrote_after_the_first_experience",
    "olora": "test_our_olora_in_the_plugin_stops_at_the_second_experience_over_one_adapter",
}


def test_every_strategy_has_a_plugin_test():
    assert sorted(PLUGIN_TESTS) == sorted(STRATEGIES), "add a row to PLUGIN_TESTS (and its test)"
    assert all(callable(globals().get(name)) for name in PLUGIN_TESTS.values())
    (naive,) = build("naive")
    assert all(getattr(type(naive), h) is getattr(Strategy, h) for h in HOOKS)


class _NoUpdate(SupervisedMetaLearningTemplate):
    """A meta-learning template (inner and outer updates, no backward callbacks) that updates nothing."""

    def _inner_updates(self, **kwargs):
        pass

    def _outer_update(self, **kwargs):
        pass


def test_the_plugin_refuses_what_the_loop_cannot_call_before_training(toy, lm_and_encoder, monkeypatch):
    lm, encoder = lm_and_encoder
    exp = next(iter(benchmark(load_scenario(str(toy)), encoder).train_stream))
    (avalanche_ewc,) = build("avalanche:ewc")
    with pytest.raises(ContinualFTError, match=r"^strategy=avalanche:ewc trains in a loop of its own, not"):
        StrategyPlugin([Replay(), avalanche_ewc], encoder)

    def meta(strategy):
        wrapped = CausalLMClassifier(lm)
        params = [p for p in wrapped.parameters() if p.requires_grad]
        with warnings.catch_warnings():  # "No loggers specified": on purpose
            warnings.simplefilter("ignore")
            return _NoUpdate(
                model=wrapped,
                optimizer=torch.optim.AdamW(params, lr=1e-2),
                train_mb_size=4,
                plugins=[StrategyPlugin(strategy, encoder, batch_size=4)],
                evaluator=EvaluationPlugin(loggers=[]),
            )

    class Data(Strategy):  # data hooks only
        name = "data"

        def __init__(self):
            self.calls = []

        def train_data(self, stage, examples):
            self.calls.append("train_data")
            return examples

    for strategy, hook in ((AGEM(), "after_backward"), (EWC(), "penalty")):
        recorder = Data()
        template = meta([recorder, strategy])
        with pytest.raises(ContinualFTError, match=rf"strategy={strategy.name} needs its {hook} hook, which _NoUpdate"):
            template.train(exp)
        assert recorder.calls == []  # refused before the first hook
    replay = Replay(ReplayConfig(buffer_size=4))
    meta(replay).train(exp)  # data hooks only: it runs there
    assert len(replay.buffer) == 4
    from avalanche.distributed import DistributedHelper

    monkeypatch.setattr(type(DistributedHelper), "is_distributed", property(lambda self: True))
    with pytest.raises(ContinualFTError, match="StrategyPlugin runs in one process"):
        _naive(lm, [StrategyPlugin(replay, encoder)]).train(exp)


# 4. Metrics agree where the definitions do


def test_avalanche_forgetting_and_bwt_against_ours():
    """Avalanche's standalone Forgetting is first-minus-last (R[first_j][j] − R[S][j]); ours is Chaudhry's
    max-based one (max_{first_j ≤ l < S} R[l][j] − R[S][j]). They agree when no task peaks after the stage
    that trained it, and BWT (last minus first) is the same in both."""
    first = [1, 2, 3]
    R = [
        [0.1, 0.1, 0.1],
        [0.8, 0.2, 0.1],
        [0.6, 0.9, 0.2],  # task 0 drops after stage 2
        [0.7, 0.5, 0.9],
    ]
    fg, bwt = Forgetting(), BWT()
    S = len(R) - 1
    for j, f in enumerate(first):
        for m in (fg, bwt):
            m.update(j, R[f][j], initial=True)
            m.update(j, R[S][j])
    learned = [j for j, f in enumerate(first) if f < S]
    mean = lambda d: sum(d[j] for j in learned) / len(learned)  # noqa: E731
    assert mean(bwt.result()) == pytest.approx(metrics.backward_transfer(R, first))
    assert mean(fg.result()) == pytest.approx(-metrics.backward_transfer(R, first))
    assert mean(fg.result()) == pytest.approx(metrics.forgetting(R, first))  # no task peaked later here
    R[2][0] = 0.95  # task 0 peaks after stage 2: ours counts the drop from the peak, Avalanche's from stage 1
    assert metrics.forgetting(R, first) == pytest.approx(mean(fg.result()) + (0.95 - 0.8) / len(learned))


def test_the_example_runs_naive_with_our_replay_plugin(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "avalanche_benchmark.py"
    spec = importlib.util.spec_from_file_location("avalanche_benchmark", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    R = example.main(["--tiny", "--plugin", "replay", "--batch-size", "16"])
    assert len(R) == 3 and all(len(row) == 2 for row in R)
    out = capsys.readouterr().out
    assert "R[accuracy] (%)" in out and "after medical" in out
