"""Training throughput: continual-ft's ``train_stage`` against a plain Hugging Face ``Trainer`` + PEFT script.

Both variants train the same LoRA (r, alpha, targets, dropout from ``continual_ft.config.LoraConfig()``) on
the same model, the same training examples and the same token ids (``continual_ft.batching.Encoder``), for
the same number of optimizer steps with the same batch size and learning rate. Each variant runs in its own
fresh subprocess, so one's memory peak, allocator state or compiled kernels never reach the other.

    python bench/throughput.py                                    # smollm2-135m, 96 legal examples, 12 steps
    python bench/throughput.py --model tiny --examples 32 --steps 4 --json bench.json

Throughput counts *real* tokens: the non-padding tokens of every batch trained on (attention-mask sum),
so padding never counts as work done. Timing starts after the first ``--warmup-steps`` optimizer steps
and ends at the last one; both variants are timed the same way (a hook after every ``optimizer.step()``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("ours", "baseline")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m, tiny, a local directory or a hub id")
    p.add_argument("--scenario", default="legal_then_medical", help="scenario name or YAML path")
    p.add_argument("--task", default="legal", help="task of the scenario whose training examples are used")
    p.add_argument("--examples", type=int, default=96, help="training examples (the first N of the task's train split)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per optimizer step (no accumulation)")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps; 0 = --epochs passes over the examples")
    p.add_argument("--epochs", type=int, default=1, help="passes over the examples when --steps is 0")
    p.add_argument("--warmup-steps", type=int, default=2, help="first optimizer steps left out of the timing")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: continual-ft's train.lr)")
    p.add_argument("--max-length", type=int, default=None, help="longest tokenized example (default: train.max_length)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads in each variant; 0 = torch's default")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run each variant this many times (alternating); the median-throughput run is reported",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--variant",
        choices=("both",) + VARIANTS,
        default="both",
        help="both = run each variant in a fresh subprocess and compare (what you want);\n"
        "ours / baseline = run one variant in this process (what the subprocesses do)",
    )
    p.add_argument("--json", metavar="OUT", help="write the results as JSON to this file")
    args = p.parse_args(argv)
    for name in ("examples", "batch_size", "epochs", "repeat"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.steps < 0 or args.warmup_steps < 0 or args.threads < 0:
        p.error("--steps, --warmup-steps and --threads must be >= 0")
    return args


def total_steps(args, n_examples: int) -> int:
    return args.steps or args.epochs * math.ceil(n_examples / args.batch_size)


# --------------------------------------------------------------------------------------------------
# Measurement shared by both variants (runs inside the child process)
# --------------------------------------------------------------------------------------------------


class Memory:
    """Peak memory of this process, and of the training alone where the peak can be reset.

    The run's own meters (``continual_ft.runner.peak_memory_mb`` / ``reset_peak_memory``): CPU, peak
    resident set size (VmHWM, reset through ``/proc/self/clear_refs`` on Linux); CUDA, the caching
    allocator's ``max_memory_allocated``. ``train_peak_mb`` is the peak from just before training.
    """

    def __init__(self, device):
        self.device = device
        self.before = 0.0
        self.resettable = device.type == "cuda" or os.access("/proc/self/clear_refs", os.W_OK)

    def start(self) -> None:
        from continual_ft.runner import peak_memory_mb, reset_peak_memory

        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
        self.before = peak_memory_mb(self.device)
        reset_peak_memory(self.device)

    def finish(self) -> dict:
        from continual_ft.runner import peak_memory_mb

        during = peak_memory_mb(self.device)
        return {
            "peak_memory_mb": max(self.before, during),
            "train_peak_memory_mb": during if self.resettable else None,
            "memory_kind": "cuda max_memory_allocated" if self.device.type == "cuda" else "peak RSS",
        }


class StepTimer:
    """Timestamps every optimizer step and counts real tokens per step, identically for both variants.

    A forward pre-hook on the model adds up the attention mask of every training forward (real tokens) and
    its size (padded tokens); a global post-hook on ``torch.optim.Optimizer.step`` closes the step.
    """

    def __init__(self, model, device):
        import torch
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.device = device
        self.real = self.padded = 0
        self.step_real: list[int] = []
        self.step_padded: list[int] = []
        self.stamps: list[float] = []
        self.start_time = 0.0
        self._handles = [
            model.register_forward_pre_hook(self._forward, with_kwargs=True),
            register_optimizer_step_post_hook(self._step),
        ]
        self._torch = torch

    def _forward(self, module, args, kwargs):
        if not (module.training and self._torch.is_grad_enabled()):
            return
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids", args[0] if args else None)
        if mask is None:
            self.real += ids.numel()
            self.padded += ids.numel()
        else:
            self.real += int(mask.sum())
            self.padded += mask.numel()

    def _step(self, optimizer, args, kwargs):
        # Only torch's own optimizers: a wrapper (accelerate's AcceleratedOptimizer) must not count twice.
        if not type(optimizer).__module__.startswith("torch.optim"):
            return
        if self.device.type == "cuda":
            self._torch.cuda.synchronize(self.device)
        self.stamps.append(time.perf_counter())
        self.step_real.append(self.real)
        self.step_padded.append(self.padded)
        self.real = self.padded = 0

    def begin(self) -> None:
        self.start_time = time.perf_counter()

    def close(self) -> None:
        for h in self._handles:
            h.remove()

    def summary(self, warmup: int) -> dict:
        steps = len(self.stamps)
        if steps == 0:
            raise RuntimeError("no optimizer step was seen: nothing to time")
        skip = warmup if steps > warmup else 0  # too few steps to leave any out: time them all
        t0 = self.stamps[skip - 1] if skip else self.start_time
        seconds = self.stamps[-1] - t0
        real, padded = sum(self.step_real[skip:]), sum(self.step_padded[skip:])
        return {
            "steps": steps,
            "timed_steps": steps - skip,
            "warmup_steps_excluded": skip,
            "real_tokens": real,
            "padded_tokens": padded,
            "padding_fraction": 1 - real / padded if padded else 0.0,
            "seconds": seconds,
            "tokens_per_s": real / seconds if seconds > 0 else 0.0,
            "all_steps_real_tokens": sum(self.step_real),
            # per-step wall times (all steps, the first from the start of training): shows warm-up and noise
            "step_seconds": [b - a for a, b in zip([self.start_time] + self.stamps[:-1], self.stamps)],
        }


# --------------------------------------------------------------------------------------------------
# The two variants
# --------------------------------------------------------------------------------------------------


def _setup(args):
    """Device, examples and the encoder settings both variants share."""
    import torch

    from continual_ft.config import DataConfig, TrainConfig
    from continual_ft.errors import ContinualFTError
    from continual_ft.scenario import load_scenario

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    scenario = load_scenario(args.scenario, seed=args.seed, sizes={"train": args.examples})
    if args.task not in scenario.tasks:
        tasks = ", ".join(scenario.tasks)
        raise ContinualFTError(f"scenario {scenario.name} has no task {args.task!r}; tasks: {tasks}")
    examples = scenario.tasks[args.task].train[: args.examples]
    if len(examples) < args.examples:
        print(f"[bench] only {len(examples)} training examples available for {args.task}", file=sys.stderr)
    train_defaults, data_defaults = TrainConfig(), DataConfig()
    lr = args.lr if args.lr is not None else train_defaults.lr
    max_length = args.max_length or train_defaults.max_length
    encoder_kwargs = {
        "max_length": max_length,
        "chat_template": data_defaults.chat_template,
        "system_prompt": data_defaults.system_prompt,
    }
    return device, examples, lr, max_length, encoder_kwargs


def run_ours(args) -> dict:
    """continual-ft's own path, as ``continual_ft.runner.run`` sets it up for one stage."""
    import torch

    from continual_ft import adapters
    from continual_ft.batching import Encoder
    from continual_ft.config import LoraConfig, TrainConfig
    from continual_ft.models import load_model
    from continual_ft.trainer import autocast_for, resolve_precision, train_stage

    device, examples, lr, max_length, encoder_kwargs = _setup(args)
    steps = total_steps(args, len(examples))
    precision = resolve_precision("auto", device)
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model, seed=args.seed)
    # As runner.run: frozen base weights in bf16 when computing in bf16 (LoRA weights stay fp32 in PEFT).
    model = model.to(device=device, dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    encoder = Encoder(tokenizer, **encoder_kwargs)
    model = adapters.start_stage(model, "continue", 0, LoraConfig())
    cfg = TrainConfig(lr=lr, batch_size=args.batch_size, max_steps=steps, max_length=max_length)

    timer, memory = StepTimer(model, device), Memory(device)
    memory.start()
    timer.begin()
    wall = time.perf_counter()
    stats = train_stage(
        model, encoder, examples, [], cfg, seed=args.seed, autocast=autocast_for(precision, device), progress=False
    )
    wall = time.perf_counter() - wall
    timer.close()
    out = timer.summary(args.warmup_steps)
    if stats.steps != steps or out["steps"] != steps:
        raise RuntimeError(f"ours: expected {steps} optimizer steps, train_stage did {stats.steps}, saw {out['steps']}")
    if stats.tokens != out["all_steps_real_tokens"]:
        raise RuntimeError(f"ours: StageStats.tokens {stats.tokens} != counted {out['all_steps_real_tokens']}")
    out.update(memory.finish())
    out.update(
        {
            "precision": precision,
            "total_seconds": wall,  # the whole train_stage() call
            "total_tokens_per_s": stats.tokens / wall,
            "stage_stats_tokens_per_s": stats.tokens_per_s,  # StageStats: all steps, its own clock
            "train_loss": stats.train_loss,
            "loss_on": "answer tokens only",
        }
    )
    return out


def run_baseline(args) -> dict:
    """What a typical user writes: fp32 model, PEFT LoRA, HF Trainer, default LM collator, loss on everything."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from continual_ft.batching import Encoder
    from continual_ft.config import LoraConfig
    from continual_ft.models import load_model

    device, examples, lr, _, encoder_kwargs = _setup(args)
    steps = total_steps(args, len(examples))
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model, dtype=torch.float32, seed=args.seed)
    lora = LoraConfig()
    model = get_peft_model(
        model,
        PeftLoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules),
            task_type="CAUSAL_LM",
        ),
    )
    # The same token ids as ours: prompt (chat template included) + answer + EOS, as one full sequence.
    encoder = Encoder(tokenizer, **encoder_kwargs)
    rows = []
    for e in examples:
        enc = encoder.encode(e)
        ids = list(enc.prompt_ids + enc.answer_ids)
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
    dataset = Dataset.from_list(rows)
    tokenizer.padding_side = "right"
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)  # labels = input_ids, pads masked out

    with tempfile.TemporaryDirectory(prefix="bench-hf-") as out_dir:
        training_args = TrainingArguments(
            output_dir=out_dir,
            per_device_train_batch_size=args.batch_size,
            max_steps=steps,
            learning_rate=lr,
            report_to=[],
            save_strategy="no",
            logging_steps=10**6,
            disable_tqdm=True,
            use_cpu=device.type == "cpu",
            seed=args.seed,
        )
        trainer = Trainer(model=model, args=training_args, train_dataset=dataset, data_collator=collator)
        timer, memory = StepTimer(trainer.model, device), Memory(device)
        memory.start()
        timer.begin()
        wall = time.perf_counter()
        result = trainer.train()
        wall = time.perf_counter() - wall
        timer.close()
    out = timer.summary(args.warmup_steps)
    if out["steps"] != steps or trainer.state.global_step != steps:
        raise RuntimeError(
            f"baseline: expected {steps} optimizer steps, saw {out['steps']} "
            f"(Trainer global_step {trainer.state.global_step})"
        )
    out.update(memory.finish())
    out.update(
        {
            "precision": "fp32",
            "total_seconds": wall,  # trainer.train() only
            "total_tokens_per_s": out["all_steps_real_tokens"] / wall,
            "train_loss": result.training_loss,
            "loss_on": "all tokens (prompt + answer)",
        }
    )
    return out


def run_variant(args) -> dict:
    import torch

    result = (run_ours if args.variant == "ours" else run_baseline)(args)
    result.update(
        {
            "variant": args.variant,
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "torch_threads": torch.get_num_threads(),
            "pid": os.getpid(),
        }
    )
    return result


# --------------------------------------------------------------------------------------------------
# Parent: one fresh subprocess per variant run, then the comparison
# --------------------------------------------------------------------------------------------------

_FORWARDED = (
    "model",
    "scenario",
    "task",
    "examples",
    "batch_size",
    "steps",
    "epochs",
    "warmup_steps",
    "lr",
    "max_length",
    "threads",
    "seed",
)


def _child_command(args, variant: str, out: Path) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--variant", variant, "--json", str(out)]
    for name in _FORWARDED:
        value = getattr(args, name)
        if value is not None:
            cmd += [f"--{name.replace('_', '-')}", str(value)]
    return cmd


def _fmt_mb(x) -> str:
    return "-" if x is None else f"{x:.0f}"


def format_table(results: dict) -> str:
    head = [
        "variant",
        "precision",
        "steps",
        "real tokens",
        "seconds",
        "real tok/s",
        "peak MB",
        "train peak MB",
        "pad %",
    ]
    rows = []
    for name in VARIANTS:
        r = results["variants"][name]
        rows.append(
            [
                name,
                r["precision"],
                f"{r['timed_steps']}/{r['steps']}",
                str(r["real_tokens"]),
                f"{r['seconds']:.2f}",
                f"{r['tokens_per_s']:.1f}",
                _fmt_mb(r["peak_memory_mb"]),
                _fmt_mb(r["train_peak_memory_mb"]),
                f"{100 * r['padding_fraction']:.1f}",
            ]
        )
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    c = results["config"]
    ratio, mem = results["ratio_tokens_per_s"] or 0.0, results["ratio_peak_memory"] or 0.0
    lines.append(
        f"ours/baseline real tokens/s: {ratio:.2f}x   "
        f"(peak memory ratio {mem:.2f}x; {c['model']}, {c['examples']} "
        f"{c['task']} examples, batch {c['batch_size']}, {c['steps']} steps, "
        f"first {c['warmup_steps']} untimed, {results['variants']['ours']['device']})"
    )
    return "\n".join(lines)


def run_both(args) -> dict:
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="bench-throughput-") as tmp:
        for k in range(args.repeat):
            for variant in VARIANTS:
                out = Path(tmp) / f"{variant}-{k}.json"
                print(f"[bench] {variant} run {k + 1}/{args.repeat} ...", file=sys.stderr, flush=True)
                proc = subprocess.run(_child_command(args, variant, out))
                if proc.returncode != 0 or not out.exists():
                    raise SystemExit(f"[bench] the {variant} run failed (exit code {proc.returncode})")
                runs[variant].append(json.loads(out.read_text()))
    chosen = {}
    for variant, rs in runs.items():
        median = statistics.median_low([r["tokens_per_s"] for r in rs])
        chosen[variant] = next(r for r in rs if r["tokens_per_s"] == median)
        chosen[variant]["all_runs_tokens_per_s"] = [r["tokens_per_s"] for r in rs]
    ours, base = chosen["ours"], chosen["baseline"]
    config = {name: getattr(args, name) for name in _FORWARDED + ("repeat",)}
    config["steps"] = ours["steps"]
    return {
        "config": config,
        "variants": chosen,
        "ratio_tokens_per_s": ours["tokens_per_s"] / base["tokens_per_s"] if base["tokens_per_s"] else None,
        "ratio_peak_memory": ours["peak_memory_mb"] / base["peak_memory_mb"] if base["peak_memory_mb"] else None,
        # Whole epochs give both variants exactly the same tokens; a partial epoch, different random subsets.
        "same_tokens_all_steps": ours["all_steps_real_tokens"] == base["all_steps_real_tokens"],
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.variant != "both":
        from continual_ft.errors import ContinualFTError

        try:
            result = run_variant(args)
        except ContinualFTError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
        else:
            print(json.dumps(result, indent=2))
        return 0
    results = run_both(args)
    print(format_table(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"[bench] results written to {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
