"""Plots: the forgetting-matrix heatmap of a run (values in the cells)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from continual_ft.results import load_results  # noqa: E402

__all__ = ["heatmap", "plot_run"]


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
        fig.savefig(run_dir / name, dpi=120)
        plt.close(fig)
        written.append(run_dir / name)
    return written
