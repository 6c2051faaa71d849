"""Plots: a run's forgetting-matrix heatmaps (values in the cells) and its scores along the stream,
and the comparison figures."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from continual_ft.eval import metrics  # noqa: E402
from continual_ft.files import umask  # noqa: E402
from continual_ft.report.results import load_results  # noqa: E402

__all__ = ["heatmap", "stream", "plot_run", "heatmap_grid", "metric_bars", "save_figure"]


def heatmap(ax, results: dict, metric: str, title: str | None = None) -> None:
    """Draw R[metric] on ``ax``: rows are evaluation points, columns tasks, percent in each cell."""
    R = [[float("nan") if v is None else 100 * v for v in row] for row in results["R"][metric]]
    im = ax.imshow(R, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(results["tasks"])), results["tasks"])
    ax.set_yticks(range(len(results["rows"])), results["rows"])
    ax.set_xlabel("evaluated task")
    for i, row in enumerate(R):
        for j, v in enumerate(row):
            shown = "—" if v != v else f"{v:.1f}"  # NaN: the task is not scored by this metric
            ax.text(j, i, shown, ha="center", va="center", color="white" if v < 60 else "black", fontsize=10)
    ax.set_title(title or f"{results.get('strategy', '')} / {results.get('adapter', '')}: {metric}")
    return im


def stream(ax, results: dict, metric: str) -> None:
    """Each task's score after every row of R, the mean over the tasks seen so far (whose mean over
    stages is AIA), and each task's largest drop as a vertical bar from its earlier best."""
    R = [[100 * v for v in row] for row in results["R"][metric]]
    first, x = results["first_stage"], range(len(R))
    for j, task in enumerate(results["tasks"]):
        (line,) = ax.plot(x, [row[j] for row in R], marker="o", label=task)
        best, worst = None, None  # (row, value) of the earlier best and the row its largest drop ends at
        for m in range(first[j], len(R)):
            peak = max(range(first[j], m + 1), key=lambda i: R[i][j])
            if worst is None or R[peak][j] - R[m][j] > best[1] - worst[1]:
                best, worst = (peak, R[peak][j]), (m, R[m][j])
        if worst is not None and best[1] > worst[1]:
            ax.vlines(worst[0], worst[1], best[1], color=line.get_color(), linewidth=4, alpha=0.35)
    seen = [
        sum(row[j] for j, f in enumerate(first) if f <= i) / max(1, sum(f <= i for f in first))
        for i, row in enumerate(R)
    ]
    ax.plot(x[1:], seen[1:], color="black", linestyle="--", label="mean over seen tasks")
    aia = 100 * metrics.average_incremental_accuracy(results["R"][metric], first)
    drop = metrics.summary(results["R"][metric], first)["max_drop"]
    ax.set_xticks(list(x), results["rows"], rotation=20, ha="right")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_ylim(0, 100)
    ax.set_title(
        f"{metric} along the stream: AIA {aia:.1f}" + ("" if drop is None else f", largest drop {100 * drop:.1f}")
    )
    ax.legend(loc="upper left", bbox_to_anchor=(1, 1))


def plot_run(run_dir: Path) -> list[Path]:
    """(Re)draw a run's heatmaps and its ``stream.png`` from its results.json; returns the files written."""
    run_dir = Path(run_dir)
    results = load_results(run_dir)
    written = []
    for metric in results["R"]:
        fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(results["tasks"]), 1.2 + 0.55 * len(results["rows"])))
        im = heatmap(ax, results, metric)
        fig.colorbar(im, ax=ax, label=f"{metric} (%)")
        fig.tight_layout()
        name = "forgetting_matrix.png" if metric == results["primary_metric"] else f"forgetting_matrix_{metric}.png"
        save_figure(fig, run_dir / name)
        written.append(run_dir / name)
    if len(results["rows"]) == len(results.get("stages", ())) + 1:  # a finished run: R has every row
        fig, ax = plt.subplots(figsize=(3.5 + 1.2 * len(results["rows"]), 4.0))
        stream(ax, results, results["primary_metric"])
        fig.tight_layout()
        written.append(save_figure(fig, run_dir / "stream.png"))
    return written


def save_figure(fig, path: Path) -> Path:
    """Save ``fig`` as a PNG atomically (a temporary sibling renamed over ``path``) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes it 0600; a figure is for others to open
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return path


def heatmap_grid(runs: dict[str, dict], path: Path, ncols: int = 3) -> Path:
    """One forgetting-matrix heatmap per run (its primary metric), titled with the run's name."""
    ncols = max(1, min(ncols, len(runs)))
    nrows = math.ceil(len(runs) / ncols)
    first = next(iter(runs.values()))
    w, h = 1.8 + 1.6 * len(first["tasks"]), 1.4 + 0.55 * len(first["rows"])
    fig, axes = plt.subplots(nrows, ncols, figsize=(w * ncols, h * nrows), squeeze=False, layout="constrained")
    im = None
    for ax, (name, results) in zip(axes.flat, runs.items()):
        im = heatmap(ax, results, results["primary_metric"], title=name)
    for ax in list(axes.flat)[len(runs) :]:
        ax.axis("off")
    fig.colorbar(im, ax=axes.ravel().tolist(), label="primary metric (%)", shrink=0.8)
    return save_figure(fig, path)


#: What :func:`metric_bars` draws, and how it names it.
BARS = {"acc": "ACC", "bwt": "BWT", "aia": "AIA", "max_drop": "largest drop"}


def metric_bars(values: dict[str, dict[str, tuple]], path: Path, title: str = "") -> Path:
    """Grouped bars per configuration of ACC, BWT, AIA and the largest drop, in %, from
    ``{name: {key: (value, low, high)}}``; an error bar spans [low, high] where both are given."""
    names = list(values)
    width = 0.8 / len(BARS)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.4 * len(names) + 2.5), 4.2))
    for k, (key, label) in enumerate(BARS.items()):
        x = [i - 0.4 + width * (k + 0.5) for i in range(len(names))]
        v = [values[n].get(key, (None, None, None)) for n in names]
        y = [float("nan") if value is None else 100 * value for value, _, _ in v]
        err = [
            [0.0 if lo is None or value is None else 100 * (value - lo) for value, lo, _ in v],
            [0.0 if hi is None or value is None else 100 * (hi - value) for value, _, hi in v],
        ]
        ax.bar(x, y, width=width, label=label, yerr=err, capsize=3, error_kw={"linewidth": 1})
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("%")
    ax.set_title(title or "ACC, BWT, AIA and largest drop")
    ax.legend(loc="upper left", bbox_to_anchor=(1, 1))
    fig.tight_layout()
    return save_figure(fig, path)
