"""What a kill costs: the job uninterrupted, then the same job with in-stage checkpoints killed with
SIGKILL at a random point between two checkpoints and resumed; the wall-clock difference is the time the
kill lost.

    python bench/kill_and_resume.py --every 10 --seed 0 -- output_dir=runs/i8 name=job

Arguments after ``--`` go to ``cli.py run``; ``name=`` is required (``<name>`` is the uninterrupted run,
``<name>-killed`` the other). The second run is watched until its in-stage checkpoint of stage ``--stage``
(1-based) reaches ``--step``; the time since the checkpoint before it gives the interval between two
checkpoints, and the kill comes a seeded random fraction of that interval later (``--seed``): anywhere up to
the next checkpoint, not the best case right after one. ``cli.py resume`` then finishes the run. Printed:
both wall times (process start to exit, imports and model load included), the time lost, where the kill
fell (seconds after the last checkpoint, steps done that the resume trained again), the checkpoint time per
stage, and whether both runs end with the same R.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
POLL_S = 0.01  # how often the checkpoint is looked at: the kill falls this close to the drawn point


def checkpoint_position(run_dir: Path) -> tuple[int, int] | None:
    """(stage index, step) of the run's in-stage checkpoint, None while there is none."""
    try:
        tree = json.loads((run_dir / "resume" / "step" / "state.json").read_text())["tree"]
        return int(tree["stage"]), int(tree["run"]["steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def steps_done(run_dir: Path, stage: int) -> int:
    """Optimizer steps stage ``stage`` (0-based) had logged: ``log.jsonl`` is flushed at every step."""
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    steps = [e for e in map(json.loads, lines) if e.get("kind") == "step" and e.get("train/stage") == stage + 1]
    return len(steps)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--every", type=int, default=10, help="train.checkpoint_every of the killed run")
    p.add_argument("--stage", type=int, default=2, help="kill inside this stage (1-based)")
    p.add_argument("--step", type=int, default=40, help="after its checkpoint at this step (at least 2 x --every)")
    p.add_argument("--seed", type=int, default=0, help="draws where between two checkpoints the kill falls")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("overrides", nargs="*", help="cli.py run settings (put them after --)")
    args = p.parse_args(argv)
    if args.every < 1 or args.step < 2 * args.every:
        p.error("--step must be at least 2 x --every: the checkpoint before it times the interval")
    settings = dict(o.split("=", 1) for o in args.overrides if "=" in o)
    if "name" not in settings:
        p.error("give name=... after --")
    parent = Path(settings.get("output_dir", "runs"))
    whole, run_dir = parent / settings["name"], parent / f"{settings['name']}-killed"
    if whole.exists() or run_dir.exists():
        p.error(f"{whole} or {run_dir} exists; pick another name=")
    fraction = random.Random(args.seed).random()
    cli = [sys.executable, str(ROOT / "cli.py")]
    start = time.perf_counter()
    subprocess.run([*cli, "run", *args.overrides, "--quiet"], check=True, stdout=subprocess.DEVNULL)
    whole_wall = time.perf_counter() - start
    killed = [o for o in args.overrides if not o.startswith("name=")]
    killed += [f"name={run_dir.name}", f"train.checkpoint_every={args.every}"]
    start = time.perf_counter()
    proc = subprocess.Popen([*cli, "run", *killed, "--quiet"])
    seen: dict[tuple[int, int], float] = {}  # checkpoint position -> when it was first seen
    kill_at = None
    while proc.poll() is None:
        now = time.perf_counter()
        position = checkpoint_position(run_dir)
        if position is not None and position not in seen:
            seen[position] = now
        target = (args.stage - 1, args.step)
        if kill_at is None and position is not None and position >= target:
            before = seen.get((args.stage - 1, position[1] - args.every))
            if position != target or before is None:
                proc.kill()
                proc.wait()
                p.error(
                    f"the checkpoints at steps {args.step - args.every} and {args.step} of stage {args.stage} "
                    "were not both seen (are the steps shorter than the polling?); raise --every"
                )
            interval = seen[target] - before
            kill_at = seen[target] + fraction * interval
        if kill_at is not None and now >= kill_at:
            break
        time.sleep(POLL_S)
    if proc.poll() is not None:
        p.error("the run ended before the point drawn to kill it at")
    os.kill(proc.pid, signal.SIGKILL)
    killed_at = time.perf_counter()
    proc.wait()
    last = checkpoint_position(run_dir)  # a checkpoint that landed during the wait counts: the resume uses it
    if last is None or last[0] != args.stage - 1 or last not in seen:
        p.error(f"the kill fell past stage {args.stage}'s last checkpoint; take a --step further from its end")
    done = steps_done(run_dir, args.stage - 1)
    since = killed_at - seen[last]
    killed_wall = killed_at - start
    start = time.perf_counter()
    subprocess.run([*cli, "resume", str(run_dir), "--quiet"], check=True, stdout=subprocess.DEVNULL)
    resume_wall = time.perf_counter() - start
    results = json.loads((run_dir / "results.json").read_text())
    ref = json.loads((whole / "results.json").read_text())
    out = {
        "uninterrupted_wall_s": whole_wall,
        "killed_after_s": killed_wall,
        "resume_wall_s": resume_wall,
        "lost_s": killed_wall + resume_wall - whole_wall,
        "lost_pct": 100 * (killed_wall + resume_wall - whole_wall) / whole_wall,
        "seed": args.seed,
        "kill_fraction": fraction,  # of the interval between two checkpoints, after the one at --step
        "checkpoint_interval_s": interval,
        "killed_seconds_after_checkpoint": since,
        "checkpoint_step": last[1],
        "steps_done_at_kill": done,
        "steps_trained_again": done - last[1],
        "parts": results["parts"],
        "total_seconds": results["total_seconds"],
        "checkpoint_seconds_per_stage": [s.get("checkpoint_seconds", 0.0) for s in results["stage_stats"]],
        "train_seconds_per_stage": [s["train_seconds"] for s in results["stage_stats"]],
        "uninterrupted_checkpoint_free_train_seconds": [s["train_seconds"] for s in ref["stage_stats"]],
        "R_equal": results["R"] == ref["R"],
        "R": results["R"],
    }
    for k, v in out.items():
        if k != "R":
            print(f"{k}: {v}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
