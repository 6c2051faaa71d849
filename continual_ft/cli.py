"""The command line: a thin shell over :func:`continual_ft.run.runner.run`.

    python cli.py run scenario=legal_then_medical strategy=naive train.lr=2e-4
    python cli.py run adapter=merge_final method=ties    # method=... is short for merge.method=...
    python cli.py list
    python cli.py plot runs/legal_then_medical-naive-continue
    python cli.py compare scenario=legal_then_medical strategy=naive,replay adapter=stack,merge
    python cli.py compare runs/a runs/b
    python cli.py tune strategy=replay search.replay.ratio=0.1:0.6 search.train.lr=log:1e-4:3e-3 n_trials=20
    python cli.py resume runs/legal_then_medical-naive-continue   # go on after a kill
    torchrun --nproc_per_node 2 cli.py run ...                     # one run across processes

Bad input prints one line (``error: ...``) and exits with status 2, never a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from continual_ft.errors import ContinualFTError

__all__ = ["main", "cli"]


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli():
    """Continual LoRA fine-tuning with forgetting measured stage by stage."""


@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("overrides", nargs=-1, type=click.UNPROCESSED)
@click.option("--quiet", is_flag=True, help="no progress bars or per-stage log lines")
def run(overrides, quiet):
    """Run a scenario: key=value overrides, dotted keys for sections (train.lr=2e-4)."""
    from continual_ft.config import make_config
    from continual_ft.run.runner import report
    from continual_ft.run.runner import run as run_config
    from continual_ft.strategies import strategy_names

    config = make_config(list(overrides), strategy_names())
    results = run_config(config, progress=not quiet)
    _echo_main(lambda: report(results))


def _echo_main(text) -> None:
    """Print ``text()`` on the first process only (under torchrun every process runs this command), then
    close the process group of a multi-process run."""
    from continual_ft.train.distributed import get_dist

    dist = get_dist()
    if dist.is_main:
        click.echo(text())
    dist.close()


@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("run_dir", type=click.Path())
@click.argument("extra", nargs=-1, type=click.UNPROCESSED)
@click.option("--quiet", is_flag=True, help="no progress bars or per-stage log lines")
@click.option(
    "--set",
    "changes",
    multiple=True,
    metavar="KEY=VALUE",
    help="change train.lr, train.max_grad_norm, train.checkpoint_every or train.checkpoint_minutes from here on "
    "(recorded in results.json); without it the run ends exactly as the uninterrupted one would have",
)
def resume(run_dir, extra, quiet, changes):
    """Go on with an interrupted run in RUN_DIR, in the same directory, from its last checkpoint."""
    from continual_ft.run.runner import report
    from continual_ft.run.runner import resume as resume_run

    if extra:
        raise ContinualFTError(
            f"resume takes no settings ({extra[0]!r}): it goes on with the run's own config.yaml; "
            "use --set train.lr=... to change the learning rate"
        )
    from continual_ft.report.results import load_results

    if (Path(run_dir) / "results.json").is_file() and load_results(Path(run_dir)).get("complete"):
        _echo_main(lambda: f"{run_dir}: the run is already complete; nothing to resume")
        return
    results = resume_run(run_dir, progress=not quiet, changes=list(changes))
    _echo_main(lambda: report(results))


@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.option("--out", type=click.Path(file_okay=False), help="report folder (default <output_dir>/compare)")
@click.option("--quiet", is_flag=True, help="no progress bars or per-stage log lines while training")
def compare(args, out, quiet):
    """Compare runs: a grid of key=value settings (a,b,... spans values) or existing run directories."""
    import shlex

    from continual_ft.study.compare import compare as compare_runs

    command = "python cli.py compare " + shlex.join(args) + (f" --out {shlex.quote(out)}" if out else "")
    result = compare_runs(list(args), out=out, progress=not quiet, command=command, log=click.echo)
    click.echo(result.table)
    for path in result.files:
        click.echo(path)


@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.option("--out", type=click.Path(file_okay=False), help="report folder (default <output_dir>/<study>)")
@click.option("--quiet", is_flag=True, help="no progress bars or per-stage log lines while training")
def tune(args, out, quiet):
    """Search settings with Optuna: search.KEY=a:b | a:b:step | log:a:b | a,b,c; other key=value are fixed.

    n_trials=N (default 10, added to the study each time), objective=acc | bwt | acc+0.5*bwt | acc-forgetting
    (default acc), study=NAME, storage=URL (default sqlite:///<output_dir>/tune.db), pruner=median | median:N |
    threshold:X | none. Processes on the same storage and study share it.
    """
    import shlex

    from continual_ft.study.tune import tune as tune_study

    command = "python cli.py tune " + shlex.join(args) + (f" --out {shlex.quote(out)}" if out else "")
    result = tune_study(list(args), out=out, progress=not quiet, command=command, log=click.echo)
    click.echo(result.table)
    for path in result.files:
        click.echo(path)
    click.echo(f"best: {result.best_command}" if result.best_command else "no trial has completed yet")


@cli.command(name="list")
def list_():
    """Show the built-in scenarios, strategies, adapter modes, models and trackers."""
    from continual_ft.data.scenario import list_scenarios
    from continual_ft.model.adapters import ADAPTER_MODES, MERGE_METHODS
    from continual_ft.model.loading import MODELS
    from continual_ft.report.tracking import TRACKERS
    from continual_ft.strategies import AVALANCHE_LOOPS, STRATEGIES

    def section(title, items):
        click.echo(title)
        for name, text in items.items():
            click.echo(f"  {name:<22} {text}")

    section("scenarios:", list_scenarios())
    section("strategies:", {n: cls.summary for n, (cls, _) in STRATEGIES.items()})
    section(
        "Avalanche's strategies, trained in Avalanche's loop (pip install \"continual-ft[avalanche]\"):",
        {n: cls.summary for n, (cls, _) in AVALANCHE_LOOPS.items()},
    )
    section("adapters:", ADAPTER_MODES)
    section("merge methods (adapter=merge_final method=...):", MERGE_METHODS)
    section("models:", {**MODELS, "<dir or org/name>": "any causal LM that transformers loads"})
    section("trackers (log=[...]; log.jsonl is always written):", {n: b.help for n, b in TRACKERS.items()})


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
def plot(run_dir):
    """Redraw a run's forgetting-matrix heatmaps from its results.json."""
    from continual_ft.report.plots import plot_run

    for path in plot_run(run_dir):
        click.echo(path)


def _quiet_libraries() -> None:
    """Keep the terminal for our own progress: library deprecation notes and load bars are noise here."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    # bitsandbytes warns at import, on every CPU without its optional `kernels` package.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> None:
    _quiet_libraries()
    try:
        cli.main(args=argv, standalone_mode=False)
    except ContinualFTError as e:
        _fail(str(e))
    except click.exceptions.Abort:
        _fail("aborted")
    except click.ClickException as e:
        _fail(e.format_message())
    except KeyboardInterrupt:
        _fail("interrupted; results written so far are intact")
