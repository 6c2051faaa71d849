"""Avalanche, both ways, on the tiny model: our scenario as an Avalanche benchmark, Avalanche's strategies
in our runner beside ours, our strategies as Avalanche plugins, and the two libraries' metrics.

Needs avalanche-lib, which needs a torch that torchvision is built for: ``bash scripts/install_avalanche.sh``
makes ``.venv-avalanche``, and ``scripts/test.sh`` runs this file there.
"""

import json

import pytest

pytest.importorskip("avalanche", reason="needs avalanche-lib: bash scripts/install_avalanche.sh (its own venv)")

import torch  # noqa: E402
from avalanche.core import SupervisedPlugin  # noqa: E402
from avalanche.evaluation.metrics import BWT, Forgetting  # noqa: E402
from avalanche.training import Naive  # noqa: E402
from avalanche.training.plugins import EvaluationPlugin  # noqa: E402
from avalanche.training.plugins.ewc import EWCPlugin  # noqa: E402
from toy import write_toy_scenario  # noqa: E402

from continual_ft import metrics  # noqa: E402
from continual_ft.adapters import start_stage  # noqa: E402
from continual_ft.batching import Encoder, collate  # noqa: E402
from continual_ft.checks import check_config  # noqa: E402
from continual_ft.compare import compare, format_table  # noqa: E402
from continual_ft.config import LoraConfig, make_config  # noqa: E402
from continual_ft.errors import ContinualFTError  # noqa: E402
from continual_ft.integrations.avalanche import (  # noqa: E402
    CausalLMClassifier,
    StrategyPlugin,
    benchmark,
)
from continual_ft.losses import mean_token_loss  # noqa: E402
from continual_ft.models import load_model  # noqa: E402
from continual_ft.scenario import load_scenario  # noqa: E402
from continual_ft.strategies import build, strategy_names  # noqa: E402
from continual_ft.strategies.ewc import EWC, EWCConfig  # noqa: E402
from continual_ft.strategies.lwf import LwF  # noqa: E402
from continual_ft.strategies.replay import Replay, ReplayConfig  # noqa: E402

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


def test_avalanche_strategies_refuse_what_their_loop_cannot_do():
    def check(*overrides):
        check_config(make_config(list(overrides), strategy_names()))

    check("strategy=avalanche:replay", "avalanche:replay.mem_size=50")
    with pytest.raises(ContinualFTError, match="runs alone"):
        check("strategy=avalanche:ewc+replay")
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
