"""Scenarios: a stream of stages over named tasks, declared in a YAML file.

A shipped scenario lives in ``scenarios/<name>.yaml`` and opens with the command that runs it.
Each stage trains on its tasks together (one task: sequential fine-tuning; several: multi-task);
after every stage all tasks are evaluated. See ``TOP_KEYS`` and ``data.TASK_KEYS`` for the schema.
"""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass
from pathlib import Path

import yaml

from continual_ft.data.tasks import TASK_KEYS, Task, TaskSpec, build_task, check_sizes
from continual_ft.errors import ContinualFTError

__all__ = ["Stage", "Scenario", "METRICS", "TOP_KEYS", "load_scenario", "list_scenarios", "scenario_files"]

#: Primary metrics: choice accuracy by log-likelihood over the labels, exact match of generated text, or
#: ``primary``: each task's own primary metric (``metric:`` of the task; the default once a task is generative).
METRICS = ("accuracy", "exact_match", "primary")

TOP_KEYS = {
    "description": "one line saying what the scenario tests",
    "metric": f"primary metric: {' | '.join(METRICS)} (default accuracy; primary once a task is generative)",
    "tasks": "mapping of task name -> task fields (source, prompt, labels, sizes, ...)",
    "stages": "list of {name, tasks: [task, ...]}, trained in order",
    "quick": "sizes {train, validation, test} used for every task when quick=true",
}


@dataclass
class Stage:
    """One step of the stream: train on these tasks (together), then evaluate everything."""

    name: str
    tasks: list[str]


@dataclass
class Scenario:
    """A named sequence of stages over tasks, with the metric that scores it."""

    name: str
    description: str
    metric: str
    tasks: dict[str, Task]
    stages: list[Stage]
    source_file: str


def scenario_files() -> dict[str, object]:
    """Shipped scenario name -> its YAML file: ``scenarios/`` beside the package, else the installed package data."""
    folder = Path(__file__).resolve().parent.parent / "scenarios"
    if not folder.is_dir():
        try:
            folder = importlib.resources.files("continual_ft.scenarios")
        except ModuleNotFoundError:
            return {}
    found = [f for f in folder.iterdir() if f.name.endswith((".yaml", ".yml"))]
    return {f.name.rsplit(".", 1)[0]: f for f in sorted(found, key=lambda f: f.name)}


def list_scenarios() -> dict[str, str]:
    """Shipped scenario name -> its description."""
    out = {}
    for name, f in scenario_files().items():
        data = yaml.safe_load(f.read_text(encoding="utf-8"))
        out[name] = str(data.get("description", "")) if isinstance(data, dict) else ""
    return out


class _Doc:
    """A parsed YAML file that can say on which line each key sits."""

    def __init__(self, label: str, text: str):
        self.label = label
        try:
            self.data = yaml.safe_load(text)
            self.lines: dict[tuple, int] = {}
            self._walk(yaml.compose(text, Loader=yaml.SafeLoader), ())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f" line {mark.line + 1}" if mark else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ContinualFTError(f"{label}{line}: malformed YAML ({problem})") from None

    def _walk(self, node, path: tuple):
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                self.lines[path + (key.value,)] = key.start_mark.line + 1
                self._walk(value, path + (key.value,))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self.lines[path + (i,)] = item.start_mark.line + 1
                self._walk(item, path + (i,))

    def where(self, *path) -> str:
        """``file line N (a.b.c)`` for the deepest part of ``path`` the file has."""
        for end in range(len(path), 0, -1):
            if path[:end] in self.lines:
                return f"{self.label} line {self.lines[path[:end]]} ({'.'.join(map(str, path))})"
        return f"{self.label} ({'.'.join(map(str, path))})" if path else self.label

    def fail(self, path: tuple, message: str) -> ContinualFTError:
        return ContinualFTError(f"{self.where(*path)}: {message}")


def _resolve(name_or_path: str) -> tuple[str, str, str, str]:
    """(scenario name, file label for messages, YAML text, full path of the file)."""
    shipped = scenario_files()
    as_path = Path(name_or_path).expanduser()
    if name_or_path in shipped and not as_path.suffix:
        f = shipped[name_or_path]
        return name_or_path, f"scenarios/{f.name}", f.read_text(encoding="utf-8"), str(f)
    if as_path.suffix in (".yaml", ".yml") or as_path.exists():
        try:
            text = as_path.read_text(encoding="utf-8")
        except OSError as e:
            raise ContinualFTError(f"cannot read scenario file {name_or_path}: {e.strerror}") from None
        return as_path.stem, str(name_or_path), text, str(as_path.resolve())
    raise ContinualFTError(
        f"unknown scenario '{name_or_path}'; shipped: {', '.join(shipped)} (or give a path to a .yaml)"
    )


def _stages(doc: _Doc, task_names: list) -> list[Stage]:
    stages_data = doc.data.get("stages")
    if not isinstance(stages_data, list) or not stages_data:
        raise doc.fail(("stages",), "needs a list of stages like - {name: first, tasks: [task]}")
    stages: list[Stage] = []
    for i, entry in enumerate(stages_data):
        if not isinstance(entry, dict) or set(entry) - {"name", "tasks"}:
            raise doc.fail(("stages", i), "a stage is a mapping with keys name, tasks")
        stage_tasks = entry.get("tasks")
        if not isinstance(stage_tasks, list) or not stage_tasks:
            raise doc.fail(("stages", i, "tasks"), "needs a non-empty list of task names")
        for t in stage_tasks:
            if not isinstance(t, (str, int)) or t not in task_names:
                raise doc.fail(("stages", i, "tasks"), f"unknown task '{t}'; tasks: {', '.join(map(str, task_names))}")
        stage_name = str(entry.get("name", "+".join(map(str, stage_tasks))))
        if stage_name in (s.name for s in stages):
            raise doc.fail(("stages", i, "name"), f"stage name '{stage_name}' is used twice")
        stages.append(Stage(stage_name, [str(t) for t in stage_tasks]))
    return stages


def _task_spec(doc: _Doc, task_name, entry, base_dir: str, override: dict) -> TaskSpec:
    if not isinstance(entry, dict):
        raise doc.fail(("tasks", task_name), "must be a mapping of task fields")
    for key in entry:
        if key not in TASK_KEYS:
            raise doc.fail(("tasks", task_name, key), f"unknown task key; valid keys: {', '.join(TASK_KEYS)}")
    if "source" not in entry:
        raise doc.fail(("tasks", task_name), "missing `source:`")
    entry = dict(entry)
    if override and isinstance(entry.get("sizes", {}), dict):
        entry["sizes"] = {**entry.get("sizes", {}), **override}
    return TaskSpec(
        name=str(task_name),
        base_dir=base_dir,
        locate=lambda key: doc.where("tasks", task_name, *key.split(".")),
        **entry,
    )


def _stream_metric(doc: _Doc, metric: str | None, tasks: dict[str, Task]) -> str:
    """The scenario's primary metric: as given, else ``accuracy`` for choice tasks scored by it, else ``primary``."""
    own = [t for t in tasks.values() if t.generative or t.metric != "accuracy"]
    if metric is None:
        return "primary" if own else "accuracy"
    generative = [t.name for t in tasks.values() if t.generative]
    if metric != "primary" and generative:
        raise doc.fail(
            ("metric",),
            f"{metric} scores choice tasks; task '{generative[0]}' is generative: use metric: primary",
        )
    return metric


def load_scenario(name_or_path: str, *, quick: bool = False, seed: int = 0, sizes: dict | None = None) -> Scenario:
    """Read a scenario YAML (shipped name or path), check it, and build every task's examples.

    Sizes per task are, later winning: the defaults, the task's ``sizes:``, the file's ``quick:``
    (when ``quick``), then ``sizes``. The same ``seed`` gives the same examples in the same order.
    """
    name, label, text, source_file = _resolve(str(name_or_path))
    doc = _Doc(label, text)
    data = doc.data
    if not isinstance(data, dict):
        raise ContinualFTError(f"{label}: expected a mapping with keys {', '.join(TOP_KEYS)}")
    for key in data:
        if key not in TOP_KEYS:
            raise doc.fail((key,), f"unknown key; valid keys: {', '.join(TOP_KEYS)}")
    metric = data.get("metric")
    if metric is not None and (not isinstance(metric, str) or metric not in METRICS):
        raise doc.fail(("metric",), f"unknown metric {metric!r}; choose from: {', '.join(METRICS)}")
    quick_sizes = check_sizes(data.get("quick", {}), lambda k: doc.where("quick", *([k] if k else [])))
    if quick and not quick_sizes:
        raise doc.fail(("quick",), "no `quick:` sizes given, so the scenario cannot run with quick=true")
    override = {**(quick_sizes if quick else {}), **check_sizes(sizes or {}, lambda k: f"sizes override {k}".strip())}

    tasks_data = data.get("tasks")
    if not isinstance(tasks_data, dict) or not tasks_data:
        raise doc.fail(("tasks",), "needs a mapping of task name -> task fields")
    stages = _stages(doc, list(tasks_data))  # cheap checks first, before any data is read
    specs = [_task_spec(doc, t, entry, str(Path(source_file).parent), override) for t, entry in tasks_data.items()]
    tasks = {spec.name: build_task(spec, seed) for spec in specs}
    metric = _stream_metric(doc, metric, tasks)
    description = str(data.get("description", "")).strip()
    return Scenario(name, description, metric, tasks, stages, source_file)
