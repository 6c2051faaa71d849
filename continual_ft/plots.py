"""Plots: the forgetting-matrix heatmap of a run (values in the cells), and the comparison figures."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from continual_ft.results import load_results, umask  # noqa: E402

__all__ = ["heatmap", "plot_run", "heatmap_grid", "acc_bwt_bars", "save_figure"]


def heatmap(ax, results: dict, metric: str, title: str | None = None) -> None:
    """Draw R[metric] on ``ax``: rows are evaluation points, columns tasks, percent in each cell."""
    R = [[float("nan") if v is None else 100 * v for v in row] for row in results["R"][metric]]
    im = ax.imshow(R, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(results["tasks"])), results["tasks"])
    ax.set_yticks(range(len(results["rows"])), results["rows"])
    ax.set_xlabel("evaluated task")
    for i, row in enumerate(R):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.1f}", ha="center", va="center", color="white" if v < 60 else "black", fontsize=10)
    ax.set_title(title or f"{results.get('strategy', '')} / {results.get('adapter', '')}: {metric}")
    return im


def plot_run(run_dir: Path) -> list[Path]:
    """(Re)draw a run's heatmaps from its results.json; returns the files written."""
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


def acc_bwt_bars(runs: dict[str, dict], path: Path) -> Path:
    """Grouped bars of final average accuracy (ACC) and backward transfer (BWT) per run, in %."""
    names = list(runs)
    values = {k: [] for k in ("acc", "bwt")}
    for results in runs.values():
        m = results.get("metrics", {}).get(results["primary_metric"], {})
        for k in values:
            values[k].append(100 * m[k] if m.get(k) is not None else float("nan"))
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(names) + 2), 4.0))
    ax.bar([i - 0.2 for i in x], values["acc"], width=0.4, label="ACC")
    ax.bar([i + 0.2 for i in x], values["bwt"], width=0.4, label="BWT")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(list(x), names, rotation=30, ha="right")
    ax.set_ylabel("%")
    ax.set_title("final accuracy (ACC) and backward transfer (BWT)")
    ax.legend(loc="upper left", bbox_to_anchor=(1, 1))
    fig.tight_layout()
    return save_figure(fig, path)
