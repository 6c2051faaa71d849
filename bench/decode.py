"""Greedy decoding for generative evaluation: ours (:func:`continual_ft.eval.generative.greedy_answers`) against
HF ``model.generate`` on left-padded batches of the same prompts, same batches, same ``max_new_tokens``.

    python bench/decode.py --scenario legal_then_medical_gen --repeat 3 --json runs/bench_decode.json

Prompts: every test example of the scenario's generative tasks (seed 0), formatted as evaluation formats them.
Both decoders take length-sorted batches of each of ``--batch-sizes`` prompts under the run's precision (bf16 weights
where ``precision=auto`` picks bf16 on this CPU). HF steps every row until the last one of its batch ends;
ours lets a finished row leave the batch and its KV cache, and prefills the tokens every prompt of a batch
starts with once. Reported: the median over ``--repeat`` timed passes (after one warm-up pass) of the seconds
each takes, the answer tokens per second, and the share of answers that are the same text in both (bf16
arithmetic on different batch shapes may flip a near-tie; in fp32 they agree token for token, as
``tests/test_generative.py`` checks against one ``generate`` call per example).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from continual_ft.data.scenario import load_scenario
from continual_ft.eval.generative import answer_budget, greedy_answers
from continual_ft.model.loading import load_model
from continual_ft.train.batching import Encoder
from continual_ft.train.generation import end_ids
from continual_ft.train.precision import choose_precision


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@torch.inference_mode()
def hf_answers(model, tok, prompts, order, *, max_new_tokens, batch_size, autocast):
    """``model.generate(do_sample=False)`` on left-padded, length-sorted batches; new tokens without the end."""
    ends, out = end_ids(model, tok), [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.tensor([[tok.pad_token_id] * (width - len(prompts[i])) + list(prompts[i]) for i in idx])
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in idx])
        with autocast():
            gen = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=tok.pad_token_id,
                eos_token_id=sorted(ends),
            )
        for row, i in enumerate(idx):
            new = gen[row, width:].tolist()
            cut = next((k for k, t in enumerate(new) if t in ends), len(new))
            out[i] = new[:cut]
    return out


def _time(fn, repeat: int) -> tuple[list[float], list]:
    """Seconds of ``repeat`` timed calls after one untimed warm-up, and the last call's output."""
    times, out = [], None
    for rep in range(repeat + 1):
        start = time.perf_counter()
        out = fn()
        if rep:
            times.append(time.perf_counter() - start)
    return times, out


def bench_task(model, tok, encoder, task, batch_sizes, repeat, autocast) -> dict:
    """Each decoder at each batch size on the task's test prompts."""
    prompts = [encoder.encode(ex, answer="", eos=False).prompt_ids for ex in task.test]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    budget = answer_budget(encoder, task)
    runs, outputs = {}, {}
    for size in batch_sizes:
        kw = {"max_new_tokens": budget, "batch_size": size, "autocast": autocast}
        for name, fn in (
            ("ours", lambda kw=kw: greedy_answers(model, tok, prompts, order, **kw)[0]),
            ("hf", lambda kw=kw: hf_answers(model, tok, prompts, order, **kw)),
        ):
            times, outputs[name, size] = _time(fn, repeat)
            runs[f"{name}@{size}"] = {"median": statistics.median(times), "all": times}
    reference = outputs["hf", batch_sizes[0]]
    tokens = sum(len(x) for x in reference)
    for (name, size), out in outputs.items():
        runs[f"{name}@{size}"][f"same_answers_as_hf@{batch_sizes[0]}"] = sum(
            a == b for a, b in zip(out, reference)
        ) / len(prompts)
        runs[f"{name}@{size}"]["answer_tokens_per_s"] = sum(len(x) for x in out) / runs[f"{name}@{size}"]["median"]
    return {"prompts": len(prompts), "max_new_tokens": budget, "answer_tokens_hf": tokens, "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="legal_then_medical_gen")
    parser.add_argument("--tasks", help="comma-separated generative tasks of the scenario (default: all)")
    parser.add_argument("--batch-sizes", default="16,64", help="the first is HF's reference batch size")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--json")
    args = parser.parse_args()

    scenario = load_scenario(args.scenario)
    precision = choose_precision(args.precision, torch.device("cpu")).precision
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model, tok = load_model("smollm2-135m", dtype=dtype)
    model.eval()
    encoder = Encoder(tok, 256)
    wanted = args.tasks.split(",") if args.tasks else [n for n, t in scenario.tasks.items() if t.generative]
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    autocast = (lambda: torch.autocast("cpu", torch.bfloat16)) if dtype == torch.bfloat16 else torch.no_grad
    report = {"cpu": _cpu(), "threads": torch.get_num_threads(), "precision": precision, "tasks": {}}
    for name in wanted:
        result = report["tasks"][name] = bench_task(
            model, tok, encoder, scenario.tasks[name], sizes, args.repeat, autocast
        )
        hf = result["runs"][f"hf@{sizes[0]}"]["median"]
        cells = ", ".join(
            f"{k} {v['median']:.1f} s ({hf / v['median']:.2f}x, same {100 * v[f'same_answers_as_hf@{sizes[0]}']:.0f}%)"
            for k, v in result["runs"].items()
        )
        print(f"{name}: {result['prompts']} prompts, budget {result['max_new_tokens']} tokens: {cells}")
    print(f"CPU: {report['cpu']}, {report['threads']} threads, {precision}; medians of {args.repeat} after a warm-up")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
