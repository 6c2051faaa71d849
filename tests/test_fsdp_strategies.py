"""EWC and LwF under FSDP2 (2 gloo processes, the shipped examples/accelerate/fsdp.yaml) against one process.

One run of ``strategy=replay+ewc+lwf`` each way, same global batch (2 × ``train.batch_size=2`` against 1 × 4),
fp32, 2 stages: stage 2 trains under both penalties, LwF at its default ``fraction`` (0.5): each rank distils
its rows of the half chosen from the global batch, the KL averaged over that half's answer tokens (choosing
half of each rank's own rows, as LwF did before, left the weights 1.5e-2 apart). Under FSDP each rank's EWC
Fisher, anchors and penalty are its rows of the parameters, and LwF's teacher forward swaps the teacher's rows
into the shards; the LoRA weights agree to 1e-5 (observed 4e-7) as for ``strategy=replay`` (tests/test_fsdp_run.py),
R and the penalty are the same, and the strategy state rank 0 saved is the one process's, whole. A run
killed after stage 1 and resumed under FSDP (EWC cutting its rows from the whole state) ends bitwise as the
uninterrupted one.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_fsdp_run import _settings, _torchrun, assert_sharded_equals_one, fsdp_env, kill_when, one_and_two

from continual_ft.config import make_config
from continual_ft.run.checks import check_fsdp
from continual_ft.state_codec import load_tree
from continual_ft.strategies import STRATEGIES, build
from continual_ft.train.distributed import CPU_ENV

#: Stage 2: 24 own examples and 9 replayed (round(0.27 / 0.73 · 24)), 4 a global batch: an epoch's last batch
#: holds one row, and rank 1 trains on a zero-weight copy without answer rows, where LwF must still join the
#: teacher's forward.
STRATEGY = [
    "strategy=replay+ewc+lwf",
    "replay.buffer_size=9",
    "replay.ratio=0.27",
    "ewc.fisher_batches=2",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return one_and_two(tmp_path_factory.mktemp("fsdp_strategies"), STRATEGY)


def test_ewc_and_lwf_under_fsdp_equal_one_process(runs):
    assert_sharded_equals_one(runs)
    a, b = (json.loads((runs / "runs" / name / "results.json").read_text()) for name in ("one", "two"))
    assert a["stage_stats"][0]["penalty"] is None  # stage 1: no anchor, no teacher
    assert [s["examples"] for s in b["stage_stats"]] == [24, 33]  # stage 2's last batch of an epoch: one row
    assert b["stage_stats"][1]["penalty"] > 0
    assert b["stage_stats"][1]["penalty"] == pytest.approx(a["stage_stats"][1]["penalty"], rel=1e-4)
    for x, y in zip(a["stage_stats"], b["stage_stats"], strict=True):
        assert y["train_loss"] == pytest.approx(x["train_loss"], rel=1e-5)


def test_ewc_state_saved_under_fsdp_is_the_one_process_state(runs):
    """Rank 0 saved the Fisher and anchors whole, gathered from both ranks' rows."""
    one, two = (load_tree(runs / "runs" / name / "strategy_state" / "stage1")["ewc"] for name in ("one", "two"))
    assert len(one["anchors"]) == len(two["anchors"]) == 1
    for kind in ("fisher", "anchor"):
        a, b = one["anchors"][0][kind], two["anchors"][0][kind]
        assert a.keys() == b.keys() and a
        for name, t in a.items():
            assert b[name].shape == t.shape, name  # whole, not a rank's rows
            assert torch.allclose(b[name], t, rtol=0, atol=1e-5), (kind, name)
    assert max(float(f.max()) for f in two["anchors"][0]["fisher"].values()) == 1.0  # max-normalised over all rows


def _stages_done(run_dir: Path) -> int:
    try:
        return len(json.loads((run_dir / "results.json").read_text())["rows"]) - 1
    except (OSError, KeyError, json.JSONDecodeError):
        return 0  # not written yet, or replaced between the check and the read


def test_ewc_resumed_under_fsdp_cuts_its_rows_from_the_whole_state(runs):
    """Killed in stage 2 and resumed under FSDP: EWC loads the whole Fisher and anchors of stage 1, each rank
    keeps its rows, and stage 2 ends as in the uninterrupted FSDP run (the fixture's)."""
    cwd = runs / "kill"
    cwd.mkdir()
    killed = cwd / "runs" / "killed"
    env = {**os.environ, CPU_ENV: "1", **fsdp_env()}
    args = [*_settings(runs / "data" / "toy.yaml", 2, "killed"), *STRATEGY]
    kill_when(_torchrun(2, "run", *args), cwd, env, lambda: _stages_done(killed) >= 1)
    assert json.loads((killed / "results.json").read_text())["rows"] == ["before training", "after colors"]
    proc = subprocess.run(_torchrun(2, "resume", str(killed)), cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    a, b = (json.loads((d / "results.json").read_text()) for d in (runs / "runs" / "two", killed))
    assert b["complete"] and b["resumed"] and b["R"] == a["R"]
    assert b["stage_stats"][1]["penalty"] == a["stage_stats"][1]["penalty"]
    before, after = (load_file(d / "adapters/stage2/adapter_model.safetensors") for d in (runs / "runs/two", killed))
    for name, w in before.items():
        assert torch.equal(after[name], w), name


def test_ewc_and_lwf_pass_the_fsdp_check():
    config = make_config(["model=tiny", "strategy=replay+ewc+lwf"], tuple(STRATEGIES))
    check_fsdp(config, build(config.strategy, config.strategy_args), fsdp_version=2)
