"""One shared matrix: every registered strategy goes through the same checks.

Adding a strategy? Add a row to ``CASES`` (its name -> the run overrides it needs, e.g.
``["ewc.fisher_batches=2"]`` or ``["adapter=new"]``); ``test_every_strategy_has_a_case`` fails until you do.
"""

import io
import json

import pytest
import torch
from conftest import make_examples, make_stage
from safetensors.torch import load_file
from toy import write_toy_scenario

from continual_ft._state import load_tree
from continual_ft.adapters import start_stage
from continual_ft.config import make_config
from continual_ft.errors import ContinualFTError
from continual_ft.runner import run
from continual_ft.strategies import STRATEGIES, build
from continual_ft.strategies.ewc import EWC
from continual_ft.strategies.replay import Replay

#: strategy name -> overrides for a quick run (``<name>.<field>=value`` goes to that strategy's config).
CASES: dict[str, list[str]] = {
    "naive": [],
    "replay": ["replay.buffer_size=8", "replay.ratio=0.3"],
    "ewc": ["ewc.fisher_batches=2", "ewc.lam=10"],
    "task_balanced": ["task_balanced.temperature=0.5"],
    "joint": [],
    "lwf": ["lwf.alpha=1.0", "lwf.temperature=2.0"],
    "olora": ["adapter=new", "olora.lam=0.1", "olora.l2=0.01"],
    "agem": ["agem.memory_size=8", "agem.reference_batch=4"],
    "ssr": ["ssr.per_task=6", "ssr.demos=3", "ssr.max_new_tokens=12", "ssr.known_answers=false"],
}


def case_config(name: str):
    """``CASES[name]`` as a RunConfig (its strategy settings, adapter mode, LoRA settings)."""
    return make_config(CASES[name], strategy_names=tuple(STRATEGIES))


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


def test_every_strategy_has_a_case():
    missing = sorted(set(STRATEGIES) - set(CASES))
    assert not missing, f"add a row to CASES for {', '.join(missing)}"
    assert sorted(CASES) == sorted(STRATEGIES)


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    return str(write_toy_scenario(tmp_path_factory.mktemp("toy"), n=60, train=16, test=6))


#: Each strategy also runs on packed, token-budgeted batches (LwF's teacher, EWC's Fisher see them).
BATCHING = {"padded": [], "packed": ["train.packing=true", "train.max_tokens=160"]}


@pytest.mark.parametrize("batching", list(BATCHING))
@pytest.mark.parametrize("name", list(CASES))
def test_strategy_runs_and_trains_stage_two(name, batching, scenario, tmp_path):
    overrides = BATCHING[batching] + [
        f"scenario={scenario}",
        f"strategy={name}",
        "model=tiny",
        "precision=fp32",
        f"output_dir={tmp_path}",
        "train.max_steps=3",
        "train.batch_size=4",
        "train.lr=1e-2",
        "eval.batch_size=16",
    ]
    results = run(make_config(overrides + CASES[name], strategy_names=tuple(STRATEGIES)), progress=False)

    data = json.loads((results.run_dir / "results.json").read_text())
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

    saved = results.run_dir / "strategy_state" / "stage2"
    if saved.is_dir():  # what a resumed run would load restores the same state (safetensors + JSON)
        state = load_tree(saved)
        for s in build(name, strategy_args(name)):
            s.load_state_dict(state[s.name])
            assert states_equal(s.state_dict(), state[s.name])


@pytest.mark.parametrize("name", list(CASES))
def test_strategy_state_saved_and_restored(name, tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    config = case_config(name)
    strategies = build(name, config.strategy_args)
    for k, task in enumerate("ab"):  # the runner's hook order, stage by stage
        own = make_examples(task, 8)
        stage = make_stage(model, tokenizer, k, own)
        examples = own
        for s in strategies:
            examples = s.train_data(stage, examples)
        assert {e.task for e in own} <= {e.task for e in examples}
        model = start_stage(model, config.adapter, k, config.lora)
        for s in strategies:
            s.before_stage(model, stage)
        batch = next(iter(stage.batches(examples)))
        for s in strategies:
            extra = s.penalty(model, batch, model(input_ids=batch["input_ids"]))
            assert extra is None or (extra.dim() == 0 and torch.isfinite(extra))
        with torch.no_grad():  # stand-in for training: move the adapter
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.01)
        for s in strategies:
            s.after_stage(model, stage)

    f = io.BytesIO()
    torch.save({s.name: s.state_dict() for s in strategies}, f)  # as the runner saves it
    f.seek(0)
    saved = torch.load(f, weights_only=True)
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
