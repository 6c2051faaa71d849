"""``python _kill_worker.py <point> <run args>``: ``cli.py run`` that SIGKILLs itself at ``<point>``, so the
kill lands exactly there (a SIGKILL cannot be caught: nothing runs after it, as with one from outside):

    step:<stage>:<n>         stage <stage>'s optimizer step <n> (1-based), its gradients complete, before its update
    eval:<n>                 the n-th task scored (R's rows one after another, every task in each)
    after_stage:<stage>:<k>  stage <stage>'s strategy pass, in strategy <k>'s ``after_stage`` (those before it ran)

Used by tests/test_resume.py.
"""

from __future__ import annotations

import os
import signal
import sys

from continual_ft.cli import main
from continual_ft.run import runner
from continual_ft.train import loop as trainer


def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)


def kill_at_step(stage: int, n: int) -> None:
    real = trainer.after_backward

    def after_backward(strategies, model, info, step):
        if info.index + 1 == stage and step == n:
            die()
        return real(strategies, model, info, step)

    trainer.after_backward = after_backward


def kill_in_evaluation(n: int) -> None:
    real, calls = runner.evaluate_task, []

    def evaluate_task(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            die()
        return real(*args, **kwargs)

    runner.evaluate_task = evaluate_task


def kill_in_strategy_pass(stage: int, k: int) -> None:
    real = runner.run_stage

    def run_stage(model, info, strategies, train, *args, **kwargs):
        if info.index + 1 == stage:
            strategies[k - 1].after_stage = die  # on the object: the strategies before it run as usual
        return real(model, info, strategies, train, *args, **kwargs)

    runner.run_stage = run_stage


if __name__ == "__main__":
    kind, *numbers = sys.argv[1].split(":")
    {"step": kill_at_step, "eval": kill_in_evaluation, "after_stage": kill_in_strategy_pass}[kind](*map(int, numbers))
    main(["run", *sys.argv[2:]])
