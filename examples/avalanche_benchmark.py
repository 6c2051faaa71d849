"""Avalanche's own Naive strategy on our scenario, with our model, LoRA adapter and evaluator.

    bash scripts/install_avalanche.sh        # avalanche-lib needs its own venv (torchvision's torch)
    .venv-avalanche/bin/python examples/avalanche_benchmark.py --tiny     # random 2-layer model, seconds
    .venv-avalanche/bin/python examples/avalanche_benchmark.py            # SmolLM2-135M, legal → medical
    .venv-avalanche/bin/python examples/avalanche_benchmark.py --plugin replay   # + our Replay as a plugin

The scenario becomes an Avalanche benchmark (one experience per stage, task labels, train and test
streams); the LM, wrapped as a classifier over answer tokens, trains in Avalanche's loop; after every
experience our evaluator scores every task. Prints the accuracy matrix R.
"""

from __future__ import annotations

import argparse

import torch
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin

from continual_ft.config import LoraConfig
from continual_ft.data.scenario import load_scenario
from continual_ft.eval.metrics import summary
from continual_ft.eval.scoring import evaluate_task
from continual_ft.integrations.avalanche import CausalLMClassifier, StrategyPlugin, benchmark
from continual_ft.model.adapters import start_stage
from continual_ft.model.loading import load_model
from continual_ft.report.tables import format_matrix, format_metrics
from continual_ft.strategies import EWC, Replay
from continual_ft.train.batching import Encoder


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="a tiny random model and the quick sizes (a smoke run)")
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m, tiny, a local directory or a hub id")
    p.add_argument("--scenario", default="legal_then_medical", help="shipped scenario name or a scenario YAML path")
    p.add_argument("--quick", action="store_true", help="use the scenario's small `quick` sizes")
    p.add_argument("--plugin", choices=["none", "replay", "ewc"], default="none", help="one of ours as a plugin")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> list[list[float]]:
    args = parse_args(argv)
    if args.tiny:
        args.model, args.quick = "tiny", True
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lm, tokenizer = load_model(args.model, seed=args.seed)
    lm = start_stage(lm.to(device), "continue", 0, LoraConfig(r=8, alpha=16))  # one LoRA adapter, continued
    encoder = Encoder(tokenizer, max_length=256)
    scenario = load_scenario(args.scenario, quick=args.quick, seed=args.seed)
    bm = benchmark(scenario, encoder)

    plugins = {"none": [], "replay": [Replay()], "ewc": [EWC()]}[args.plugin]
    model = CausalLMClassifier(lm)
    strategy = Naive(
        model=model,
        optimizer=torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr),
        criterion=torch.nn.CrossEntropyLoss(),  # over answer tokens (ignore_index=-100): our task loss
        train_mb_size=args.batch_size,
        device=device,
        plugins=[StrategyPlugin(plugins, encoder, args.batch_size)] if plugins else [],
        evaluator=EvaluationPlugin(loggers=[]),
    )

    tasks = list(scenario.tasks)
    rows, R = ["before training"], [[evaluate_task(lm, encoder, scenario.tasks[t]).accuracy for t in tasks]]
    for stage, experience in zip(scenario.stages, bm.train_stream):
        strategy.train(experience)
        rows.append(f"after {stage.name}")
        R.append([evaluate_task(lm, encoder, scenario.tasks[t]).accuracy for t in tasks])

    first = [next(i + 1 for i, s in enumerate(scenario.stages) if t in s.tasks) for t in tasks]
    results = {
        "primary_metric": "accuracy",
        "tasks": tasks,
        "rows": rows,
        "R": {"accuracy": R},
        "metrics": {"accuracy": summary(R, first)},
    }
    print(format_matrix(results))
    print(format_metrics(results))
    return R


if __name__ == "__main__":
    main()
