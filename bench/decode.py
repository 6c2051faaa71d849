"""Greedy decoding for generative evaluation: ours (:func:`continual_ft.eval.generative.greedy_answers`) against
HF ``model.generate`` on left-padded batches of the same prompts, same batches, same ``max_new_tokens``.

    python bench/decode.py --scenario legal_then_medical_gen --repeat 3 --json runs/bench_decode.json

Prompts: every test example of the scenario's generative tasks (seed 0), formatted as evaluation formats them.
Both decoders take length-sorted batches of ``--batch-size`` prompts under the run's precision (bf16 weights
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="legal_then_medical_gen")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--json")
    args = parser.parse_args()

    scenario = load_scenario(args.scenario)
    device = torch.device("cpu")
    precision = choose_precision(args.precision, device).precision
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model, tok = load_model("smollm2-135m", dtype=dtype)
    model.eval()
    encoder = Encoder(tok, 256)
    tasks = [t for t in scenario.tasks.values() if t.generative]
    autocast = (lambda: torch.autocast("cpu", torch.bfloat16)) if dtype == torch.bfloat16 else torch.no_grad
    report = {"cpu": _cpu(), "threads": torch.get_num_threads(), "precision": precision, "tasks": {}}
    for task in tasks:
        prompts = [encoder.encode(ex, answer="", eos=False).prompt_ids for ex in task.test]
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        budget = answer_budget(encoder, task)
        kw = {"max_new_tokens": budget, "batch_size": args.batch_size, "autocast": autocast}
        times = {"ours": [], "hf": []}
        outputs = {}
        for rep in range(args.repeat + 1):  # the first pass warms up, untimed
            for name in ("ours", "hf"):
                start = time.perf_counter()
                if name == "ours":
                    outputs[name], _ = greedy_answers(model, tok, prompts, order, **kw)
                else:
                    outputs[name] = hf_answers(model, tok, prompts, order, **kw)
                if rep:
                    times[name].append(time.perf_counter() - start)
        tokens = sum(len(x) for x in outputs["ours"])
        same = sum(a == b for a, b in zip(outputs["ours"], outputs["hf"])) / len(prompts)
        med = {k: statistics.median(v) for k, v in times.items()}
        report["tasks"][task.name] = {
            "prompts": len(prompts),
            "max_new_tokens": budget,
            "answer_tokens": tokens,
            "seconds": {k: {"median": med[k], "all": v} for k, v in times.items()},
            "tokens_per_s": {k: tokens / med[k] for k in med},
            "speedup": med["hf"] / med["ours"],
            "same_answers": same,
        }
        print(
            f"{task.name}: {len(prompts)} prompts, budget {budget} tokens, {tokens} answer tokens; "
            f"ours {med['ours']:.1f} s, HF generate {med['hf']:.1f} s (medians of {args.repeat}): "
            f"{med['hf'] / med['ours']:.2f}x; same answers {100 * same:.1f}%"
        )
    print(f"CPU: {report['cpu']}, {report['threads']} threads, {precision}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
