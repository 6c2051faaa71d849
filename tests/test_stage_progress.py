"""What an in-stage checkpoint saves of a stage's progress is one dataclass, and all of it comes back.

``StageProgress`` is saved and restored over ``dataclasses.fields``; these tests put a value that is not
the default in every field (whatever fields there are: a field added later is covered without a change
here), save it through the real checkpoint files, and compare field by field. A stage interrupted after a
checkpoint then resumed from it ends as the uninterrupted stage, bit for bit.
"""

import dataclasses
import math

import pytest
import torch

from continual_ft.config import LoraConfig, TrainConfig
from continual_ft.data.tasks import Example
from continual_ft.model.adapters import start_stage
from continual_ft.model.loading import load_model
from continual_ft.strategies.base import Strategy
from continual_ft.train.batching import Encoder
from continual_ft.train.checkpoint import StageProgress, StepCheckpoints
from continual_ft.train.loop import train_stage

#: A value unlike the default, by the field's annotation.
_ODD = {"int": 7, "float": 2.5, "float | None": -0.75, "list[float]": [0.5, float("nan"), 0.125]}


def _filled() -> StageProgress:
    """A progress with every field set to a value that is not its default."""
    values = {}
    for f in dataclasses.fields(StageProgress):
        assert f.type in _ODD, f"StageProgress.{f.name}: add a value of type {f.type} to _ODD"
        values[f.name] = _ODD[f.type]
    progress = StageProgress(**values)
    for f in dataclasses.fields(StageProgress):
        assert not _same(getattr(progress, f.name), getattr(StageProgress(), f.name)), f.name
    return progress


def _same(a, b) -> bool:
    """Equal, NaN equal to NaN (a lost NaN must show as a difference, not hide as one)."""
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def _lost(saved: StageProgress, loaded: StageProgress) -> list[str]:
    """The fields whose value did not come back."""
    return [
        f.name for f in dataclasses.fields(StageProgress) if not _same(getattr(saved, f.name), getattr(loaded, f.name))
    ]


def _round_trip(tmp_path, progress: StageProgress) -> tuple[StageProgress, dict]:
    state = {"params": {"w": torch.arange(6.0).reshape(2, 3)}, "rng": {"torch": torch.get_rng_state()}}
    StepCheckpoints(tmp_path, stage=1).save(progress, state)
    loaded = StepCheckpoints(tmp_path, stage=1).load()
    assert loaded is not None
    return loaded


def test_every_field_survives_the_checkpoint_files(tmp_path):
    progress = _filled()
    loaded, state = _round_trip(tmp_path, progress)
    assert _lost(progress, loaded) == []
    assert torch.equal(state["params"]["w"], torch.arange(6.0).reshape(2, 3))
    assert StepCheckpoints.position(tmp_path) == (1, progress.steps)
    assert StepCheckpoints(tmp_path, stage=2).load() is None  # another stage's checkpoint is not this one's


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(StageProgress)])
def test_a_field_left_out_of_the_checkpoint_fails_the_round_trip(tmp_path, monkeypatch, name):
    """Were one field not saved (or not read back), the comparison above would name it."""
    saving = StageProgress.to_state
    monkeypatch.setattr(StageProgress, "to_state", lambda self: {k: v for k, v in saving(self).items() if k != name})
    progress = _filled()
    loaded, _ = _round_trip(tmp_path, progress)
    assert _lost(progress, loaded) == [name]


def test_a_checkpoint_with_the_stream_position_beside_the_progress_still_loads(tmp_path):
    """Checkpoints written before ``drawn`` joined the progress (and before ``penalty_sum`` existed)."""
    progress = _filled()
    old = {k: v for k, v in progress.to_state().items() if k not in ("drawn", "penalty_sum")}
    from continual_ft.state_codec import save_tree

    save_tree(tmp_path / "resume" / "step", {"stage": 0, "drawn": progress.drawn, "run": old, "params": {}})
    loaded, state = StepCheckpoints(tmp_path, stage=0).load()
    assert _lost(progress, loaded) == ["penalty_sum"] and loaded.penalty_sum is None
    assert "drawn" not in state and "run" not in state


def _examples(task: str, n: int) -> list[Example]:
    return [Example(task, f"The {task} item number {i} is?\nAnswer:", ["red", "blue"][i % 2]) for i in range(n)]


class _Pull(Strategy):
    """A penalty that is never zero, so the checkpoint's ``penalty_sum`` matters."""

    name = "pull"

    def penalty(self, model, batch, outputs):
        return 1e-3 * sum((p.float() ** 2).sum() for p in model.parameters() if p.requires_grad)


class _Stop(Exception):
    pass


def test_a_stage_resumed_from_its_checkpoint_ends_as_the_uninterrupted_one(tmp_path):
    """Stopped in step 5 (checkpoint at step 4), resumed in a fresh model: the same weights, statistics and
    validation losses as the stage run through, bit for bit (dropout draws from the restored RNG). The
    settings make validation go up and down: a validation worse than the best (``bad_evals``) before the
    checkpoint, early stopping after it, and the best weights (saved before it) restored at the end."""
    cfg = TrainConfig(lr=0.3, max_steps=8, batch_size=4, grad_accum=2, eval_every=1, patience=2, max_grad_norm=0)
    data, validation = _examples("a", 24), _examples("b", 4)

    def stage(run_dir, on_step=None):
        torch.manual_seed(0)
        model, tok = load_model("tiny", seed=0)
        model = start_stage(model, "continue", 0, LoraConfig(r=4, alpha=8, dropout=0.1))
        checkpoints = StepCheckpoints(run_dir, 0, every=2)
        encoder = Encoder(tok, max_length=64, chat_template=False)
        run = dict(seed=3, progress=False, checkpoints=checkpoints, on_step=on_step)
        stats = train_stage(model, encoder, data, validation, cfg, [_Pull()], **run)
        return stats, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    whole, whole_params = stage(tmp_path / "whole")
    assert whole.stopped_early and whole.steps == 5 and len(whole.val_losses) == 5  # the best weights came back

    def stop_in_5(step, values):
        if step == 5:
            raise _Stop

    with pytest.raises(_Stop):
        stage(tmp_path / "cut", stop_in_5)
    saved, state = StepCheckpoints(tmp_path / "cut", 0).load()
    assert (saved.steps, saved.drawn, len(saved.val_losses), saved.bad_evals) == (4, 8, 4, 1)
    assert saved.penalty_sum > 0 and state["best_state"] is not None
    resumed, resumed_params = stage(tmp_path / "cut")
    assert resumed.resumed_at_step == 4 and whole.resumed_at_step is None
    for name in ("steps", "tokens", "train_loss", "val_losses", "best_val_loss", "penalty", "stopped_early"):
        assert getattr(resumed, name) == getattr(whole, name), name
    assert all(torch.equal(resumed_params[n], whole_params[n]) for n in whole_params)
