"""Where a run's numbers go besides its folder: ``log=[tensorboard,wandb,mlflow]``.

Every run writes ``<run_dir>/log.jsonl``, one JSON object a line, its ``kind`` first::

    {"kind": "config", "config": {...the resolved config.yaml...}}
    {"kind": "step", "step": 7, "train/stage": 2, "train/loss": 1.93, "train/lr": 0.00098, "train/tokens_per_s": 5120.4}
    {"kind": "stage", "stage": 2, "R/accuracy/legal": 0.71, "metrics/accuracy/bwt": -0.05, "stage/train_loss": 1.2, ...}
    {"kind": "images", "images": {"forgetting_matrix": "forgetting_matrix.png"}}
    {"kind": "file", "path": "results.json"}
    {"kind": "end", "status": "finished"}

``step`` counts optimizer steps over the whole run (stage 2's first step follows stage 1's last), so
every tracker's x-axis only goes up; ``stage`` is 0 for the evaluation before training and ``i``
after stage ``i``. A stage's entry holds its row of R (``R/<metric>/<task>``), the metrics of the run
so far over the tasks trained so far (``metrics/<metric>/<acc|bwt|fwt|forgetting>``), the stage's
numbers from ``results.json`` (``stage/<key>``: loss, tokens/s, the strategies' mean penalty per
step, ...) and each strategy's own (``strategy/<name>/<key>``, e.g. replay's buffer size). A resumed
run appends: it logs again the steps between its last checkpoint and the kill.

Each tracker implements one small protocol, in the style of torchtune's metric loggers
(torchtune/training/metric_logging.py): ``log_config``, ``log_step``, ``log_stage``, at the end
``log_images`` and ``log_file``, then ``close``. ``TRACKERS`` is the registry of the optional ones, one
for each name :data:`continual_ft.config.TRACKER_NAMES` allows; each lives in an extra
(``pip install "continual-ft[tensorboard]"``), checked before the run directory is made
(:func:`check_trackers`).
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from continual_ft.config import check_choice
from continual_ft.errors import ContinualFTError
from continual_ft.eval import metrics

__all__ = [
    "Tracker",
    "Trackers",
    "TRACKERS",
    "JSONLTracker",
    "TensorBoardTracker",
    "WandbTracker",
    "MLflowTracker",
    "check_trackers",
    "open_trackers",
    "stage_values",
]


class Tracker(Protocol):
    """What every tracker does; built as ``cls(run_dir, name)``. Values are plain numbers keyed as above;
    ``close(failed=True)`` when an exception ended the run (W&B's exit code, MLflow's ``FAILED``)."""

    def log_config(self, config: dict) -> None: ...

    def log_step(self, step: int, values: dict[str, float]) -> None: ...

    def log_stage(self, stage: int, values: dict[str, float]) -> None: ...

    def log_images(self, images: dict[str, Path]) -> None: ...

    def log_file(self, path: Path) -> None: ...

    def close(self, failed: bool = False) -> None: ...


def _flat(tree: dict, prefix: str = "") -> dict:
    """``{"train": {"lr": 1e-3}}`` → ``{"train.lr": 1e-3}``."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class JSONLTracker:
    """``<run_dir>/log.jsonl``, always written: each call one line, flushed at once, so a killed run
    keeps everything it logged; a resumed run appends to it."""

    def __init__(self, run_dir: Path, name: str):
        self.run_dir = Path(run_dir)
        self._file = open(self.run_dir / "log.jsonl", "a", encoding="utf-8")

    def _write(self, kind: str, entry: dict) -> None:
        self._file.write(json.dumps({"kind": kind, **entry}, default=str) + "\n")
        self._file.flush()

    def log_config(self, config: dict) -> None:
        self._write("config", {"config": config})

    def log_step(self, step: int, values: dict[str, float]) -> None:
        self._write("step", {"step": step, **values})

    def log_stage(self, stage: int, values: dict[str, float]) -> None:
        self._write("stage", {"stage": stage, **values})

    def log_images(self, images: dict[str, Path]) -> None:
        self._write("images", {"images": {k: str(Path(p).relative_to(self.run_dir)) for k, p in images.items()}})

    def log_file(self, path: Path) -> None:
        self._write("file", {"path": str(Path(path).relative_to(self.run_dir))})

    def close(self, failed: bool = False) -> None:
        if not self._file.closed:
            self._write("end", {"status": "failed" if failed else "finished"})
            self._file.close()


class TensorBoardTracker:
    """Event files in ``<run_dir>/tensorboard`` (``tensorboard --logdir runs`` shows every run):
    steps on the step axis, stages on the stage axis, the config as text, the heatmaps as images."""

    def __init__(self, run_dir: Path, name: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def log_config(self, config: dict) -> None:
        import yaml

        # Indented four spaces: TensorBoard renders text as Markdown, and this keeps it a code block.
        text = yaml.safe_dump(config, sort_keys=False)
        self.writer.add_text("config", "\n".join("    " + line for line in text.splitlines()))

    def log_step(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def log_stage(self, stage: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, stage)
        self.writer.flush()

    def log_images(self, images: dict[str, Path]) -> None:
        from matplotlib import image

        for name, path in images.items():
            pixels = image.imread(path)  # PNG: floats in [0, 1], RGBA
            self.writer.add_image(f"images/{name}", pixels[..., :3], dataformats="HWC")

    def log_file(self, path: Path) -> None:
        """TensorBoard keeps no files; the run folder holds them."""

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run in ``<run_dir>/wandb``, offline unless ``WANDB_MODE`` says otherwise: a run never needs
    the network or a login to train (``wandb sync <run_dir>/wandb/offline-run-*`` uploads it later).
    Project ``WANDB_PROJECT`` (default ``continual-ft``); a resumed run goes on in the same W&B run."""

    def __init__(self, run_dir: Path, name: str):
        import wandb

        self._wandb = wandb
        folder = Path(run_dir) / "wandb"
        folder.mkdir(exist_ok=True)
        id_file = folder / "run_id"
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "continual-ft"),
            name=name,
            id=id_file.read_text().strip() if id_file.is_file() else None,  # a resumed run: the same W&B run
            resume="allow",
            dir=str(run_dir),
            mode=os.environ.get("WANDB_MODE", "offline"),
            settings=wandb.Settings(console="off", silent=True),
        )
        id_file.write_text(self.run.id + "\n")
        self.run.define_metric("train/step")
        self.run.define_metric("train/*", step_metric="train/step")
        self.run.define_metric("stage")
        for group in ("R", "metrics", "stage", "strategy"):
            self.run.define_metric(f"{group}/*", step_metric="stage")

    def log_config(self, config: dict) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log_step(self, step: int, values: dict[str, float]) -> None:
        self.run.log({"train/step": step, **values})

    def log_stage(self, stage: int, values: dict[str, float]) -> None:
        self.run.log({"stage": stage, **values})

    def log_images(self, images: dict[str, Path]) -> None:
        self.run.log({f"images/{k}": self._wandb.Image(str(p)) for k, p in images.items()})

    def log_file(self, path: Path) -> None:
        # A copy in the run's files folder, which W&B uploads (``run.save`` would link to the run folder by
        # absolute path, broken once the run folder moves).
        shutil.copy2(path, Path(self.run.dir) / Path(path).name)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class MLflowTracker:
    """An MLflow run in ``MLFLOW_TRACKING_URI`` if set, else in a local store inside the run folder:
    ``<run_dir>/mlruns/mlflow.db`` (SQLite) with the artifacts beside it
    (``mlflow ui --backend-store-uri sqlite:///<run_dir>/mlruns/mlflow.db``). Experiment
    ``MLFLOW_EXPERIMENT_NAME`` (default ``continual-ft``). ``<run_dir>/mlflow_run.json`` names the
    store and the run, and a resumed run goes on in it."""

    def __init__(self, run_dir: Path, name: str):
        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating initial ... tables"
        self.run_dir = Path(run_dir)
        local = self.run_dir.resolve() / "mlruns"
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # MLflow 3 refuses a bare folder as a store; SQLite is its local default
            local.mkdir(exist_ok=True)
            uri = f"sqlite:///{local / 'mlflow.db'}"
        self.client = MlflowClient(uri)
        record = self.run_dir / "mlflow_run.json"
        saved = json.loads(record.read_text()) if record.is_file() else {}
        self.resumed = saved.get("tracking_uri") == uri
        if self.resumed:
            self.run_id = saved["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", "continual-ft")
            found = self.client.get_experiment_by_name(experiment)
            if found is not None:
                experiment_id = found.experiment_id
            else:
                artifacts = (local / "artifacts").as_uri() if not os.environ.get("MLFLOW_TRACKING_URI") else None
                experiment_id = self.client.create_experiment(experiment, artifact_location=artifacts)
            self.run_id = self.client.create_run(
                experiment_id, run_name=name, tags={"continual_ft.run_dir": str(self.run_dir.resolve())}
            ).info.run_id
            record.write_text(json.dumps({"tracking_uri": uri, "run_id": self.run_id}, indent=2) + "\n")

    def log_config(self, config: dict) -> None:
        if self.resumed:  # MLflow's parameters cannot change; config.yaml as an artifact shows any --set
            return
        from mlflow.entities import Param

        # MLflow caps a value at 6000 characters and a batch at 100 parameters.
        params = [Param(k, str(v)[:6000]) for k, v in _flat(config).items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def _metrics(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])

    def log_step(self, step: int, values: dict[str, float]) -> None:
        self._metrics(step, values)

    def log_stage(self, stage: int, values: dict[str, float]) -> None:
        self._metrics(stage, values)

    def log_images(self, images: dict[str, Path]) -> None:
        for path in images.values():
            self.client.log_artifact(self.run_id, str(path), artifact_path="images")

    def log_file(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


@dataclass(frozen=True)
class Backend:
    """A tracker ``log=`` can name: its class and the module it needs (from the extra of its name)."""

    cls: type
    module: str
    help: str


#: A backend for each name ``log=[...]`` allows (:data:`continual_ft.config.TRACKER_NAMES`, in its order);
#: ``log.jsonl`` in the run folder is always written besides.
TRACKERS: dict[str, Backend] = {
    "tensorboard": Backend(TensorBoardTracker, "torch.utils.tensorboard", "event files in <run_dir>/tensorboard"),
    "wandb": Backend(WandbTracker, "wandb", "Weights & Biases, offline in <run_dir>/wandb unless WANDB_MODE=online"),
    "mlflow": Backend(MLflowTracker, "mlflow", "MLflow, to MLFLOW_TRACKING_URI or a local store in <run_dir>/mlruns"),
}


def check_trackers(names: list[str]) -> None:
    """Every tracker in ``names`` is known and importable: one line naming the install if not."""
    for name in names:
        check_choice("log", name)
        try:
            importlib.import_module(TRACKERS[name].module)
        except ImportError:
            raise ContinualFTError(f'log={name} needs the {name} package: pip install "continual-ft[{name}]"') from None


class Trackers:
    """The run's trackers together (``log.jsonl`` first, then those ``log=`` names): each call goes to all.

    ``with trackers:`` closes them at the end, marking the run failed if an exception ends it.
    An empty list (a process other than the first) logs nothing.
    """

    def __init__(self, trackers: list[Tracker] | None = None):
        self.trackers = list(trackers or [])

    def log_config(self, config: dict) -> None:
        for t in self.trackers:
            t.log_config(config)

    def log_step(self, step: int, values: dict[str, float]) -> None:
        for t in self.trackers:
            t.log_step(step, values)

    def log_stage(self, stage: int, values: dict[str, float]) -> None:
        for t in self.trackers:
            t.log_stage(stage, values)

    def log_images(self, images: dict[str, Path]) -> None:
        for t in self.trackers:
            t.log_images(images)

    def log_file(self, path: Path) -> None:
        for t in self.trackers:
            t.log_file(path)

    def close(self, failed: bool = False) -> None:
        trackers, self.trackers = self.trackers, []
        for t in trackers:
            t.close(failed)

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        self.close(failed=kind is not None)


def open_trackers(names: list[str], run_dir: Path, name: str) -> Trackers:
    """``log.jsonl`` in ``run_dir`` and each tracker ``names`` lists; run ``name`` where a tracker shows one."""
    trackers = Trackers([JSONLTracker(run_dir, name)])
    try:
        for tracker in names:
            trackers.trackers.append(TRACKERS[tracker].cls(run_dir, name))
    except BaseException:
        trackers.close(failed=True)
        raise
    return trackers


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def stage_values(results: dict) -> dict[str, float]:
    """What a tracker gets at a stage boundary, from the run's ``results.json`` as it stands: the newest row
    of R, the metrics over the tasks trained so far, and the newest stage's numbers (see the module doc)."""
    values = {}
    for metric, R in results["R"].items():
        if not R:
            continue
        for task, v in zip(results["tasks"], R[-1]):
            if _number(v):
                values[f"R/{metric}/{task}"] = v
        S = len(R) - 1
        # tasks trained so far, and scored by this metric (a stream may mix choice and generative tasks)
        seen = [j for j, f in enumerate(results["first_stage"]) if f <= S and R[0][j] is not None]
        if S >= 1 and seen:  # the metrics as if the run ended here, over the tasks trained so far
            sub = [[row[j] for j in seen] for row in R]
            summary = metrics.summary(sub, [results["first_stage"][j] for j in seen])
            values.update({f"metrics/{metric}/{k}": v for k, v in summary.items() if _number(v)})
    stats = results["stage_stats"][-1] if results["stage_stats"] else {}  # none before training
    for k, v in stats.items():
        if _number(v):
            values[f"stage/{k}"] = v
    for strategy, numbers in (stats.get("strategy_stats") or {}).items():
        values.update({f"strategy/{strategy}/{k}": v for k, v in numbers.items() if _number(v)})
    return values
