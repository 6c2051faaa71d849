"""What each strategy adds to a stage's time, against naive, timed step by step on identical batches.

A strategy costs time in two ways: per step (a penalty: EWC's quadratic term, LwF's teacher forward,
O-LoRA's factor products) and once per stage (EWC's Fisher pass after a stage, LwF's snapshot before
one, replay's mixing). Replay, joint and task_balanced change *which* examples a stage trains on, not
what a step costs per token, so at equal training tokens they cost what naive costs.

The script builds the state a second stage starts from (a first-stage adapter trained for a few
steps; EWC's Fisher and anchors; LwF's teacher), then times one full training step (``backward_step``,
gradient clipping, AdamW) of every variant on the *same* batch of the second stage's data, rotating
the order from batch to batch, so drift in machine speed hits all variants alike. The once-per-stage
hooks are timed separately. The projected time of a stage of n = ``--stage-steps`` steps that pays
both the per-step and the once-per-stage cost (a middle stage: EWC's Fisher runs after every stage but
the last, its penalty in every stage but the first), against naive:

    overhead = (median_b t_step(variant, b) · n + t_once) / (median_b t_step(naive, b) · n)

O-LoRA needs a new adapter per stage, so it is compared with naive under ``adapter=new`` (two LoRA
modules per layer), not with the single continued adapter. A-GEM's per-step cost is its reference
gradient (``after_backward``: a forward and backward on a batch from its memory of the first stage),
at its defaults (a reference batch of 8, every step as in the paper), with 2 examples, and recomputed
every 8th step (``reference_every=8``, timed by the mean over the steps, since a median would leave
out the one step in eight that pays: ``--batches`` a multiple of 8 times whole periods). SSR
trains like replay (at equal tokens a step costs what naive's does); its once-per-stage cost is writing
and answering its synthetic examples (at its default, three inputs written from each few-shot
context, which is prefilled once; ``ssr (samples=1)``: one input per context). MagMax
(``adapter=merge_final method=magmax``) trains a fresh adapter from the base each stage (one active
adapter, as naive's) and combines the stage adapters after it, timed here for two.

    python bench/strategy_overhead.py                    # smollm2-135m, stage 2 of legal_then_medical
    python bench/strategy_overhead.py --model tiny --batches 3 --json overhead.json
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


ALL = {
    "naive",
    "ewc",
    "lwf",
    "lwf (fraction=1)",
    "naive (adapter=new)",
    "olora",
    "agem",
    "agem (reference_every=8)",
    "agem (reference_batch=2)",
    "ssr",
    "ssr (samples=1)",
    "magmax (merge_final)",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m, tiny, a local directory or a hub id")
    p.add_argument("--scenario", default="legal_then_medical", help="a two-stage (or longer) scenario")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=16, help="timed batches of the second stage, per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed batches first (every variant runs them)")
    p.add_argument("--stage-steps", type=int, default=75, help="steps of the stage the per-stage cost is spread over")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--only",
        metavar="NAMES",
        help="comma-separated variants to time (their naive baselines come along), e.g. 'agem,ssr'",
    )
    p.add_argument("--json", metavar="OUT", help="write the results as JSON to this file")
    args = p.parse_args(argv)
    if min(args.batch_size, args.batches, args.stage_steps) < 1 or args.warmup < 0:
        p.error("--batch-size, --batches and --stage-steps must be >= 1, --warmup >= 0")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    from continual_ft.config import DataConfig, LoraConfig, MergeConfig, TrainConfig
    from continual_ft.data.scenario import load_scenario
    from continual_ft.model import adapters
    from continual_ft.model.loading import load_model
    from continual_ft.strategies import AGEM, EWC, SSR, LwF, OLoRA, StageInfo
    from continual_ft.strategies.agem import AGEMConfig
    from continual_ft.strategies.lwf import LwFConfig
    from continual_ft.strategies.replay import draw
    from continual_ft.strategies.ssr import SSRConfig
    from continual_ft.train.batching import Encoder, collate, length_grouped_batches, to_device
    from continual_ft.train.loop import autocast_for, backward_step, resolve_precision
    from continual_ft.train.protocol import Batches, after_backward, stage_info

    wanted = ALL if args.only is None else {n.strip() for n in args.only.split(",")}
    if wanted - ALL:
        raise SystemExit(f"error: --only names unknown variants {sorted(wanted - ALL)}; known: {', '.join(ALL)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve_precision("auto", device)
    autocast = autocast_for(precision, device)
    train, data = TrainConfig(), DataConfig()
    scenario = load_scenario(args.scenario, seed=args.seed)
    if len(scenario.stages) < 2:
        raise SystemExit(f"error: scenario {scenario.name} has one stage; the overhead is that of a second stage")
    first, second = ([ex for t in s.tasks for ex in scenario.tasks[t].train] for s in scenario.stages[:2])

    def fresh_model(mode: str):
        torch.manual_seed(args.seed)
        model, tokenizer = load_model(args.model, seed=args.seed)
        model = model.to(device=device, dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
        return adapters.start_stage(model, mode, 0, LoraConfig()), tokenizer

    continued, tokenizer = fresh_model("continue")
    stacked, _ = fresh_model("new")
    merged, _ = fresh_model("merge_final") if "magmax (merge_final)" in wanted else (None, None)
    encoder = Encoder(tokenizer, train.max_length, data.chat_template, data.system_prompt)

    batches = Batches(encoder, args.batch_size, device, autocast)  # what the runner gives strategies

    def shuffled(examples, seed: int):  # training order, as the trainer draws it
        encoded = [encoder.encode(e) for e in examples]
        for items in length_grouped_batches(encoded, args.batch_size, random.Random(seed)):
            yield to_device(collate(items, tokenizer.pad_token_id), device)

    def stage(i: int, examples) -> StageInfo:
        return stage_info(i, scenario.stages[i].tasks, examples, batches)

    second_stage = stage(1, second)

    def optimizer(model):
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=train.lr)

    def step(model, opt, batch, strategies, step_no: int = 1) -> float:
        start = time.perf_counter()
        backward_step(model, [batch], strategies, autocast)
        after_backward(strategies, model, second_stage, step_no)
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], train.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    # Stage 1 as a run leaves it: a trained adapter, then each strategy's end-of-stage work.
    warm = list(shuffled(first, args.seed))[:4]
    for model in (m for m in (continued, stacked, merged) if m is not None):
        opt = optimizer(model)
        for batch in warm:
            step(model, opt, batch, [])
    ewc, agem, ssr, ssr1 = EWC(), AGEM(), SSR(), SSR(SSRConfig(samples=1))
    agem8, agem2 = AGEM(AGEMConfig(reference_every=8)), AGEM(AGEMConfig(reference_batch=2))
    lwf, lwf_all, olora = LwF(), LwF(LwFConfig(fraction=1.0)), OLoRA()
    once = {}
    # Each variant's once-per-stage work, run only for the variants timed (SSR's writing takes minutes).
    setup = {
        "ewc": lambda: ewc.after_stage(continued, stage(0, first)),  # the Fisher pass
        "ssr": lambda: ssr.after_stage(continued, stage(0, first)),  # write and answer examples
        "ssr (samples=1)": lambda: ssr1.after_stage(continued, stage(0, first)),
        "lwf": lambda: lwf.before_stage(continued, stage(1, second)),  # the teacher snapshot
        "lwf (fraction=1)": lambda: lwf_all.before_stage(continued, stage(1, second)),
    }
    for memory in (agem, agem8, agem2):  # fill the memory from the first stage (text only: no model pass)
        memory.after_stage(continued, stage(0, first))
    for name, fn in setup.items():
        if name in wanted:
            once[name] = timed(fn)
    stacked = adapters.start_stage(stacked, "new", 1, LoraConfig())
    if merged is not None:  # merge_final trains a fresh adapter from the base; only it is active
        merged = adapters.start_stage(merged, "merge_final", 1, LoraConfig())
    if "olora" in wanted:
        once["olora"] = timed(lambda: olora.before_stage(stacked, stage(1, second)))
    opt_continued, opt_stacked = optimizer(continued), optimizer(stacked)

    variants = {  # name: (model, optimizer, strategies, the naive variant it is compared with)
        "naive": (continued, opt_continued, [], "naive"),
        "ewc": (continued, opt_continued, [ewc], "naive"),
        "lwf": (continued, opt_continued, [lwf], "naive"),
        "lwf (fraction=1)": (continued, opt_continued, [lwf_all], "naive"),
        "naive (adapter=new)": (stacked, opt_stacked, [], "naive (adapter=new)"),
        "olora": (stacked, opt_stacked, [olora], "naive (adapter=new)"),
        "agem": (continued, opt_continued, [agem], "naive"),
        "agem (reference_every=8)": (continued, opt_continued, [agem8], "naive"),
        "agem (reference_batch=2)": (continued, opt_continued, [agem2], "naive"),
        "ssr": (continued, opt_continued, [ssr], "naive"),
        "ssr (samples=1)": (continued, opt_continued, [ssr1], "naive"),
        "magmax (merge_final)": (merged, optimizer(merged) if merged is not None else None, [], "naive"),
    }
    names = [n for n in variants if n in wanted or any(variants[w][3] == n for w in wanted)]
    # A-GEM's cost per step is a forward and backward over its reference batch: the memory's tokens
    # per draw against the step's own tokens say what it costs (memory of long texts, short stage: dear).
    reference_tokens = {
        n: statistics.mean(
            sum(len(encoder.encode(e)) for e in draw(s.memory.buffer, s.config.reference_batch, random.Random(i)))
            for i in range(32)
        )
        for n in names
        for s in variants[n][2]
        if isinstance(s, AGEM)
    }
    times: dict[str, list[float]] = {n: [] for n in names}
    tokens: list[int] = []
    data_batches = list(shuffled(second, args.seed + 1))
    needed = args.warmup + args.batches
    data_batches = (data_batches * (needed // len(data_batches) + 1))[:needed]
    for b, batch in enumerate(data_batches):
        order = names[b % len(names) :] + names[: b % len(names)]  # rotate: no variant always runs first
        for name in order:
            model, opt, strategies, _ = variants[name]
            seconds = step(model, opt, batch, strategies, b + 1)
            if b >= args.warmup:
                times[name].append(seconds)
        if b >= args.warmup:
            tokens.append(batch["n_tokens"])
        print(f"[bench] batch {b + 1}/{needed}", file=sys.stderr)

    if merged is not None:  # MagMax's once-per-stage work: combining the stage adapters (here two) for evaluation
        once["magmax (merge_final)"] = timed(
            lambda: adapters.combine(merged, ["stage1", "stage2"], MergeConfig(method="magmax"), seed=args.seed)
        )

    # A-GEM at reference_every=N pays its reference pass on one step in N: a median would drop it, so its
    # step time is the mean over the timed steps (whole periods when N divides --batches and --warmup is 2:
    # the draws fall on steps 1, N+1, ...).
    periodic = {
        n for n, v in variants.items() if any(isinstance(s, AGEM) and s.config.reference_every > 1 for s in v[2])
    }
    rows = {}
    for name in names:
        base = variants[name][3]
        t = statistics.mean(times[name]) if name in periodic else statistics.median(times[name])
        t_base = statistics.median(times[base])
        stage_seconds = t * args.stage_steps + once.get(name, 0.0)
        rows[name] = {
            "baseline": base,
            "step_seconds_median": statistics.median(times[name]),
            "step_seconds_mean": statistics.mean(times[name]),
            "step_seconds": t,
            "s_per_1k_tokens": 1000 * sum(times[name]) / sum(tokens),
            "step_ratio": t / t_base,
            "once_per_stage_seconds": once.get(name, 0.0),
            "stage_overhead": stage_seconds / (t_base * args.stage_steps),
        }
        if name in reference_tokens:
            rows[name]["reference_tokens"] = reference_tokens[name]
    result = {
        "model": args.model,
        "scenario": scenario.name,
        "precision": precision,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "timed_batches": args.batches,
        "stage_steps": args.stage_steps,
        "mean_tokens_per_batch": statistics.mean(tokens),
        "ssr": {n: s.stats() for n in names for s in variants[n][2] if isinstance(s, SSR)} or None,
        "variants": rows,
    }
    print(
        f"{scenario.name} stage 2, {args.model}, {precision} on {device}, batch {args.batch_size} "
        f"(~{result['mean_tokens_per_batch']:.0f} real tokens), median of {args.batches} steps each; "
        f"once-per-stage cost spread over {args.stage_steps} steps"
    )
    print(f"{'variant':36s} {'s/step':>7s} {'s/1k tok':>8s} {'step vs naive':>13s} {'once (s)':>8s} {'stage':>7s}")
    for name, r in rows.items():
        print(
            f"{name:36s} {r['step_seconds']:7.2f} {r['s_per_1k_tokens']:8.2f} {r['step_ratio']:12.2f}x "
            f"{r['once_per_stage_seconds']:8.1f} {r['stage_overhead']:6.2f}x"
            + (f"  (reference batch ~{r['reference_tokens']:.0f} tokens)" if "reference_tokens" in r else "")
        )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
