"""The run record: ``results.json`` as a run builds it, row by row of R and stage by stage.

One object holds it and is the only writer: :meth:`RunRecord.add_row` after each evaluation,
:meth:`RunRecord.add_stage` with a stage's statistics, :meth:`RunRecord.save` (atomic) after
each, :meth:`RunRecord.finish` at the end (metrics, ``complete: true``, CSV, heatmaps). A resumed
run loads the record of the interrupted one and appends to it; each part of the run (the first,
then one per ``resume``) keeps its own wall time. Each row's per-example predictions go to
``predictions/row<i>.jsonl`` (:mod:`continual_ft.eval.predictions`) in the save after the row, before
``results.json``: a row that ``results.json`` lists always has its predictions on disk.
"""

from __future__ import annotations

import platform
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import torch

from continual_ft.eval import metrics, predictions
from continual_ft.files import write_json
from continual_ft.report.results import load_results, write_csv
from continual_ft.report.tables import format_matrix, format_metrics, format_per_class

__all__ = ["METRICS", "RunRecord"]

#: The R matrices of a stream of choice tasks: accuracy and exact match as evaluation scores them, macro-F1
#: from the predictions. A stream with a generative task has one R per metric any of its tasks names (a cell is
#: None where the task does not have that metric), and ``primary``: each task's own primary metric.
METRICS = ("accuracy", "exact_match", "macro_f1")
PRIMARY = "primary"


def r_metrics(scenario) -> list[str]:
    """The R matrices a run of ``scenario`` keeps: :data:`METRICS` for choice tasks only, else every task's
    metrics in order of first mention, then ``primary`` where the scenario scores by each task's own."""
    tasks = scenario.tasks.values()
    names = list(dict.fromkeys(m for t in tasks for m in (METRICS if not t.generative else t.metrics)))
    return names + ([PRIMARY] if scenario.metric == PRIMARY else [])


def _task_kinds(scenario) -> dict:
    """For a stream with a generative task: each task's type, metrics and primary metric (``results.json``)."""
    tasks = scenario.tasks
    if all(not t.generative for t in tasks.values()) and scenario.metric != PRIMARY:
        return {}
    return {
        "task_types": {n: t.kind for n, t in tasks.items()},
        "task_metrics": {n: list(t.metrics) for n, t in tasks.items()},
        "task_primary": {n: t.metric for n, t in tasks.items()},
    }


def _cell(d: dict, task: str, score, metric: str, f1: float | None) -> float | None:
    """Task ``task``'s score by ``metric`` in one row: None where the task is not scored by it."""
    if metric == PRIMARY:
        metric = d["task_primary"][task]
    if score.accuracy is not None:  # a choice task
        return {"accuracy": score.accuracy, "exact_match": score.exact_match, "macro_f1": f1}.get(metric)
    return score.scores.get(metric)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class RunRecord:
    """``results.json`` of one run directory, and the one way to add to it and save it."""

    def __init__(self, run_dir: Path, data: dict):
        self.run_dir = Path(run_dir)
        self.data = data
        self._part_start = time.perf_counter()
        self._unsaved: dict[int, dict[str, list[dict]]] = {}  # row -> predictions, until the next save

    @classmethod
    def start(
        cls,
        run_dir: Path,
        *,
        config,
        scenario,
        precision: str,
        device: torch.device,
        world: int = 1,
        precision_reason: str | None = None,
        precision_probe: dict | None = None,
    ):
        """A fresh record for ``scenario`` run under ``config``; ``precision_reason`` and ``precision_probe``
        say why it computes in ``precision`` (:class:`continual_ft.train.precision.PrecisionChoice`)."""
        tasks = list(scenario.tasks)
        data = {
            "scenario": scenario.name,
            "strategy": config.strategy,
            "adapter": config.adapter,
            "merge": asdict(config.merge) if config.adapter == "merge_final" else None,
            "model": config.model,
            "precision": precision,
            "precision_reason": precision_reason,  # "bf16 matmul 0.58x fp32 on this CPU", "set explicitly", ...
            "precision_probe": precision_probe,  # the CPU probe's TFLOP/s, CPU, threads; None where none ran
            "device": str(device),
            "processes": world,
            "seed": config.seed,
            "quick": config.quick,
            "tasks": tasks,
            "labels": {t: list(scenario.tasks[t].labels) for t in tasks},
            **_task_kinds(scenario),
            "stages": [{"name": s.name, "tasks": s.tasks} for s in scenario.stages],
            "first_stage": [next(i + 1 for i, st in enumerate(scenario.stages) if t in st.tasks) for t in tasks],
            "primary_metric": scenario.metric,
            "rows": [],
            "R": {m: [] for m in r_metrics(scenario)},
            "per_class": [],
            "metrics": {},
            "largest_drop": {},
            "stage_stats": [],
            "eval": [],
            "complete": False,
            "parts": [{"started": _now(), "from": "start", "seconds": 0.0, "peak_memory_mb": 0.0}],
            "versions": {"python": platform.python_version(), "torch": torch.__version__},
        }
        return cls(run_dir, data)

    @classmethod
    def load(cls, run_dir: Path, resumed_from: str) -> RunRecord:
        """The record of an interrupted run, with a new part begun for the resume."""
        record = cls(run_dir, load_results(run_dir))
        parts = record.data.setdefault("parts", [])
        parts.append({"started": _now(), "from": resumed_from, "seconds": 0.0, "peak_memory_mb": 0.0})
        record.data["resumed"] = True
        return record

    @property
    def stages_done(self) -> int:
        """Stages whose training, adapters, strategy state and row of R are all recorded."""
        return len(self.data["stage_stats"])

    def add_row(self, name: str, scores: dict) -> dict:
        """Append row ``name`` of R from ``{task: TaskScore}``, with its predictions, macro-F1 and
        per-class precision and recall; returns its timing entry."""
        d, tasks = self.data, self.data["tasks"]
        d["rows"].append(name)
        choice = [t for t in tasks if scores[t].accuracy is not None]
        pairs = {
            t: ([p["gold"] for p in scores[t].predictions], [p["chosen"] for p in scores[t].predictions])
            for t in choice
        }
        f1 = {t: predictions.macro_f1(*pairs[t]) for t in choice}
        for m in d["R"]:  # a run resumed from before macro-F1 goes on without it
            d["R"][m].append([_cell(d, t, scores[t], m, f1.get(t)) for t in tasks])
        if "labels" in d:
            d.setdefault("per_class", []).append({t: predictions.per_class(*pairs[t], d["labels"][t]) for t in choice})
        self._unsaved[len(d["rows"]) - 1] = {t: scores[t].predictions for t in tasks}
        seconds = sum(s.seconds for s in scores.values())
        n = sum(s.n for s in scores.values())
        entry = {
            "row": name,
            "seconds": seconds,
            "seconds_per_example": seconds / n,
            "tokens_per_s": sum(s.tokens_per_s * s.seconds for s in scores.values()) / max(seconds, 1e-9),
        }
        d["eval"].append(entry)
        return entry

    def add_stage(self, stats: dict) -> None:
        self.data["stage_stats"].append(stats)

    def save(self, peak_memory_mb: float, complete: bool = False) -> None:
        """Write ``results.json`` atomically, with this part's wall time and peak memory so far."""
        d = self.data
        part = d["parts"][-1]
        part["seconds"] = time.perf_counter() - self._part_start
        part["peak_memory_mb"] = max(part["peak_memory_mb"], peak_memory_mb)
        d["complete"] = complete
        d["total_seconds"] = sum(p["seconds"] for p in d["parts"])
        d["peak_memory_mb"] = max(p["peak_memory_mb"] for p in d["parts"])
        for row, preds in sorted(self._unsaved.items()):
            predictions.write_row(self.run_dir, row, preds)
        self._unsaved.clear()
        write_json(self.run_dir / "results.json", d)

    def finish(self, peak_memory_mb: float) -> None:
        """Metrics from R, ``complete: true``, ``results.csv`` and the heatmaps."""
        from continual_ft.report.plots import plot_run

        d = self.data
        for m in d["R"]:
            # over the tasks this metric scores (every task, but in a stream that mixes task types)
            cols = [j for j, v in enumerate(d["R"][m][0]) if v is not None]
            R = [[row[j] for j in cols] for row in d["R"][m]]
            first = [d["first_stage"][j] for j in cols]
            d["metrics"][m] = metrics.summary(R, first)
            d.setdefault("largest_drop", {})[m] = dict(
                zip([d["tasks"][j] for j in cols], metrics.largest_drops(R, first))
            )
        self.save(peak_memory_mb, complete=True)
        write_csv(self.run_dir / "results.csv", self.data)
        plot_run(self.run_dir)

    def report(self) -> str:
        """The end-of-run text: the R table and the metrics, primary metric first."""
        d = self.data
        out = []
        for m in [d["primary_metric"]] + [m for m in d["R"] if m != d["primary_metric"]]:
            out += [format_matrix(d, m), format_metrics(d, m), ""]
        if d.get("per_class"):
            out += [format_per_class(d), ""]
        resumed = f" in {len(d['parts'])} parts" if len(d.get("parts", [])) > 1 else ""
        out.append(
            f"run time {d['total_seconds']:.0f}s{resumed}, peak memory {d['peak_memory_mb']:.0f} MB → {self.run_dir}"
        )
        return "\n".join(out)
