"""``tune``: search a run's settings with Optuna; every trial is a normal run directory.

    python cli.py tune scenario=medical_then_legal strategy=replay+lwf search.replay.ratio=0.1:0.6 \\
        search.lwf.alpha=log:0.1:10 search.train.lr=log:1e-4:3e-3 n_trials=20 objective=acc+0.5*bwt

``search.<key>=<spec>`` searches a setting (specs and objectives: :mod:`continual_ft.study.search_space`); every
other ``key=value`` is fixed for all trials. The study lives in an Optuna RDB storage (default
``sqlite:///<output_dir>/tune.db``; any SQLAlchemy URL): the same command again adds ``n_trials`` more
trials to the same study, and several processes, on one machine or many, pointed at one storage share
it. Trial ``n`` is the run ``<output_dir>/<study>-trial<n>`` (its user attribute ``run_dir``). After
each stage but the last the pruner sees the running objective; a pruned trial keeps the stages it ran
(``results.json`` with ``complete: false``). A trial whose process dies is marked failed by the next
trial to start once its last heartbeat is ``GRACE_S`` (two minutes) old.

The report folder (default ``<output_dir>/<study>``) gets ``report.md`` (the best configuration as a
``python cli.py run`` command line and a table of every trial), ``trials.csv``, and Optuna's
``history.png`` and ``importance.png``.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from continual_ft.config import SHORTHANDS, RunConfig, config_keys, make_config, parse_overrides
from continual_ft.errors import ContinualFTError
from continual_ft.eval import metrics
from continual_ft.run.checks import check_config, check_scenario
from continual_ft.study.search_space import Dimension, Objective, parse_dimension, parse_objective
from continual_ft.study.tune_report import format_value, write_report

__all__ = ["TUNE_KEYS", "Plan", "Tuning", "plan", "tune"]

#: The settings of ``tune`` itself, beside the run settings and ``search.<key>=<spec>``.
TUNE_KEYS = {
    "n_trials": "trials this process runs (the same command again adds as many); default 10",
    "objective": "weighted sum to maximise, in percent: acc, bwt, acc+0.5*bwt, acc-forgetting; default acc",
    "storage": "SQLAlchemy URL of the Optuna storage; default sqlite:///<output_dir>/tune.db",
    "study": "study name, shared by every process that tunes it; default <scenario>-<strategy>",
    "pruner": "after each stage but the last: median (default; median:N waits for N trials), threshold:X "
    "(stop a trial whose running objective is below X), none",
}
#: What one study keeps fixed: its trials must measure the same thing, and it names the runs itself.
NOT_SEARCHED = ("scenario", "strategy", "name", "output_dir")
#: A running trial writes a heartbeat this often; once its last one is ``GRACE_S`` old (its process was
#: killed), the next trial to start in the study marks it failed (Optuna's ``fail_stale_trials``).
HEARTBEAT_S = 60
GRACE_S = 2 * HEARTBEAT_S


@dataclass
class Plan:
    """A checked ``tune`` command: the fixed settings, and each of them with either end of every search, pass
    the run's own checks; the objective is defined on the scenario."""

    fixed: list[str]
    dimensions: list[Dimension]
    objective: Objective
    n_trials: int
    storage: str
    study: str
    pruner: str
    output_dir: Path
    stages: int


@dataclass
class Tuning:
    """What ``tune`` leaves: the study (all its trials, from every process), the report folder and files."""

    study: object  # optuna.Study
    out: Path
    table: str
    best_command: str | None
    files: list[Path] = field(default_factory=list)


def _optuna():
    try:
        import optuna
    except ImportError:
        raise ContinualFTError("tune needs Optuna: pip install 'continual-ft[tune]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # tune prints one line per trial itself
    return optuna


def _current(config: RunConfig, strategies: list, key: str):
    """The value ``key`` has without the search: it says whether a range is of integers or floats."""
    from continual_ft.strategies import STRATEGIES, settings

    head, _, rest = key.partition(".")
    if head in STRATEGIES:
        own = settings(strategies)
        if head not in own:
            raise ContinualFTError(f"search.{key}: {head} is not in strategy={config.strategy}")
        if rest not in own[head]:
            valid = ", ".join(f"{head}.{k}" for k in own[head]) or "none"
            raise ContinualFTError(f"search.{key}: unknown setting; {head} has {valid}")
        return own[head][rest]
    if key not in config_keys():
        raise ContinualFTError(f"search.{key}: unknown config key; valid keys: {', '.join(config_keys())}")
    value = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _check_pruner(text: str) -> str:
    kind, _, arg = text.partition(":")
    try:
        ok = (kind == "none" and not arg) or (kind == "median" and (not arg or int(arg) >= 0))
        ok = ok or (kind == "threshold" and math.isfinite(float(arg)))
    except ValueError:
        ok = False
    if not ok:
        raise ContinualFTError(f"pruner={text}: choose median, median:N (N trials before pruning), threshold:X, none")
    return text


def _pruner(optuna, text: str):
    kind, _, arg = text.partition(":")
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=int(arg or 5))
    if kind == "threshold":
        return optuna.pruners.ThresholdPruner(lower=float(arg))
    return optuna.pruners.NopPruner()


def plan(args: list[str]) -> Plan:
    """Split and check a ``tune`` command: every search spec, both ends of every range, the objective."""
    from continual_ft.data.scenario import load_scenario
    from continual_ft.strategies import STRATEGIES

    options, searched, fixed = {}, {}, []
    for key, value in parse_overrides(args):
        if key in TUNE_KEYS:
            options[key] = value
        elif key.startswith("search."):
            name = SHORTHANDS.get(key[7:], key[7:])
            if name in searched:
                raise ContinualFTError(f"search.{name} is given twice")
            searched[name] = value
        else:
            fixed.append(f"{key}={value}")
    if not searched:
        raise ContinualFTError("tune needs at least one search.<key>=<spec>, e.g. search.train.lr=log:1e-4:3e-3")
    fixed_keys = [k for k, _ in parse_overrides(fixed)]
    if "name" in fixed_keys:
        raise ContinualFTError("tune names each trial's run <study>-trial<n>; drop name=")
    config = make_config(fixed, tuple(STRATEGIES))
    strategies = check_config(config)
    dimensions = []
    for key, spec in searched.items():
        if key in NOT_SEARCHED:
            raise ContinualFTError(f"search.{key}: a study keeps {key} fixed; run one study per {key}")
        if key in fixed_keys:
            raise ContinualFTError(f"{key} is given both as a fixed value and as search.{key}")
        dim = parse_dimension(key, spec, _current(config, strategies, key))
        for value in dim.extremes():
            try:
                check_config(make_config([*fixed, f"{key}={value}"], tuple(STRATEGIES)))
            except ContinualFTError as e:
                raise ContinualFTError(f"search.{key}={spec}: {e}") from None
        dimensions.append(dim)
    objective = parse_objective(options.get("objective", "acc"))
    try:
        n_trials = int(options.get("n_trials", "10"))
    except ValueError:
        n_trials = 0
    if n_trials < 1:
        raise ContinualFTError(f"n_trials must be a whole number >= 1, got {options['n_trials']!r}")
    study = options.get("study") or f"{Path(config.scenario).stem}-{config.strategy}"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", study):
        raise ContinualFTError(f"study={study}: use letters, digits and . _ + - (it names the trials' run folders)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ContinualFTError("tune runs each trial in one process; for parallel trials start several tune processes")
    scenario = load_scenario(config.scenario, quick=config.quick, seed=config.seed, sizes=config.data.sizes())
    check_scenario(config, scenario)
    first = [next(i + 1 for i, s in enumerate(scenario.stages) if t in s.tasks) for t in scenario.tasks]
    zeros = [[0.0] * len(first)] * (len(scenario.stages) + 1)
    if objective.value(metrics.summary(zeros, first)) is None:
        raise ContinualFTError(f"objective={objective}: a metric it weighs is undefined with one stage; use acc")
    output_dir = Path(config.output_dir)
    storage = options.get("storage") or f"sqlite:///{output_dir / 'tune.db'}"
    pruner = _check_pruner(options.get("pruner", "median"))
    return Plan(fixed, dimensions, objective, n_trials, storage, study, pruner, output_dir, len(scenario.stages))


def _storage(optuna, url: str):
    """Optuna's RDB storage at ``url``; a SQLite file's folder is made, and writers wait for each other."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, IntegrityError, OperationalError, SQLAlchemyError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ContinualFTError(
            f"storage={url}: not a database URL (sqlite:///runs/tune.db, postgresql://...)"
        ) from None
    engine_kwargs = {}
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs = {"connect_args": {"timeout": 60}}  # another process's write: wait for it, don't fail
    for attempt in range(5):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S
                )
        except (ImportError, SQLAlchemyError, ValueError) as e:
            # Processes that start together on a new database all create its tables: the later ones
            # fail on a table or version row another just wrote. Looked at again, the database is ready.
            if isinstance(e, (IntegrityError, OperationalError)) and attempt < 4:
                time.sleep(0.5 * (attempt + 1))
                continue
            raise ContinualFTError(f"storage={url}: {str(e).splitlines()[0]}") from None


def _open_study(optuna, p: Plan):
    study = optuna.create_study(
        storage=_storage(optuna, p.storage),
        study_name=p.study,
        direction="maximize",
        load_if_exists=True,
        pruner=_pruner(optuna, p.pruner),
    )
    made_with = study.user_attrs
    if not made_with:
        study.set_user_attr("objective", str(p.objective))
        study.set_user_attr("fixed", p.fixed)
    elif made_with.get("objective") != str(p.objective) or sorted(made_with.get("fixed", [])) != sorted(p.fixed):
        raise ContinualFTError(
            f"study {p.study} in {p.storage} was made with objective={made_with.get('objective')} and "
            f"{' '.join(made_with.get('fixed', []))}; give those, or another study= name"
        )
    return study


def _objective(optuna, p: Plan, progress: bool):
    from continual_ft.run.runner import run
    from continual_ft.strategies import STRATEGIES

    def objective(trial) -> float:
        overrides = [*p.fixed, *(f"{d.key}={d.suggest(trial)}" for d in p.dimensions)]
        trial.set_user_attr("overrides", overrides)
        config = make_config([*overrides, f"name={p.study}-trial{trial.number}"], tuple(STRATEGIES))

        def on_stage(i: int, record) -> None:
            trial.set_user_attr("run_dir", str(record.run_dir))
            trial.set_user_attr("stages_done", i + 1)
            if i + 1 < p.stages:
                score = p.objective.running(record.data, i + 1)
                trial.report(score, i + 1)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"running objective {score:.1f} after stage {i + 1}")

        try:
            results = run(config, progress=progress, on_stage=on_stage)
        except ContinualFTError as e:  # a diverging learning rate fails its trial, not the study
            trial.set_user_attr("error", str(e))
            return math.nan
        trial.set_user_attr("metrics", results.metrics)
        return p.objective.value(results.metrics)

    return objective


def _logger(p: Plan, log: Callable[[str], None]):
    def after(study, trial) -> None:
        where = trial.user_attrs.get("run_dir", "no run directory")
        params = ", ".join(f"{k}={format_value(v)}" for k, v in trial.params.items())
        if trial.state.name == "COMPLETE":
            log(f"trial {trial.number}: {p.objective} = {trial.value:.1f} ({params}) → {where}")
        elif trial.state.name == "PRUNED":
            step = trial.last_step
            score = trial.intermediate_values.get(step, math.nan)
            log(f"trial {trial.number}: pruned after stage {step}, running {p.objective} = {score:.1f} → {where}")
        else:
            log(f"trial {trial.number}: failed ({trial.user_attrs.get('error', trial.state.name.lower())})")

    return after


def tune(
    args: list[str],
    out: Path | None = None,
    progress: bool = True,
    command: str | None = None,
    log: Callable[[str], None] = print,
) -> Tuning:
    """Check the ``tune`` command ``args``, run its trials into the study, and write the report."""
    optuna = _optuna()
    p = plan(args)
    study = _open_study(optuna, p)
    log(f"study {p.study} in {p.storage}: {len(study.trials)} trials so far, {p.n_trials} more")
    study.optimize(_objective(optuna, p, progress), n_trials=p.n_trials, callbacks=[_logger(p, log)])
    out = Path(out) if out else p.output_dir / p.study
    table, best_command, files = write_report(
        study, str(p.objective), out, command or "python cli.py tune " + shlex.join(args)
    )
    return Tuning(study, out, table, best_command, files)
