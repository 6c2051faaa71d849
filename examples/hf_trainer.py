"""EWC + LwF with the Hugging Face ``Trainer``, through ``continual_ft.integrations.hf_trainer.ContinualTrainer``.

    python examples/hf_trainer.py --model tiny --scenario legal_then_medical --quick

The same strategy objects as in our runner and in ``examples/plain_loop.py``: the Trainer adds
their penalties to the loss (a ``compute_loss`` override), and ``train_stage_hf`` calls
``train_data``/``before_stage``/``after_stage`` around ``trainer.train()``. Prints the accuracy
matrix R: row "after s" = accuracy on each task after training stage s.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import TrainingArguments

from continual_ft.config import LoraConfig
from continual_ft.data.scenario import load_scenario
from continual_ft.eval.metrics import summary
from continual_ft.eval.scoring import evaluate_task
from continual_ft.integrations.hf_trainer import stage_info, train_stage_hf
from continual_ft.model.adapters import start_stage
from continual_ft.model.loading import load_model
from continual_ft.report.tables import format_matrix, format_metrics
from continual_ft.strategies import EWC, EWCConfig, LwF, LwFConfig
from continual_ft.train.batching import Encoder


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="tiny, smollm2-135m, a local directory or a hub id")
    p.add_argument("--scenario", default="legal_then_medical", help="shipped scenario name or a scenario YAML path")
    p.add_argument("--quick", action="store_true", help="use the scenario's small `quick` sizes")
    p.add_argument("--epochs", type=float, default=1, help="passes over each stage's training data")
    p.add_argument("--batch-size", type=int, default=8, help="examples per optimizer step")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--ewc-lam", type=float, default=100.0, help="EWC penalty strength")
    p.add_argument("--lwf-alpha", type=float, default=1.0, help="LwF distillation weight")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> list[list[float]]:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    scenario = load_scenario(args.scenario, quick=args.quick, seed=args.seed)
    model, tokenizer = load_model(args.model, seed=args.seed)
    model = model.to("cuda" if torch.cuda.is_available() else "cpu")
    encoder = Encoder(tokenizer, max_length=256)
    strategies = [
        EWC(EWCConfig(lam=args.ewc_lam, fisher_batches=4, seed=args.seed)),
        LwF(LwFConfig(alpha=args.lwf_alpha, temperature=2.0)),
    ]

    tasks = list(scenario.tasks)
    rows, R = [], []

    def evaluate(row: str) -> None:
        rows.append(row)
        R.append([evaluate_task(model, encoder, scenario.tasks[t]).accuracy for t in tasks])

    evaluate("before training")
    with tempfile.TemporaryDirectory() as out:  # the Trainer wants an output_dir; we save nothing there
        for i, stage_def in enumerate(scenario.stages):
            own = [ex for t in stage_def.tasks for ex in scenario.tasks[t].train]
            final = i == len(scenario.stages) - 1  # EWC skips the Fisher no later stage would use
            stage = stage_info(i, own, encoder, batch_size=args.batch_size, final=final)
            model = start_stage(model, "continue", i, LoraConfig(r=8, alpha=16))
            training_args = TrainingArguments(
                output_dir=out,
                per_device_train_batch_size=args.batch_size,
                num_train_epochs=args.epochs,
                learning_rate=args.lr,
                lr_scheduler_type="constant",
                max_grad_norm=1.0,
                seed=args.seed + i,
                logging_strategy="epoch",
                save_strategy="no",
                report_to="none",
                disable_tqdm=True,
                dataloader_pin_memory=torch.cuda.is_available(),
            )
            trainer = train_stage_hf(model, tokenizer, own, strategies, stage, training_args, encoder=encoder)
            evaluate(f"after {stage_def.name}")
            loss = trainer.state.log_history[-1].get("train_loss", float("nan"))
            print(
                f"stage {i + 1} ({stage_def.name}): {trainer.state.global_step} steps, train loss {loss:.3f}",
                flush=True,
            )

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
