"""Does ``torch.compile`` pay for itself on our training step? Eager against compiled, same batches.

Trains the model's LoRA adapter on the first ``--steps`` length-grouped batches of legal examples (the
trainer's batching: widths rounded to 16, batches split to the CPU token budget, eager attention while
training) with ``backward_step`` and AdamW, and prints each step's time and the real tokens/s after the
first ``--warmup`` steps. ``--mode compiled`` wraps the model in ``torch.compile(dynamic=True)`` first, so
its first step includes the compilation.

    python bench/compile_probe.py --mode eager
    python bench/compile_probe.py --mode compiled            # SmolLM2-135M: minutes to compile on CPU
    python bench/compile_probe.py --model tiny --steps 3     # smoke test (tests/test_bench.py)
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=["eager", "compiled"], default="eager")
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m, tiny, a local directory or a hub id")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2, help="untimed first steps (the compiled variant compiles here)")
    p.add_argument("--json", metavar="OUT", help="write the results as JSON to this file")
    args = p.parse_args(argv)
    if args.steps <= args.warmup or args.warmup < 0:
        p.error("--steps must be larger than --warmup >= 0")

    import torch

    from continual_ft.config import LoraConfig, TrainConfig
    from continual_ft.data.scenario import load_scenario
    from continual_ft.model import adapters
    from continual_ft.model.loading import load_model
    from continual_ft.train.batching import Encoder, collate, length_grouped_batches, split_batch, to_device
    from continual_ft.train.loop import (
        autocast_for,
        backward_step,
        micro_token_budget,
        pad_multiple,
        resolve_precision,
        training_attention,
    )

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve_precision("auto", device)
    torch.manual_seed(0)
    model, tokenizer = load_model(args.model, seed=0)
    model = model.to(device=device, dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    model = adapters.start_stage(model, "continue", 0, LoraConfig())
    train = TrainConfig()
    encoder = Encoder(tokenizer, train.max_length)
    examples = load_scenario("legal_then_medical", seed=0).tasks["legal"].train
    encoded = [encoder.encode(e) for e in examples[: 8 * args.steps]]
    batches = list(length_grouped_batches(encoded, 8, random.Random(0)))[: args.steps]
    budget, multiple = micro_token_budget(train, device, None), pad_multiple(train, device)
    autocast = autocast_for(precision, device)
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=train.lr)
    target = torch.compile(model, dynamic=True) if args.mode == "compiled" else model

    times, tokens, first = [], [], None
    model.train()
    with training_attention(model, train.attention, device):
        for i, items in enumerate(batches):
            parts = split_batch(items, budget)  # as the trainer splits a batch on CPU
            micro = [to_device(collate(part, tokenizer.pad_token_id, multiple), device) for part in parts]
            start = time.perf_counter()
            backward_step(target, micro, [], autocast)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - start
            first = seconds if first is None else first
            n = sum(b["n_tokens"] for b in micro)
            print(f"[{args.mode}] step {i + 1}/{len(batches)}: {seconds:.2f} s, {n} real tokens", file=sys.stderr)
            if i >= args.warmup:
                times.append(seconds)
                tokens.append(n)
    result = {
        "mode": args.mode,
        "model": args.model,
        "device": str(device),
        "precision": precision,
        "threads": torch.get_num_threads(),
        "first_step_seconds": first,  # includes the compilation when compiled
        "step_seconds_median": statistics.median(times),
        "tokens_per_s": sum(tokens) / sum(times),
    }
    print(
        f"{args.mode}: {result['tokens_per_s']:.1f} real tokens/s over {len(times)} steps "
        f"(median step {result['step_seconds_median']:.2f} s) on {device}, {precision}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
