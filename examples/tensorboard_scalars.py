"""Draw what a run sent to TensorBoard (``log=tensorboard``), read back from its event files.

    python cli.py run quick log=tensorboard output_dir=runs name=tracked
    python examples/tensorboard_scalars.py runs/tracked docs/results/tracking.png

Three panels: the loss of every optimizer step, tokens/s per step, and each task's accuracy after
every stage (the rows of R, as ``R/accuracy/<task>``). ``tensorboard --logdir runs`` shows the same.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def main(run_dir: str, out: str) -> None:
    events = EventAccumulator(str(Path(run_dir) / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    if "train/loss" not in tags:
        sys.exit(f"error: no train/loss in {run_dir}/tensorboard: was the run made with log=tensorboard?")

    def series(tag):
        points = events.Scalars(tag)
        return [p.step for p in points], [p.value for p in points]

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for ax, tag in zip(axes[:2], ("train/loss", "train/tokens_per_s")):
        ax.plot(*series(tag), lw=1)
        ax.set(title=tag, xlabel="optimizer step")
    stages = series("train/stage")
    for ax in axes[:2]:  # where each stage starts
        for step, (prev, cur) in zip(stages[0][1:], zip(stages[1], stages[1][1:])):
            if cur != prev:
                ax.axvline(step, color="grey", ls=":", lw=1)
    for tag in sorted(t for t in tags if t.startswith("R/accuracy/")):
        steps, values = series(tag)
        axes[2].plot(steps, [100 * v for v in values], marker="o", label=tag.split("/")[-1])
    axes[2].set(title="R/accuracy/<task> (%)", xlabel="stage (0 = before training)", xticks=steps)
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python examples/tensorboard_scalars.py RUN_DIR OUT.png")
    main(*sys.argv[1:])
