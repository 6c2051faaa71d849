"""Replay + EWC in a hand-written PyTorch loop: no runner, no Trainer, just the strategy hooks.

    python examples/plain_loop.py --model tiny --scenario legal_then_medical --quick
    python examples/plain_loop.py --model tiny --scenario legal_then_medical --quick --strategy agem

Each stage: the strategies pick the training data (replay mixes in its buffer), the loop trains
the LoRA adapter with the task loss plus every strategy's penalty (EWC's), lets the strategies see
each step's gradient before it is clipped and applied (A-GEM projects it), the strategies update
after the stage (replay fills its buffer, EWC estimates its Fisher), and every task is scored.
``run_stage`` calls the hooks in that order around ``train``, the loop below, which calls
``total_penalty`` and ``after_backward``: the protocol functions (``continual_ft.train.protocol``) every
loop calls, ours, the HF Trainer integration's and the Avalanche plugin's alike. ``LOOP`` declares the
hooks this loop calls (all of them), so ``refuse`` stops a strategy it could not run before anything trains.
Prints the accuracy matrix R: row "after s" = accuracy on each task after training stage s.
"""

from __future__ import annotations

import argparse
import random

import torch

from continual_ft.config import LoraConfig
from continual_ft.data.scenario import load_scenario
from continual_ft.eval.metrics import summary
from continual_ft.eval.scoring import evaluate_task
from continual_ft.model.adapters import start_stage
from continual_ft.model.loading import load_model
from continual_ft.report.tables import format_matrix, format_metrics
from continual_ft.strategies import build
from continual_ft.train.batching import Encoder, collate, length_grouped_batches, to_device
from continual_ft.train.losses import token_loss
from continual_ft.train.protocol import (
    Batches,
    Loop,
    StageInfo,
    StageRun,
    Strategy,
    after_backward,
    refuse,
    run_stage,
    stage_info,
    total_penalty,
)

#: This loop, as ``refuse`` checks strategies against it: every hook, one process.
LOOP = Loop("examples/plain_loop.py", instead="run it with cli.py run")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="tiny, smollm2-135m, a local directory or a hub id")
    p.add_argument("--scenario", default="legal_then_medical", help="shipped scenario name or a scenario YAML path")
    p.add_argument("--quick", action="store_true", help="use the scenario's small `quick` sizes")
    p.add_argument("--epochs", type=int, default=1, help="passes over each stage's training data")
    p.add_argument("--batch-size", type=int, default=8, help="examples per optimizer step")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--strategy", default="replay+ewc", help="strategies, '+'-joined (replay, ewc, agem, ...)")
    p.add_argument("--buffer-size", type=int, default=32, help="replay buffer size (and agem's memory size)")
    p.add_argument("--ewc-lam", type=float, default=100.0, help="EWC penalty strength")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def train_stage(model, stage: StageInfo, strategies: list[Strategy], encoder: Encoder, args) -> StageRun:
    """One stage: ``run_stage`` calls the strategies' hooks around ``train``, which trains the adapter
    the model carries (``start_stage``) with AdamW on the task loss plus every strategy's penalty."""
    device = next(model.parameters()).device

    def train(examples):
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=args.lr)
        encoded = [encoder.encode(e) for e in examples]
        rng = random.Random(args.seed + stage.index)
        model.train()
        step = 0
        for _ in range(args.epochs):
            for items in length_grouped_batches(encoded, args.batch_size, rng):
                step += 1
                batch = to_device(collate(items, encoder.tokenizer.pad_token_id), device)
                summed, n, outputs = token_loss(model, batch)
                loss = summed / n
                extra = total_penalty(strategies, model, batch, outputs)
                if extra is not None:
                    loss = loss + extra
                loss.backward()
                after_backward(strategies, model, stage, step)  # the step's gradient is complete
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

    return run_stage(model, stage, strategies, train)


def main(argv=None) -> list[list[float]]:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    scenario = load_scenario(args.scenario, quick=args.quick, seed=args.seed)
    model, tokenizer = load_model(args.model, seed=args.seed)
    model = model.to(device)
    encoder = Encoder(tokenizer, max_length=256)
    settings = {
        "replay": {"buffer_size": args.buffer_size, "ratio": 0.25, "seed": args.seed},
        "ewc": {"lam": args.ewc_lam, "fisher_batches": 4, "seed": args.seed},
        "agem": {"memory_size": args.buffer_size, "reference_batch": args.batch_size, "seed": args.seed},
    }
    names = [n.strip() for n in args.strategy.split("+")]
    strategies = build(args.strategy, {n: settings[n] for n in names if n in settings})
    refuse(strategies, LOOP)

    batches = Batches(encoder, args.batch_size, device)  # how a strategy runs the model over data (EWC's Fisher)

    tasks = list(scenario.tasks)
    rows, R = [], []

    def evaluate(row: str) -> None:
        rows.append(row)
        R.append([evaluate_task(model, encoder, scenario.tasks[t]).accuracy for t in tasks])

    evaluate("before training")
    for i, stage_def in enumerate(scenario.stages):
        own = [ex for t in stage_def.tasks for ex in scenario.tasks[t].train]
        final = i == len(scenario.stages) - 1  # EWC skips the Fisher no later stage would use
        stage = stage_info(i, stage_def.tasks, own, batches, final=final)
        model = start_stage(model, "continue", i, LoraConfig(r=8, alpha=16))

        done = train_stage(model, stage, strategies, encoder, args)
        evaluate(f"after {stage_def.name}")
        print(f"stage {i + 1} ({stage_def.name}): trained on {done.examples} examples ({len(own)} own)", flush=True)

    first = [next(i + 1 for i, st in enumerate(scenario.stages) if t in st.tasks) for t in tasks]
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
