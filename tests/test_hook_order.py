"""One hook order in every loop: a recording strategy through our trainer (the runner), the HF ``Trainer``
integration and the plain loop of ``examples/plain_loop.py`` (the Avalanche plugin: tests/test_avalanche.py)
makes exactly the calls of :func:`recording.expected`. A loop refuses, in one line and before anything
trains, a strategy that needs a hook it cannot call; every capability of the protocol is declared, documented
and listed in CONTRIBUTING.md; ``cli.py list`` prints each strategy's one-sentence summary whole."""

from __future__ import annotations

import importlib.util
import inspect
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import make_examples
from recording import Recording, RecordingConfig, expected
from toy import write_toy_scenario

from continual_ft.cli import cli
from continual_ft.config import LoraConfig, make_config
from continual_ft.errors import ContinualFTError
from continual_ft.model.adapters import start_stage
from continual_ft.model.loading import load_model
from continual_ft.run.runner import run
from continual_ft.strategies import AVALANCHE_LOOPS, STRATEGIES, build
from continual_ft.strategies.lwf import LwF, LwFConfig
from continual_ft.train import protocol
from continual_ft.train.batching import Encoder
from continual_ft.train.protocol import HOOKS, Batches, Loop, Method, Strategy, refuse, stage_info, training_loop

ROOT = Path(__file__).resolve().parent.parent


def _model():
    model, tokenizer = load_model("tiny", seed=0)
    model = start_stage(model, "continue", 0, LoraConfig(r=4, alpha=8))
    return model, Encoder(tokenizer, max_length=64, chat_template=False)


def test_our_trainer_calls_every_hook_in_order(tmp_path, monkeypatch):
    made = []

    class Recorded(Recording):
        def __init__(self, config=None):
            super().__init__(config)
            made.append(self)

    monkeypatch.setitem(STRATEGIES, "recording", (Recorded, RecordingConfig))
    scenario = write_toy_scenario(tmp_path / "toy", n=60, train=16, test=6)
    overrides = [f"scenario={scenario}", "strategy=recording", "model=tiny", "precision=fp32"]
    overrides += [f"output_dir={tmp_path / 'runs'}", "train.batch_size=4", "train.grad_accum=2", "train.max_steps=3"]
    run(make_config(overrides, tuple(STRATEGIES)), progress=False)
    assert made[-1].calls == expected([[2, 2, 2], [2, 2, 2]])  # two stages, 3 steps of 2 micro-batches each


def test_the_hf_trainer_calls_every_hook_in_order(tmp_path):
    pytest.importorskip("accelerate")  # transformers.Trainer needs it
    from transformers import TrainingArguments

    from continual_ft.integrations import hf_trainer as hf

    model, encoder = _model()
    recording = Recording()
    for k in (0, 1):
        examples = make_examples("ab"[k], 16)
        args = TrainingArguments(
            output_dir=str(tmp_path / f"stage{k}"),
            max_steps=3,
            per_device_train_batch_size=4,
            gradient_accumulation_steps=2,
            use_cpu=True,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            dataloader_pin_memory=False,
        )
        stage = hf.stage_info(k, examples, encoder, batch_size=4)
        hf.train_stage_hf(model, encoder.tokenizer, examples, [recording], stage, args, encoder=encoder)
    assert recording.calls == expected([[2, 2, 2], [2, 2, 2]])


def test_the_plain_loop_calls_every_hook_in_order():
    spec = importlib.util.spec_from_file_location("plain_loop", ROOT / "examples" / "plain_loop.py")
    plain_loop = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plain_loop)
    args = plain_loop.parse_args(["--batch-size", "4"])
    model, encoder = _model()
    recording = Recording()
    refuse([recording], plain_loop.LOOP)  # it calls every hook
    for k in (0, 1):
        examples = make_examples("ab"[k], 16)
        stage = stage_info(k, ["ab"[k]], examples, Batches(encoder, 4))
        plain_loop.train_stage(model, stage, [recording], encoder, args)
    assert recording.calls == expected([[1, 1, 1, 1], [1, 1, 1, 1]])  # 16 examples, 4 a step, no accumulation


def _only(hook: str) -> Strategy:
    """A strategy that overrides ``hook`` alone."""
    return type(f"Only_{hook}", (Strategy,), {"name": hook, hook: getattr(Strategy, hook)})()


@pytest.mark.parametrize("hook", HOOKS)
def test_a_loop_refuses_a_strategy_needing_a_hook_it_cannot_call_in_one_line(hook):
    assert protocol.needed_hooks(_only(hook)) == (hook,)
    lacking = Loop("a loop", "use another", tuple(h for h in HOOKS if h != hook))
    with pytest.raises(ContinualFTError) as e:
        refuse([_only(hook)], lacking)
    assert str(e.value) == f"strategy={hook} needs its {hook} hook, which a loop cannot call; use another"
    refuse([_only(hook)], Loop("a loop", "use another"))  # a loop with every hook runs it
    refuse([_only(h) for h in HOOKS if h != hook], lacking)  # and the lacking one every other strategy


def test_hooks_only_loops_refuse_a_loop_of_its_own_and_the_runner_trains_with_it():
    (avalanche_ewc,) = build("avalanche:ewc")
    assert protocol.needed_hooks(avalanche_ewc) == ()
    with pytest.raises(ContinualFTError, match="^strategy=avalanche:ewc trains in a loop of its own, not through"):
        refuse([avalanche_ewc], Loop("a loop", "use another"))

    def ours():
        pass

    assert training_loop(build("replay+ewc"), ours) is ours
    assert training_loop([avalanche_ewc], ours) == avalanche_ewc.train_stage


def test_rows_of_the_global_batch_are_refused_where_a_loop_lacks_them():
    several = Loop("the loop over 2 processes", "use one", global_batch=False)
    message = (
        "strategy=lwf with lwf.fraction=0.5 and the loop over 2 processes would act on other rows than one process "
        "(its batches don't carry their place in the global batch): change lwf.fraction, or use one"
    )
    with pytest.raises(ContinualFTError) as e:
        refuse([LwF()], several)
    assert str(e.value) == message
    refuse([LwF(LwFConfig(fraction=1.0))], several)
    refuse([LwF()], Loop("one process", "use one"))


def _capabilities() -> dict[str, object]:
    """Every public attribute the protocol declares on ``Method`` and ``Strategy``."""
    return {n: v for cls in (Method, Strategy) for n, v in vars(cls).items() if not n.startswith("_")}


def test_every_hook_and_capability_is_declared_documented_and_listed_in_contributing():
    source = inspect.getsource(protocol)
    listed = (ROOT / "CONTRIBUTING.md").read_text()
    caps = _capabilities()
    assert set(HOOKS) <= set(caps)
    for name, value in caps.items():
        if callable(value) or isinstance(value, property):
            assert (value.__doc__ or "").strip(), f"{name}: no docstring"
        else:  # a class attribute: its Sphinx comment (#:) sits right above it
            assert re.search(rf"#:.*\n    {name}(: [^=]+)? = ", source), f"{name}: no #: comment above it"
        assert re.search(rf"`{name}\b", listed), f"CONTRIBUTING.md does not list {name}"


def test_each_strategy_has_a_one_sentence_summary_that_list_prints_whole():
    out = CliRunner().invoke(cli, ["list"]).output
    for name, (cls, _) in {**STRATEGIES, **AVALANCHE_LOOPS}.items():
        summary = cls.summary
        assert summary.endswith(".") and ". " not in summary and summary[0].isupper(), f"{name}: {summary!r}"
        assert re.search(rf"^  {re.escape(name)} +{re.escape(summary)}$", out, re.M), f"{name}: not printed whole"
