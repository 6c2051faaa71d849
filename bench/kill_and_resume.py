"""What a kill costs: the job uninterrupted, then the same job with in-stage checkpoints killed with
SIGKILL inside a stage and resumed; the wall-clock difference is the time the kill lost.

    python bench/kill_and_resume.py --every 10 -- output_dir=runs/i8 name=job

Arguments after ``--`` go to ``cli.py run``; ``name=`` is required (``<name>`` is the uninterrupted run,
``<name>-killed`` the other). The second run is killed once its in-stage checkpoint of stage ``--stage``
(1-based) has reached ``--step``, then ``cli.py resume`` finishes it. Printed: both wall times (process
start to exit, imports and model load included), the time lost, the checkpoint time per stage, and
whether both runs end with the same R.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--every", type=int, default=10, help="train.checkpoint_every of the killed run")
    p.add_argument("--stage", type=int, default=2, help="kill inside this stage (1-based)")
    p.add_argument("--step", type=int, default=40, help="once its checkpoint has reached this step")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("overrides", nargs="*", help="cli.py run settings (put them after --)")
    args = p.parse_args(argv)
    settings = dict(o.split("=", 1) for o in args.overrides if "=" in o)
    if "name" not in settings:
        raise SystemExit("error: give name=... after --")
    parent = Path(settings.get("output_dir", "runs"))
    whole, run_dir = parent / settings["name"], parent / f"{settings['name']}-killed"
    if whole.exists() or run_dir.exists():
        raise SystemExit(f"error: {whole} or {run_dir} exists; pick another name=")
    cli = [sys.executable, str(ROOT / "cli.py")]
    start = time.perf_counter()
    subprocess.run([*cli, "run", *args.overrides, "--quiet"], check=True, stdout=subprocess.DEVNULL)
    whole_wall = time.perf_counter() - start
    killed = [o for o in args.overrides if not o.startswith("name=")]
    killed += [f"name={run_dir.name}", f"train.checkpoint_every={args.every}"]
    start = time.perf_counter()
    proc = subprocess.Popen([*cli, "run", *killed, "--quiet"])
    marker = run_dir / "resume" / "step" / "state.json"
    while proc.poll() is None:
        try:
            tree = json.loads(marker.read_text())["tree"]
            if tree["stage"] == args.stage - 1 and tree["run"]["steps"] >= args.step:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.2)
    if proc.poll() is not None:
        raise SystemExit("error: the run ended before it reached the checkpoint to kill it at")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = time.perf_counter() - start
    start = time.perf_counter()
    subprocess.run([*cli, "resume", str(run_dir), "--quiet"], check=True, stdout=subprocess.DEVNULL)
    resume_wall = time.perf_counter() - start
    results = json.loads((run_dir / "results.json").read_text())
    ref = json.loads((whole / "results.json").read_text())
    out = {
        "uninterrupted_wall_s": whole_wall,
        "killed_after_s": killed_at,
        "resume_wall_s": resume_wall,
        "lost_s": killed_at + resume_wall - whole_wall,
        "lost_pct": 100 * (killed_at + resume_wall - whole_wall) / whole_wall,
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
