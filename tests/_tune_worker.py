"""A ``tune`` process for tests/test_tune.py: ``python _tune_worker.py <mode> <tune args>``, ``<mode>`` one of

    hang   heartbeats every second (``tune.HEARTBEAT_S = 1``) and its trial never ends: it writes the
           trial's run name to ``$TUNE_MARK`` and sleeps until the test kills the process.
    meet   each trial writes ``$TUNE_TIMES/<pid>.start`` and waits (60 s at most) until another process's
           trial has written one, then trains and records when its run started and ended in
           ``$TUNE_TIMES/<pid>.json``. Trials that can run at the same time then do; trials that one process
           at a time could run would not overlap (the first waits out the 60 s alone).

Everything else is ``python cli.py tune``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from continual_ft.cli import main
from continual_ft.run import runner
from continual_ft.study import tune

real_run = runner.run


def hang(config, **kwargs):
    Path(os.environ["TUNE_MARK"]).write_text(config.name)
    time.sleep(600)


def meet(config, **kwargs):
    folder = Path(os.environ["TUNE_TIMES"])
    (folder / f"{os.getpid()}.start").write_text(config.name)
    deadline = time.monotonic() + 60
    while len(list(folder.glob("*.start"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    start = time.time()
    try:
        return real_run(config, **kwargs)
    finally:
        times = {"trial": config.name, "start": start, "end": time.time()}
        (folder / f"{os.getpid()}.json").write_text(json.dumps(times))


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "hang":
        tune.HEARTBEAT_S = 1
    runner.run = {"hang": hang, "meet": meet}[mode]
    main(["tune", *sys.argv[2:]])
