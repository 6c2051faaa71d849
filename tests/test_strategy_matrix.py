"""One shared matrix: every registered strategy goes through the same checks.

Adding a strategy? Add a row to ``CASES``: the run overrides it needs (``ewc.fisher_batches=2``,
``adapter=new``) and ``effect``, a check of what the strategy did in a two-stage run, named and
explained by its docstring (replay: the buffer holds only earlier tasks, within its size; EWC: a
penalty in stage 2). ``test_every_strategy_has_a_case`` fails until the row is there, and a row
cannot be written without its check.

Every row's run, padded and packed, must show its effect, save its state (if it keeps any) where
the runner saves it, and that state, loaded as ``resume`` loads it, must give stage 2 the same
data the run gave it. A step on a packed batch must compute what the same step on padded batches does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import make_examples, make_stage
from safetensors.torch import load_file
from toy import write_toy_generative_scenario, write_toy_scenario

from continual_ft.config import make_config
from continual_ft.data.tasks import Example
from continual_ft.errors import ContinualFTError
from continual_ft.model.adapters import start_stage
from continual_ft.run import runner
from continual_ft.run.runner import run
from continual_ft.state_codec import STATE_FILE, TENSORS_FILE, load_tree, save_tree
from continual_ft.strategies import STRATEGIES, StageInfo, Strategy, build, settings
from continual_ft.strategies.ewc import EWC
from continual_ft.strategies.replay import Replay
from continual_ft.train.batching import collate, collate_packed
from continual_ft.train.loop import backward_step
from continual_ft.train.protocol import after_backward

# ---- what a run shows ------------------------------------------------------------------------------


@dataclass
class Ran:
    """A finished two-stage run, and what its loop was given: the checks read this."""

    data: dict  # results.json
    run_dir: Path
    model: torch.nn.Module  # the trained model
    stages: list[StageInfo]  # what the strategies saw of each stage (its own examples, real batches)
    trained: list[list[Example]]  # what each stage trained on, after every strategy's train_data
    strategies: list[Strategy]  # the run's strategy objects, as the run left them
    settings: dict  # every setting of each strategy, defaults included

    @property
    def stats(self) -> list[dict]:
        return self.data["stage_stats"]

    def own(self, k: int) -> list[Example]:
        return self.stages[k].examples

    def state(self, k: int) -> dict:
        """The strategy state the runner saved after stage ``k`` (0-based), loaded as ``resume`` loads it."""
        return load_tree(self.run_dir / "strategy_state" / f"stage{k + 1}")

    def restored(self, name: str, k: int) -> Strategy:
        """A fresh ``name`` strategy with the state saved after stage ``k``."""
        (strategy,) = build(name, {name: self.settings[name]})
        strategy.load_state_dict(self.state(k)[name])
        return strategy

    def extra(self, k: int) -> list[Example]:
        """What stage ``k`` trained on beyond its own examples (which come first)."""
        own = self.own(k)
        assert self.trained[k][: len(own)] == own
        return self.trained[k][len(own) :]


def penalties(ran: Ran) -> list:
    """Each stage's mean penalty: None where no strategy gave one, else whether it is ``"> 0"``."""
    return [None if s["penalty"] is None else "> 0" if s["penalty"] > 0 else s["penalty"] for s in ran.stats]


def mixed_in(ratio: float, n: int) -> int:
    """Examples replay and SSR add to a stage of ``n``: a ``ratio`` share of the mixed set."""
    return round(ratio / (1 - ratio) * n)


# ---- each strategy's effect ------------------------------------------------------------------------


def adds_nothing(ran: Ran) -> None:
    """naive: every stage trains on exactly its own examples, with no penalty and no numbers of its own."""
    for k, s in enumerate(ran.stats):
        assert ran.trained[k] == ran.own(k)
        assert s["penalty"] is None and s["strategy_stats"] == {}


def replays_a_bounded_buffer_of_earlier_tasks(ran: Ran) -> None:
    """replay: after stage 1 the buffer holds only stage-1 examples, at most buffer_size; stage 2 trains on
    its own plus round(ratio / (1 - ratio) · n) drawn from that buffer."""
    cfg = ran.settings["replay"]
    buffer = ran.restored("replay", 0).buffer
    assert 0 < len(buffer) <= cfg["buffer_size"] and set(buffer) <= set(ran.own(0))
    assert ran.extra(0) == []
    extra = ran.extra(1)
    assert len(extra) == mixed_in(cfg["ratio"], len(ran.own(1))) and set(extra) <= set(buffer)
    assert len(ran.restored("replay", 1).buffer) <= cfg["buffer_size"]


def anchors_and_penalises(ran: Ran) -> None:
    """ewc: no penalty in stage 1 (nothing anchored yet), a penalty > 0 in stage 2; the anchor saved after
    stage 1 penalises the trained model (which moved away from it) with a gradient."""
    assert penalties(ran) == [None, "> 0"], penalties(ran)
    ewc = ran.restored("ewc", 0)
    batch = next(iter(ran.stages[1].batches(ran.own(1))))
    penalty = ewc.penalty(ran.model, batch, None)
    assert penalty is not None and penalty.item() > 0 and penalty.requires_grad


def distils_the_previous_model(ran: Ran) -> None:
    """lwf: no teacher in stage 1 (no penalty); in stage 2 the KL from the teacher (stage 1's model) to the
    student is > 0: the two differ, and the student is pulled back towards the teacher."""
    assert penalties(ran) == [None, "> 0"], penalties(ran)


def keeps_the_new_adapter_orthogonal(ran: Ran) -> None:
    """olora (l2 = 0): nothing to be orthogonal to in stage 1 (no penalty); in stage 2 the orthogonality
    penalty Σ|A_old A_newᵀ| is > 0, and the two stages trained adapters of their own."""
    assert penalties(ran) == [None, "> 0"], penalties(ran)
    stage1, stage2 = (ran.run_dir / "adapters" / f"stage{k}" / "adapter_model.safetensors" for k in (1, 2))
    a, b = load_file(stage1), load_file(stage2)
    assert any(not torch.equal(a[k], b[k]) for k in a if "lora_A" in k)  # stage 2's A is not stage 1's


def resamples_to_its_total(ran: Ran) -> None:
    """task_balanced (total set): every stage trains on exactly ``total`` examples, drawn from its own
    without repetition (fewer than it has)."""
    total = ran.settings["task_balanced"]["total"]
    for k in range(2):
        assert len(ran.trained[k]) == total < len(ran.own(k))
        assert len(set(ran.trained[k])) == total and set(ran.trained[k]) <= set(ran.own(k))


def trains_on_every_task_so_far(ran: Ran) -> None:
    """joint: stage 2 trains on stage 1's examples and its own; what it keeps after stage 1 is stage 1's set."""
    assert ran.trained[0] == ran.own(0)
    assert sorted(ran.trained[1], key=repr) == sorted(ran.own(0) + ran.own(1), key=repr)
    assert ran.restored("joint", 0).examples == ran.own(0)


def projects_a_conflicting_gradient(ran: Ran) -> None:
    """agem: no reference gradient in stage 1 (empty memory), one every stage-2 step; the memory after
    stage 1 holds only stage-1 examples, at most memory_size; restored from that state, a gradient
    opposed to the memory's gradient is projected onto g · g_ref = 0."""
    cfg = ran.settings["agem"]
    assert ran.stats[0]["strategy_stats"]["agem"]["references"] == 0
    assert ran.stats[1]["strategy_stats"]["agem"]["references"] == ran.stats[1]["steps"] > 0
    assert ran.trained[1] == ran.own(1)  # A-GEM never trains on its memory
    agem = ran.restored("agem", 0)
    memory = agem.memory.buffer
    assert 0 < len(memory) <= cfg["memory_size"] and set(memory) <= set(ran.own(0))

    model, stage = ran.model, ran.stages[1]
    params = [p for p in model.parameters() if p.requires_grad]
    ref = agem.reference_gradient(model, stage, params, 1)
    noise = torch.randn(ref.shape, generator=torch.Generator().manual_seed(0)).to(ref.device)
    g = -ref + 0.1 * ref.norm() * noise / ref.numel() ** 0.5
    assert torch.dot(g, ref) < 0
    offset = 0
    for p in params:
        p.grad = g[offset : offset + p.numel()].view_as(p).to(p.dtype).clone()
        offset += p.numel()
    agem.before_stage(model, stage)
    agem.after_backward(model, stage, 1)
    projected = torch.cat([p.grad.reshape(-1) for p in params])
    model.zero_grad(set_to_none=True)
    assert agem.projected == 1 and not torch.equal(projected, g)
    assert abs(torch.dot(projected, ref).item()) <= 1e-4 * projected.norm().item() * ref.norm().item()


def rehearses_synthetic_examples(ran: Ran) -> None:
    """ssr: after stage 1 it keeps ``demos`` real examples and up to ``per_task`` written ones of stage 1's
    task, none a copy of a real one; stage 2 trains on its own plus round(ratio / (1 - ratio) · n) of them."""
    cfg = ran.settings["ssr"]
    ssr = ran.restored("ssr", 0)
    (task,) = ran.stages[0].tasks
    assert len(ssr.demos[task]) == cfg["demos"] and set(ssr.demos[task]) <= set(ran.own(0))
    synthetic = ssr.synthetic[task]
    assert 0 < len(synthetic) <= cfg["per_task"]
    assert all(e.task == task and e.group.startswith("ssr:") for e in synthetic)
    assert not {e.prompt for e in synthetic} & {e.prompt for e in ran.own(0)}
    assert ran.extra(0) == []
    extra = ran.extra(1)
    assert len(extra) == mixed_in(cfg["ratio"], len(ran.own(1))) and set(extra) <= set(synthetic)


@dataclass(frozen=True)
class Case:
    """A strategy's row: the overrides of its quick run and the effect that run must show."""

    overrides: tuple[str, ...]
    effect: Callable[[Ran], None]  # asserts what the strategy did; its docstring says what it checks
    #: Settings under which a step on one packed row computes exactly what the same step on a padded
    #: batch does (LwF distils a packed row whole, ``lwf.fraction`` of a padded batch's rows).
    exact_packed: tuple[str, ...] = ()


#: strategy name -> its row (``<name>.<field>=value`` goes to that strategy's config).
CASES: dict[str, Case] = {
    "naive": Case((), adds_nothing),
    "replay": Case(("replay.buffer_size=8", "replay.ratio=0.3"), replays_a_bounded_buffer_of_earlier_tasks),
    "ewc": Case(("ewc.fisher_batches=2", "ewc.lam=10"), anchors_and_penalises),
    "task_balanced": Case(("task_balanced.temperature=0.5", "task_balanced.total=10"), resamples_to_its_total),
    "joint": Case((), trains_on_every_task_so_far),
    "lwf": Case(("lwf.alpha=1.0", "lwf.temperature=2.0"), distils_the_previous_model, ("lwf.fraction=1",)),
    "olora": Case(("adapter=new", "olora.lam=0.1", "olora.l2=0"), keeps_the_new_adapter_orthogonal),
    "agem": Case(("agem.memory_size=8", "agem.reference_batch=4"), projects_a_conflicting_gradient),
    "ssr": Case(
        ("ssr.per_task=6", "ssr.demos=3", "ssr.max_new_tokens=12", "ssr.known_answers=false"),
        rehearses_synthetic_examples,
    ),
}


def case_config(name: str, extra: tuple[str, ...] = ()):
    """``CASES[name]`` as a RunConfig (its strategy settings, adapter mode, LoRA settings)."""
    return make_config([*CASES[name].overrides, *extra], strategy_names=tuple(STRATEGIES))


def strategy_args(name: str) -> dict:
    return case_config(name).strategy_args


def states_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a.cpu(), b.cpu())
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(states_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(states_equal(x, y) for x, y in zip(a, b))
    return a == b


def keeps_state(strategies: list[Strategy]) -> bool:
    """Whether any of them has a state to save (overrides ``state_dict``)."""
    return any(type(s).state_dict is not Strategy.state_dict for s in strategies)


def saved_files(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in (STATE_FILE, TENSORS_FILE)}


def test_every_strategy_has_a_case():
    missing = sorted(set(STRATEGIES) - set(CASES))
    assert not missing, f"add a row to CASES for {', '.join(missing)}"
    assert sorted(CASES) == sorted(STRATEGIES)
    for name, case in CASES.items():
        assert (case.effect.__doc__ or "").startswith(f"{name}"), f"{case.effect.__name__}: say what it checks"


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    return str(write_toy_scenario(tmp_path_factory.mktemp("toy"), n=60, train=16, test=6))


#: Each strategy also runs on packed, token-budgeted batches (LwF's teacher, A-GEM's projection see them).
BATCHING = {"padded": [], "packed": ["train.packing=true", "train.max_tokens=160"]}


def recording_loop(monkeypatch) -> list[tuple[list[Example], StageInfo, list[Strategy]]]:
    """Make the runner's training loop record, for each stage, what it trained on, the stage and the strategies."""
    seen, real = [], runner.train_stage

    def loop(model, encoder, examples, validation, cfg, strategies, stage, **kwargs):
        seen.append((list(examples), stage, strategies))
        return real(model, encoder, examples, validation, cfg, strategies, stage, **kwargs)

    monkeypatch.setattr(runner, "train_stage", loop)
    return seen


def tiny_run(scenario: str, name: str, tmp_path: Path) -> list[str]:
    """The overrides of a matrix run: ``name`` on ``scenario``, the tiny model, three steps a stage."""
    return [
        f"scenario={scenario}",
        f"strategy={name}",
        "model=tiny",
        "precision=fp32",
        f"output_dir={tmp_path / 'runs'}",
        "train.max_steps=3",
        "train.batch_size=4",
        "train.lr=1e-2",
        "eval.batch_size=16",
    ]


def ran_of(results, seen) -> Ran:
    """A finished run and what :func:`recording_loop` saw of its stages."""
    strategies = seen[-1][2]
    return Ran(
        results.data,
        results.run_dir,
        results.model,
        stages=[stage for _, stage, _ in seen],
        trained=[examples for examples, _, _ in seen],
        strategies=strategies,
        settings=settings(strategies),
    )


@pytest.mark.parametrize("batching", list(BATCHING))
@pytest.mark.parametrize("name", list(CASES))
def test_strategy_runs_acts_and_saves_its_state(name, batching, scenario, tmp_path, monkeypatch):
    overrides = BATCHING[batching] + tiny_run(scenario, name, tmp_path)
    seen = recording_loop(monkeypatch)
    config = make_config(overrides + list(CASES[name].overrides), strategy_names=tuple(STRATEGIES))
    results = run(config, progress=False)

    data = results.data
    assert data["complete"] and data["strategy"] == name
    R = data["R"][data["primary_metric"]]
    assert len(R) == 3 and all(len(row) == 2 for row in R)  # before training + one row per stage, both tasks
    assert all(0 <= x <= 1 for row in R for x in row)
    stage1, stage2 = (
        load_file(results.run_dir / "adapters" / s / "adapter_model.safetensors") for s in ("stage1", "stage2")
    )
    assert stage1.keys() == stage2.keys()
    assert any(not torch.equal(stage1[k], stage2[k]) for k in stage1)  # stage 2 moved the weights
    assert any(k for k in stage2 if "lora_B" in k and stage2[k].abs().sum() > 0)  # B starts at 0: it trained

    assert len(seen) == 2 and [len(t) for t, _, _ in seen] == [s["examples"] for s in data["stage_stats"]]
    ran = ran_of(results, seen)
    strategies = ran.strategies
    CASES[name].effect(ran)

    # The state is saved after every stage where the runner saves it, or not at all.
    folder = results.run_dir / "strategy_state"
    saved = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    if not keeps_state(strategies):
        assert saved == []
        return
    assert saved == ["stage1", "stage2"]
    assert states_equal(ran.state(1), {s.name: s.state_dict() for s in strategies})  # what the run ended with
    # Loaded as resume loads it, the state after stage 1 saves back to the same bytes, and gives stage 2
    # the same training data the uninterrupted run gave it.
    restored = build(name, strategy_args(name))
    for s in restored:
        s.load_state_dict(ran.state(0)[s.name])
    save_tree(tmp_path / "again", {s.name: s.state_dict() for s in restored})
    assert saved_files(tmp_path / "again") == saved_files(folder / "stage1")
    examples = ran.own(1)
    for s in restored:
        examples = s.train_data(ran.stages[1], examples)
    assert examples == ran.trained[1]


@pytest.fixture(scope="module")
def generative_scenario(tmp_path_factory):
    return str(write_toy_generative_scenario(tmp_path_factory.mktemp("toy_gen")))


@pytest.mark.parametrize("name", list(CASES))
def test_strategy_acts_on_a_generative_task(name, generative_scenario, tmp_path, monkeypatch):
    """Every strategy on two tasks whose answers the model writes: it shows the same effect as on choice
    tasks, and the run keeps an R per metric of the tasks (SSR keeps the answers its model writes)."""
    seen = recording_loop(monkeypatch)
    overrides = tiny_run(generative_scenario, name, tmp_path)
    results = run(
        make_config(overrides + list(CASES[name].overrides), strategy_names=tuple(STRATEGIES)), progress=False
    )
    data = results.data
    assert data["complete"] and data["primary_metric"] == "primary"
    assert list(data["R"]) == ["rouge_l", "exact_match", "chrf", "primary"]
    assert all(len(R) == 3 and all(0 <= x <= 1 for row in R for x in row if x is not None) for R in data["R"].values())
    assert len(seen) == 2 and all(stage.generative == {stage.tasks[0]} for _, stage, _ in seen)
    ran = ran_of(results, seen)
    CASES[name].effect(ran)


def nudge(model, by: float) -> None:
    """Stand-in for training: move every trainable parameter."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(by)


def first_two_stages(name: str, model, tokenizer, extra: tuple[str, ...] = ()):
    """The runner's hook order on toy stages a and b, a nudge of the adapter standing in for training;
    stops in stage b after ``before_stage`` and a nudge. Returns (model, strategies, stage b, its data)."""
    config = case_config(name, extra)
    strategies = build(name, config.strategy_args)
    for k, task in enumerate("ab"):
        own = make_examples(task, 8)
        stage = make_stage(model, tokenizer, k, own)
        examples = own
        for s in strategies:
            examples = s.train_data(stage, examples)
        assert {e.task for e in own} <= {e.task for e in examples}
        model = start_stage(model, config.adapter, k, config.lora)
        for s in strategies:
            s.before_stage(model, stage)
        nudge(model, 0.01)
        if k == 0:
            for s in strategies:
                s.after_stage(model, stage)
    return model, strategies, stage, examples


@pytest.mark.parametrize("name", list(CASES))
def test_strategy_state_round_trips_through_the_runners_files(name, tiny_model_and_tokenizer, tmp_path):
    model, tokenizer = tiny_model_and_tokenizer
    model, strategies, stage, examples = first_two_stages(name, model, tokenizer)
    batch = next(iter(stage.batches(examples)))
    for s in strategies:
        extra = s.penalty(model, batch, model(input_ids=batch["input_ids"]))
        assert extra is None or (extra.dim() == 0 and torch.isfinite(extra))
    for s in strategies:
        s.after_stage(model, stage)

    # save_tree / load_tree: what the runner writes to strategy_state/ and resume reads back.
    save_tree(tmp_path / "state", {s.name: s.state_dict() for s in strategies})
    saved = load_tree(tmp_path / "state")
    restored = build(name, strategy_args(name))
    for s, r in zip(strategies, restored):
        r.load_state_dict(saved[s.name])
        assert states_equal(r.state_dict(), s.state_dict())
    own = make_examples("c", 8)
    stage = make_stage(model, tokenizer, 2, own)
    a, b = own, own
    for s, r in zip(strategies, restored):  # the restored strategy behaves as the original
        a, b = s.train_data(stage, a), r.train_data(stage, b)
    assert a == b


@pytest.mark.parametrize("name", list(CASES))
def test_a_packed_step_equals_the_padded_step(name, tiny_model_and_tokenizer):
    """The same examples in one packed row and in one padded batch: the same task loss, penalty and
    gradients after every strategy's hooks (A-GEM's projection included).

    In float64, so that rounding cannot hide a difference: in float32 LwF's KL between two close
    models is a difference of nearly equal log-probabilities, and packed and padded agree only to 1e-4
    of it; in float64 every value agrees to 1e-9 (a wrong mask or position would be off by far more).
    """
    model, tokenizer = tiny_model_and_tokenizer
    model = model.double()
    model, strategies, stage, examples = first_two_stages(name, model, tokenizer, CASES[name].exact_packed)
    encoder = stage.batches.encoder
    items = [encoder.encode(e) for e in examples[:6]]
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def step(batch):
        model.zero_grad(set_to_none=True)
        loss, tokens, penalty = backward_step(model, [batch], strategies)
        after_backward(strategies, model, stage, 1)
        return loss, tokens, penalty, {n: p.grad.clone() for n, p in params if p.grad is not None}

    padded = step(collate(items, tokenizer.pad_token_id))
    packed = step(collate_packed(items, tokenizer.pad_token_id))
    model.zero_grad(set_to_none=True)
    assert packed[1] == padded[1] == sum(len(e.answer_ids) for e in items)
    assert packed[0] == pytest.approx(padded[0], rel=1e-9)
    assert (packed[2] is None) == (padded[2] is None)
    if padded[2] is not None:
        assert packed[2] == pytest.approx(padded[2], rel=1e-9)
    assert packed[3].keys() == padded[3].keys() and padded[3]
    for n, g in padded[3].items():
        assert (packed[3][n] - g).abs().max() <= 1e-9 * g.abs().max(), n


def test_build_composes_in_order():
    replay, ewc = build("replay+ewc", {"replay": {"buffer_size": 3}})
    assert isinstance(replay, Replay) and isinstance(ewc, EWC) and replay.config.buffer_size == 3
    assert [s.name for s in build(" ewc + replay ")] == ["ewc", "replay"]


@pytest.mark.parametrize(
    "spec, args, match",
    [
        ("replay+nope", None, r"unknown strategy 'nope'; choose from naive, .*replay"),
        ("", None, r"strategy is empty"),
        ("replay", {"ewc": {"lam": 1}}, r"settings given for 'ewc', which is not in strategy=replay"),
        ("replay", {"replay": {"buffer_size": 0}}, r"replay\.buffer_size must be >= 1, got 0"),
        ("replay", {"replay": {"ratio": 1.0}}, r"replay\.ratio must be in \(0, 1\), got 1\.0"),
        ("replay", {"replay": {"policy": "fifo"}}, r"replay\.policy must be one of reservoir, task_balanced"),
        ("replay", {"replay": {"bufer_size": 3}}, r"replay: .*bufer_size.*\(valid: replay\.buffer_size, replay\.ratio"),
        ("ewc", {"ewc": {"lam": "big"}}, r"ewc: .*lam"),
        ("ewc", {"ewc": {"gamma": 2.0}}, r"ewc\.gamma must be in \[0, 1\], got 2\.0"),
        ("ewc", {"ewc": {"fisher_batches": 0}}, r"ewc\.fisher_batches must be >= 1"),
        ("task_balanced", {"task_balanced": {"temperature": -1.0}}, r"task_balanced\.temperature must be >= 0"),
        ("joint", {"joint": {"size": 2}}, r"joint: .*size.*\(valid: none\)"),
    ],
)
def test_bad_strategy_settings_fail_in_one_line(spec, args, match):
    with pytest.raises(ContinualFTError, match=match) as e:
        build(spec, args)
    assert "\n" not in str(e.value)


def test_bad_setting_fails_before_the_run_starts(tmp_path, scenario):
    config = make_config(
        [f"scenario={scenario}", "strategy=replay", "model=tiny", f"output_dir={tmp_path}", "replay.buffer_size=0"],
        strategy_names=tuple(STRATEGIES),
    )
    with pytest.raises(ContinualFTError, match="replay.buffer_size must be >= 1"):
        run(config, progress=False)
    assert not any(tmp_path.iterdir())
