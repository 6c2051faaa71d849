"""How long self-synthesized rehearsal takes to write its examples, with and without the split decode.

SSR's once-per-stage cost is generation: sampled inputs after a few-shot context of real examples
(long prompts, 64 new tokens), then greedy answers. ``Batches.generate`` runs the prompt through the
model's own attention (SDPA) and, on CPU, the new tokens through eager attention, whose one-row
decode step is about twice as fast there. This script times ``SSR.after_stage`` on the first stage
of a scenario both ways, on the same model, in rotating order, and says how many of the kept
synthetic examples are the same text both ways (the two kernels round differently in bf16, so a
sampled token may now and then differ).

    python bench/generation.py                        # smollm2-135m, stage 1 of legal_then_medical
    python bench/generation.py --model tiny --repeat 1 --set ssr.per_task=8
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m, tiny, a local directory or a hub id")
    p.add_argument("--scenario", default="legal_then_medical")
    p.add_argument("--repeat", type=int, default=2, help="timed runs per variant (the median is reported)")
    p.add_argument("--per-task", type=int, default=None, help="ssr.per_task (default: SSR's own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="OUT", help="write the results as JSON to this file")
    args = p.parse_args(argv)
    if args.repeat < 1 or (args.per_task is not None and args.per_task < 1):
        p.error("--repeat and --per-task must be >= 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    from continual_ft import adapters
    from continual_ft import stage as stage_module
    from continual_ft.batching import Encoder
    from continual_ft.config import DataConfig, LoraConfig, TrainConfig
    from continual_ft.models import load_model
    from continual_ft.scenario import load_scenario
    from continual_ft.stage import Batches, stage_info
    from continual_ft.strategies import SSR
    from continual_ft.strategies.ssr import SSRConfig
    from continual_ft.trainer import autocast_for, resolve_precision

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve_precision("auto", device)
    scenario = load_scenario(args.scenario, seed=args.seed)
    first = [ex for t in scenario.stages[0].tasks for ex in scenario.tasks[t].train]
    model, tokenizer = load_model(args.model, seed=args.seed)
    model = model.to(device=device, dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    model = adapters.start_stage(model, "continue", 0, LoraConfig())
    data = DataConfig()
    encoder = Encoder(tokenizer, TrainConfig().max_length, data.chat_template, data.system_prompt)
    batches = Batches(encoder, 8, device, autocast_for(precision, device))
    stage = stage_info(0, scenario.stages[0].tasks, first, batches)
    config = SSRConfig(seed=args.seed, **({} if args.per_task is None else {"per_task": args.per_task}))

    split = stage_module._generate

    def plain(model, ids, mask, options):
        return model.generate(input_ids=ids, attention_mask=mask, **options)

    variants = {"one kernel (model.generate)": plain, "split (SDPA prompt, eager decode)": split}
    seconds = {name: [] for name in variants}
    kept = {}
    for r in range(args.repeat):
        for name in list(variants)[r % 2 :] + list(variants)[: r % 2]:  # rotate: drift hits both alike
            stage_module._generate = variants[name]
            ssr = SSR(config)
            start = time.perf_counter()
            ssr.after_stage(model, stage)
            seconds[name].append(time.perf_counter() - start)
            kept[name] = [e.prompt + "\n" + e.answer for e in ssr.pool]
    stage_module._generate = split
    a, b = (kept[name] for name in variants)
    result = {
        "model": args.model,
        "scenario": args.scenario,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "per_task": config.per_task,
        "seconds": seconds,
        "median_seconds": {name: statistics.median(s) for name, s in seconds.items()},
        "kept": {name: len(k) for name, k in kept.items()},
        "same_examples": sum(x == y for x, y in zip(a, b)),
    }
    base, new = result["median_seconds"].values()
    result["speedup"] = base / new
    for name, s in result["median_seconds"].items():
        print(f"{name:36s} {s:7.1f} s  ({', '.join(f'{x:.1f}' for x in seconds[name])}), kept {len(kept[name])}")
    print(f"speed-up {result['speedup']:.2f}x; {result['same_examples']} of {len(a)} kept examples identical")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
