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
from continual_ft.report.results import format_matrix, format_metrics, format_per_class, load_results, write_csv

__all__ = ["METRICS", "RunRecord"]

#: The R matrices: choice accuracy and exact match as evaluation scores them, macro-F1 from the predictions.
METRICS = ("accuracy", "exact_match", "macro_f1")


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
            "stages": [{"name": s.name, "tasks": s.tasks} for s in scenario.stages],
            "first_stage": [next(i + 1 for i, st in enumerate(scenario.stages) if t in st.tasks) for t in tasks],
            "primary_metric": scenario.metric,
            "rows": [],
            "R": {m: [] for m in METRICS},
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
        pairs = {
            t: ([p["gold"] for p in scores[t].predictions], [p["chosen"] for p in scores[t].predictions]) for t in tasks
        }
        row = {
            "accuracy": [scores[t].accuracy for t in tasks],
            "exact_match": [scores[t].exact_match for t in tasks],
            "macro_f1": [predictions.macro_f1(*pairs[t]) for t in tasks],
        }
        for m in d["R"]:  # a run resumed from before macro-F1 goes on without it
            d["R"][m].append(row[m])
        if "labels" in d:
            d.setdefault("per_class", []).append({t: predictions.per_class(*pairs[t], d["labels"][t]) for t in tasks})
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
            d["metrics"][m] = metrics.summary(d["R"][m], d["first_stage"])
            d.setdefault("largest_drop", {})[m] = dict(
                zip(d["tasks"], metrics.largest_drops(d["R"][m], d["first_stage"]))
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
