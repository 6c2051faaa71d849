"""Training throughput: continual-ft's ``train_stage`` against a plain Hugging Face ``Trainer`` + PEFT script.

Both variants train the same LoRA (r, alpha, targets, dropout of ``lora.*``) on the same model, the same
training examples and the same token ids (``continual_ft.train.batching.Encoder``), for whole epochs (or the same
number of optimizer steps) with the same batch size and learning rate. Each variant runs in its own fresh
subprocess, so one's memory peak, allocator state or compiled kernels never reach the other.

    python bench/throughput.py                                    # smollm2-135m, 96 legal examples, 12 steps
    python bench/throughput.py --model tiny --examples 32 --steps 4 --json bench.json
    python bench/throughput.py --arch smollm2-1.7b --save-random ckpt/   # SmolLM2-1.7B's shapes, random weights

Throughput counts *real* tokens: the non-padding tokens of every batch trained on (attention-mask sum),
so padding never counts as work done. Each variant first trains ``--warmup-steps`` untimed steps on the same
warm-up examples (the first ``--warmup-steps`` × ``--batch-size``), puts its LoRA weights back, then trains
the timed run: every step of it, timed the same way in both (a hook after every ``optimizer.step()``), so both
time the very same tokens. Achieved TFLOP/s is the FLOPs per real token each variant computes times real
tokens/s (``mfu.py``: the vocabulary projection counted only where the variant computes logits).

The benchmark imports only what continual-ft itself imports (no ``datasets``): it runs where the library runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from meters import Memory, StepTimer
from mfu import FORMULA, achieved, device_name, flops_per_token, known_peak_tflops, measure_matmul_tflops
from random_arch import ARCHS

VARIANTS = ("ours", "baseline")
BASELINES = ("auto", "fp32", "bf16")

#: Settings the benchmark sets for both variants from its own options; ``--set`` must not change them for one.
_OWNED = {
    "train.lr": "--lr",
    "train.batch_size": "--batch-size",
    "train.max_length": "--max-length",
    "train.max_steps": "--steps",
    "train.epochs": "--epochs",
    "seed": "--seed",
    "model": "--model or --arch",
    "scenario": "--scenario",
}
#: What ``--set`` may change: ours' trainer and precision, and (for both variants) the LoRA and the prompt format.
_SETTABLE = ("train.", "lora.", "precision", "data.chat_template", "data.system_prompt")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="smollm2-135m (default), tiny, a local directory or a hub id")
    p.add_argument(
        "--arch",
        choices=tuple(ARCHS),
        default=None,
        help="instead of --model: this SmolLM2 architecture with seeded random weights, built in bf16 on the device",
    )
    p.add_argument("--layers", type=int, default=0, help="with --arch: keep only this many decoder layers (0 = all)")
    p.add_argument(
        "--tokenizer", default="smollm2-135m", help="with --arch: its tokenizer, a model name or folder (tiny: tests)"
    )
    p.add_argument(
        "--save-random",
        metavar="DIR",
        help="with --arch: write the random checkpoint (and tokenizer) to DIR once, then both variants load it;\n"
        "continual-ft run model=DIR loads it too",
    )
    p.add_argument("--save-only", action="store_true", help="with --save-random: write the checkpoint and stop")
    p.add_argument(
        "--baseline",
        choices=BASELINES,
        default="auto",
        help="fp32: fp32 model, default collator, random order (a typical CPU script);\n"
        "bf16: bf16 weights, TrainingArguments(bf16=True), length-grouped batches (a typical GPU script);\n"
        "auto: bf16 on CUDA, fp32 elsewhere",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a continual-ft setting for ours (make_config syntax), e.g. --set train.max_tokens=4096;\n"
        "train.* and precision change ours only, lora.* and data.chat_template/system_prompt both variants",
    )
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the device's bf16 peak, for the fraction of peak; default: a known GPU's data-sheet figure,\n"
        "else (CPUs) the bf16 matmul TFLOP/s measured here before the runs, in the variants' thread count",
    )
    p.add_argument("--scenario", default="legal_then_medical", help="scenario name or YAML path")
    p.add_argument("--task", default="legal", help="task of the scenario whose training examples are used")
    p.add_argument("--examples", type=int, default=96, help="training examples (the first N of the task's train split)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per optimizer step (no accumulation)")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps; 0 = --epochs passes over the examples")
    p.add_argument("--epochs", type=int, default=1, help="passes over the examples when --steps is 0")
    p.add_argument(
        "--warmup-steps",
        type=int,
        default=2,
        help="untimed steps before the timed run, on the same first examples in both variants (LoRA reset after)",
    )
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: continual-ft's train.lr)")
    p.add_argument("--max-length", type=int, default=None, help="longest tokenized example (default: train.max_length)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads in each variant; 0 = torch's default")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run each variant this many times (alternating, each in its own process); medians are reported",
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
    if args.steps < 0 or args.warmup_steps < 0 or args.threads < 0 or args.layers < 0:
        p.error("--steps, --warmup-steps, --threads and --layers must be >= 0")
    if args.arch and args.model:
        p.error("give --model or --arch, not both")
    if not args.arch and (args.layers or args.save_random):
        p.error("--layers and --save-random need --arch")
    if args.save_only and not args.save_random:
        p.error("--save-only needs --save-random DIR")
    if not args.arch:
        args.model = args.model or "smollm2-135m"
    from continual_ft.errors import ContinualFTError

    try:
        run_config(args)  # a wrong --set fails here, before any process starts
    except ContinualFTError as e:
        p.error(str(e))
    return args


def run_config(args):
    """continual-ft's ``RunConfig``: the benchmark's shared settings, then ``--set``."""
    from continual_ft.config import TrainConfig, make_config, parse_overrides
    from continual_ft.errors import ContinualFTError

    for key, _ in parse_overrides(args.set):
        if key in _OWNED:
            raise ContinualFTError(f"--set {key}: the benchmark sets it for both variants; use {_OWNED[key]}")
        if not key.startswith(_SETTABLE):
            raise ContinualFTError(f"--set {key}: not used here; --set takes {', '.join(k + '*' for k in _SETTABLE)}")
    defaults = TrainConfig()
    shared = [
        f"train.lr={args.lr if args.lr is not None else defaults.lr}",
        f"train.batch_size={args.batch_size}",
        f"train.max_length={args.max_length or defaults.max_length}",
        f"train.max_steps={args.steps}",
        f"train.epochs={args.epochs}",
        f"seed={args.seed}",
    ]
    return make_config(shared + list(args.set))


def total_steps(args, n_examples: int) -> int:
    return args.steps or args.epochs * math.ceil(n_examples / args.batch_size)


# --------------------------------------------------------------------------------------------------
# The two variants
# --------------------------------------------------------------------------------------------------


def _setup(args):
    """Device, run config, examples and the encoder settings both variants share."""
    import torch

    from continual_ft.data.scenario import load_scenario
    from continual_ft.errors import ContinualFTError

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = run_config(args)
    scenario = load_scenario(args.scenario, seed=args.seed, sizes={"train": args.examples})
    if args.task not in scenario.tasks:
        tasks = ", ".join(scenario.tasks)
        raise ContinualFTError(f"scenario {scenario.name} has no task {args.task!r}; tasks: {tasks}")
    examples = scenario.tasks[args.task].train[: args.examples]
    if len(examples) < args.examples:
        print(f"[bench] only {len(examples)} training examples available for {args.task}", file=sys.stderr)
    encoder_kwargs = {
        "max_length": config.train.max_length,
        "chat_template": config.data.chat_template,
        "system_prompt": config.data.system_prompt,
    }
    return device, config, examples, encoder_kwargs


def _random_model(args, device, dtype):
    """``--arch``: seeded random weights, built in bf16 on the device; cast to ``dtype`` there (same values)."""
    import torch
    from random_arch import build_random

    from continual_ft.model.loading import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    model = build_random(args.arch, tokenizer, device, torch.bfloat16, seed=args.seed, layers=args.layers)
    return model.to(dtype), tokenizer


def _measure_flops(model, encoder, examples, device, peak_tflops, projected: float) -> dict:
    """F per token of this model and these examples, computing logits for the share ``projected`` of the
    real tokens (measured on the timed steps), the device, and its peak (``--peak-tflops`` or a known GPU)."""
    name = device_name(device)
    peak = peak_tflops if peak_tflops is not None else known_peak_tflops(name)
    work = flops_per_token(model, [len(encoder.encode(e)) for e in examples], projected)
    return {**work, "device_name": name, "peak_tflops": peak}


def _warm_up(model, args, train) -> None:
    """``--warmup-steps`` untimed steps of ``train(steps)`` on the warm-up examples, then the trainable
    weights back to where they were: the timed run starts from the same LoRA as without a warm-up."""
    if not args.warmup_steps:
        return
    import torch

    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    train(args.warmup_steps)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in start:
                p.copy_(start[n])
                p.grad = None


def _warmup_examples(args, examples: list) -> list:
    """The same examples warm both variants up: the first ``--warmup-steps`` batches' worth."""
    return examples[: args.warmup_steps * args.batch_size]


def run_ours(args) -> dict:
    """continual-ft's own path, as ``continual_ft.run.runner.run`` sets it up for one stage (``--set`` applied)."""
    import torch

    from continual_ft.model import adapters
    from continual_ft.model.loading import load_model
    from continual_ft.train.batching import Encoder
    from continual_ft.train.loop import autocast_for, resolve_precision, train_stage

    device, config, examples, encoder_kwargs = _setup(args)
    precision = resolve_precision(config.precision, device)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    torch.manual_seed(args.seed)
    if args.arch:
        model, tokenizer = _random_model(args, device, dtype)
    else:
        model, tokenizer = load_model(args.model, seed=args.seed)
        # As runner.run: frozen base weights in bf16 when computing in bf16 (LoRA weights stay fp32 in PEFT).
        model = model.to(device=device, dtype=dtype)
    encoder = Encoder(tokenizer, **encoder_kwargs)
    model = adapters.start_stage(model, "continue", 0, config.lora)
    autocast = autocast_for(precision, device)

    def warm(steps: int) -> None:
        cfg = dataclasses.replace(config.train, max_steps=steps)
        warm_examples = _warmup_examples(args, examples)
        train_stage(model, encoder, warm_examples, [], cfg, seed=args.seed, autocast=autocast, progress=False)

    _warm_up(model, args, warm)
    timer, memory = StepTimer(model, device, pad_id=tokenizer.pad_token_id), Memory(device)
    memory.start()
    timer.begin()
    wall = time.perf_counter()
    stats = train_stage(
        model,
        encoder,
        examples,
        [],
        config.train,
        seed=args.seed,
        autocast=autocast,
        progress=False,
    )
    wall = time.perf_counter() - wall
    timer.close()
    out = timer.summary(0)  # the warm-up ran before the timer: every step of this run is timed
    if stats.steps != out["steps"]:
        raise RuntimeError(f"ours: train_stage did {stats.steps} optimizer steps, the timer saw {out['steps']}")
    if stats.tokens != out["all_steps_real_tokens"]:
        raise RuntimeError(f"ours: StageStats.tokens {stats.tokens} != counted {out['all_steps_real_tokens']}")
    out.update(memory.finish())
    out.update(_measure_flops(model, encoder, examples, device, args.peak_tflops, out["projected_share"]))
    out.update(
        {
            "precision": precision,
            "recipe": f"{precision} frozen base + autocast, length-grouped left-padded batches, answer-only logits",
            "settings": list(args.set),
            "total_seconds": wall,  # the whole timed train_stage() call
            "total_tokens_per_s": stats.tokens / wall,
            "stage_stats_tokens_per_s": stats.tokens_per_s,  # StageStats: all steps, its own clock
            "train_loss": stats.train_loss,
            "loss_on": "answer tokens only",
        }
    )
    return out


def _sampling_by_length() -> dict:
    """``TrainingArguments`` for length-grouped batches: ``group_by_length=True`` until transformers 5.x replaced it."""
    from transformers import TrainingArguments

    if "group_by_length" in TrainingArguments.__dataclass_fields__:
        return {"group_by_length": True}
    return {"train_sampling_strategy": "group_by_length"}


def run_baseline(args) -> dict:
    """What a typical user writes: PEFT LoRA, HF ``Trainer``, the default LM collator, loss on every token.

    ``fp32`` (the CPU script): fp32 model, random order. ``bf16`` (the GPU script): bf16 weights,
    ``TrainingArguments(bf16=True)`` and length-grouped batches. The examples are a plain list of dicts, which
    ``Trainer`` takes as a map-style dataset: no ``datasets`` needed.
    """
    import torch
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from continual_ft.model.loading import load_model
    from continual_ft.train.batching import Encoder

    device, config, examples, encoder_kwargs = _setup(args)
    mode = args.baseline if args.baseline != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    steps = total_steps(args, len(examples))
    torch.manual_seed(args.seed)
    if args.arch:
        model, tokenizer = _random_model(args, device, dtype)
    else:
        model, tokenizer = load_model(args.model, dtype=dtype, seed=args.seed)
    lora = config.lora
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
    tokenizer.padding_side = "right"
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)  # labels = input_ids, pads masked out

    with tempfile.TemporaryDirectory(prefix="bench-hf-") as out_dir:

        def trainer_for(max_steps: int, data: list) -> Trainer:
            training_args = TrainingArguments(
                output_dir=out_dir,
                per_device_train_batch_size=args.batch_size,
                max_steps=max_steps,
                learning_rate=config.train.lr,
                report_to=[],
                save_strategy="no",
                logging_steps=10**6,
                disable_tqdm=True,
                use_cpu=device.type == "cpu",
                seed=args.seed,
                **({"bf16": True, **_sampling_by_length()} if mode == "bf16" else {}),
            )
            return Trainer(model=model, args=training_args, train_dataset=data, data_collator=collator)

        _warm_up(model, args, lambda n: trainer_for(n, _warmup_examples(args, rows)).train())
        trainer = trainer_for(steps, rows)
        timer, memory = StepTimer(trainer.model, device), Memory(device)
        memory.start()
        timer.begin()
        wall = time.perf_counter()
        result = trainer.train()
        wall = time.perf_counter() - wall
        timer.close()
    out = timer.summary(0)  # the warm-up ran before the timer: every step of this run is timed
    if out["steps"] != steps or trainer.state.global_step != steps:
        raise RuntimeError(
            f"baseline: expected {steps} optimizer steps, saw {out['steps']} "
            f"(Trainer global_step {trainer.state.global_step})"
        )
    out.update(memory.finish())
    out.update(_measure_flops(model, encoder, examples, device, args.peak_tflops, out["projected_share"]))
    recipe = {
        "fp32": "fp32 model, default collator, random order, right padding",
        "bf16": "bf16 weights, TrainingArguments(bf16=True), length-grouped, default collator, right padding",
    }[mode]
    out.update(
        {
            "precision": mode,
            "recipe": recipe,
            "total_seconds": wall,  # the timed trainer.train() only
            "total_tokens_per_s": out["all_steps_real_tokens"] / wall,
            "train_loss": result.training_loss,
            "loss_on": "all tokens (prompt + answer)",
        }
    )
    return out


def run_variant(args) -> dict:
    import torch

    result = (run_ours if args.variant == "ours" else run_baseline)(args)
    result.update(achieved(result["flops_per_token"], result["tokens_per_s"], result["peak_tflops"]))
    # The usual count (every token projected onto the vocabulary), which credits ours with logits it skips.
    full = achieved(result["model_flops_per_token"], result["tokens_per_s"], result["peak_tflops"])
    result.update({"model_tflops": full["tflops"], "model_fraction_of_peak": full["fraction_of_peak"]})
    result.update(
        {
            "variant": args.variant,
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "torch_threads": torch.get_num_threads(),
            "pid": os.getpid(),
        }
    )
    return result


def save_random_checkpoint(args) -> Path:
    """``--save-random``: build ``--arch`` on the device in bf16 and write it (with the tokenizer) to the folder."""
    import torch
    from random_arch import build_random, save_random

    from continual_ft.model.loading import load_tokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(args.tokenizer)
    model = build_random(args.arch, tokenizer, device, torch.bfloat16, seed=args.seed, layers=args.layers)
    note = {"arch": args.arch, "layers": model.config.num_hidden_layers, "seed": args.seed, "tokenizer": args.tokenizer}
    out = save_random(model, tokenizer, args.save_random, note)
    params = sum(p.numel() for p in model.parameters())
    print(f"[bench] {args.arch}: {params / 1e6:.1f}M random bf16 parameters written to {out}", file=sys.stderr)
    return out


# --------------------------------------------------------------------------------------------------
# Parent: one fresh subprocess per variant run, then the comparison
# --------------------------------------------------------------------------------------------------

_FORWARDED = (
    "model",
    "arch",
    "layers",
    "tokenizer",
    "baseline",
    "peak_tflops",
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
_MEDIANS = (
    "tokens_per_s",
    "seconds",
    "tflops",
    "fraction_of_peak",
    "model_tflops",
    "model_fraction_of_peak",
    "peak_memory_mb",
    "train_peak_memory_mb",
)


def _child_command(args, *extra: str, **replace) -> list[str]:
    """This script again, with the options of this run (``replace`` overriding some) and then ``extra``."""
    values = {name: getattr(args, name) for name in _FORWARDED} | replace
    if not values["arch"]:  # --layers and --tokenizer go with --arch only
        values.update(layers=None, tokenizer=None)
    cmd = [sys.executable, str(Path(__file__).resolve())]
    for name, value in values.items():
        if value is not None:
            cmd += [f"--{name.replace('_', '-')}", str(value)]
    for item in args.set:
        cmd += ["--set", item]
    return cmd + list(extra)


def _median(runs: list[dict], key: str):
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_table(results: dict) -> str:
    head = ["variant", "precision", "steps", "real tokens", "seconds", "real tok/s", "TFLOP/s", "% peak"]
    head += ["peak MB", "train peak MB", "pad %"]
    rows = []
    for name in VARIANTS:
        r, m = results["variants"][name], results["variants"][name]["median"]
        fraction = None if m["fraction_of_peak"] is None else 100 * m["fraction_of_peak"]
        rows.append(
            [
                name,
                r["precision"],
                f"{r['timed_steps']}/{r['steps']}",
                str(r["real_tokens"]),
                f"{m['seconds']:.2f}",
                f"{m['tokens_per_s']:.1f}",
                _fmt(m["tflops"], ".3g"),
                _fmt(fraction, ".1f"),
                _fmt(m["peak_memory_mb"], ".0f"),
                _fmt(m["train_peak_memory_mb"], ".0f"),
                f"{100 * r['padding_fraction']:.1f}",
            ]
        )
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    c, ours = results["config"], results["variants"]["ours"]
    ratio, mem = results["ratio_tokens_per_s"] or 0.0, results["ratio_peak_memory"] or 0.0
    what = c["model"]
    if c["arch"]:
        layers = f", {c['layers']} layers" if c["layers"] else ""
        what = f"{c['arch']} (random weights{layers})"
    lines.append(
        f"ours/baseline real tokens/s: {ratio:.2f}x   (peak memory ratio {mem:.2f}x; median of {c['repeat']} "
        f"run{'s' if c['repeat'] > 1 else ''} each; {what}, {c['examples']} {c['task']} examples, "
        f"batch {c['batch_size']}, {c['warmup_steps']} warm-up step{'' if c['warmup_steps'] == 1 else 's'} "
        "on the same examples before the timed run)"
    )
    peak = "" if ours["peak_tflops"] is None else f"; % peak of {ours['peak_tflops']:.3g} TFLOP/s (bf16, dense)"
    lines.append(
        f"device: {ours['device_name']}; FLOPs per real token computed {FORMULA} "
        f"(N = {ours['matmul_params'] / 1e6:.1f}M, N_vocab = {ours['vocab_params'] / 1e6:.1f}M, "
        f"N_lora = {ours['lora_params'] / 1e6:.2f}M, "
        f"c = {ours['mean_causal_context']:.0f}){peak}"
    )
    for name in VARIANTS:
        r, m = results["variants"][name], results["variants"][name]["median"]
        full = "" if m["model_fraction_of_peak"] is None else f", {100 * m['model_fraction_of_peak']:.1f}% peak"
        lines.append(
            f"  {name}: p = {r['projected_share']:.3f} of real tokens projected onto the vocabulary, "
            f"F = {r['flops_per_token'] / 1e9:.4g} GFLOP; counting every token's logits (F = "
            f"{r['model_flops_per_token'] / 1e9:.4g} GFLOP): {_fmt(m['model_tflops'], '.3g')} TFLOP/s{full}"
        )
    measured = results.get("measured_matmul_tflops")
    if measured:
        lines.append(
            f"measured dense matmul on this device: bf16 {measured['bf16']:.3g}, fp32 {measured['fp32']:.3g} TFLOP/s "
            f"(bf16/fp32 {measured['bf16'] / measured['fp32']:.2f}x)"
        )
    if c["set"]:
        lines.append(f"ours with: {' '.join(c['set'])}")
    return "\n".join(lines)


def measure_peaks(args) -> dict:
    """This device's measured dense matmul TFLOP/s in bf16 and fp32 (``--threads`` as the variants use)."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return {
        name: measure_matmul_tflops(device, dtype)
        for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32))
    }


def run_both(args) -> dict:
    replace = {}
    peaks = measure_peaks(args)
    print(f"[bench] measured dense matmul: bf16 {peaks['bf16']:.3g}, fp32 {peaks['fp32']:.3g} TFLOP/s", file=sys.stderr)
    if args.peak_tflops is None:
        import torch

        if torch.cuda.is_available():
            known = known_peak_tflops(torch.cuda.get_device_name())
            replace["peak_tflops"] = known if known is not None else peaks["bf16"]
        else:
            replace["peak_tflops"] = peaks["bf16"]
    if args.save_random:
        print(f"[bench] writing the random {args.arch} checkpoint to {args.save_random} ...", file=sys.stderr)
        proc = subprocess.run(_child_command(args, "--save-random", args.save_random, "--save-only"))
        if proc.returncode != 0:
            raise SystemExit(f"[bench] writing the random checkpoint failed (exit code {proc.returncode})")
        replace |= {"model": args.save_random, "arch": None}  # both variants load the very same weights from it
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="bench-throughput-") as tmp:
        for k in range(args.repeat):
            for variant in VARIANTS:
                out = Path(tmp) / f"{variant}-{k}.json"
                print(f"[bench] {variant} run {k + 1}/{args.repeat} ...", file=sys.stderr, flush=True)
                proc = subprocess.run(_child_command(args, "--variant", variant, "--json", str(out), **replace))
                if proc.returncode != 0 or not out.exists():
                    raise SystemExit(f"[bench] the {variant} run failed (exit code {proc.returncode})")
                runs[variant].append(json.loads(out.read_text()))
    chosen = {}
    for variant, rs in runs.items():
        # Details from the run of median throughput (a real run: median_low); the table shows medians.
        median = statistics.median_low([r["tokens_per_s"] for r in rs])
        chosen[variant] = next(r for r in rs if r["tokens_per_s"] == median)
        chosen[variant]["median"] = {key: _median(rs, key) for key in _MEDIANS}
        chosen[variant]["runs"] = [{key: r.get(key) for key in _MEDIANS + ("pid",)} for r in rs]
    ours, base = chosen["ours"]["median"], chosen["baseline"]["median"]
    config = {name: getattr(args, name) for name in _FORWARDED + ("repeat", "set", "save_random")}
    config["peak_tflops"] = replace.get("peak_tflops", args.peak_tflops)
    tokens = {r["all_steps_real_tokens"] for rs in runs.values() for r in rs}
    return {
        "config": config,
        "variants": chosen,
        "ratio_tokens_per_s": ours["tokens_per_s"] / base["tokens_per_s"] if base["tokens_per_s"] else None,
        "ratio_peak_memory": ours["peak_memory_mb"] / base["peak_memory_mb"] if base["peak_memory_mb"] else None,
        # Whole epochs give both variants (and every repeat) exactly the same tokens; a partial epoch does not.
        "same_tokens_all_steps": len(tokens) == 1,
        "measured_matmul_tflops": peaks,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.save_only:
        try:
            save_random_checkpoint(args)
        except FileExistsError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
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
