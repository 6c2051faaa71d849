"""What a generative task scores without a model: the most frequent training answer, and the input's first words.

    python scripts/generative_baselines.py legal_then_medical_gen mixed_domains

For each generative task of each scenario (seed 0 by default), on its test split and every metric the task
names: answering every example with the training split's most frequent answer ("majority"), and copying the
first n words of the example's input text, n the median length in words of the training answers ("copy").
A trained model's learnability is read against the larger of the two.
"""

from __future__ import annotations

import argparse
import collections
import statistics

from continual_ft.data.scenario import load_scenario
from continual_ft.eval import text_metrics


def _input_text(prompt: str) -> str:
    """The example's own text: the line after the last blank line that holds a ': ' field, else the prompt."""
    parts = [p for p in prompt.split("\n\n") if ": " in p]
    return parts[-1].split(": ", 1)[1] if parts else prompt


def baselines(task) -> dict[str, dict[str, float]]:
    gold = [ex.answer for ex in task.test]
    majority = collections.Counter(ex.answer for ex in task.train).most_common(1)[0][0]
    n = max(1, round(statistics.median(len(ex.answer.split()) for ex in task.train)))
    copies = [" ".join(_input_text(ex.prompt).split()[:n]) for ex in task.test]
    out = {}
    for name, answers in (("majority", [majority] * len(gold)), (f"copy {n} words", copies)):
        scores = text_metrics.score_all(answers, gold, list(task.metrics))
        out[name] = {m: 100 * sum(v) / len(v) for m, v in scores.items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenarios", nargs="+")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for name in args.scenarios:
        scenario = load_scenario(name, seed=args.seed)
        for task in scenario.tasks.values():
            if not task.generative:
                continue
            for how, scores in baselines(task).items():
                cells = ", ".join(f"{m} {v:.1f}" for m, v in scores.items())
                print(f"{name} / {task.name} ({len(task.test)} test examples), {how}: {cells}")


if __name__ == "__main__":
    main()
