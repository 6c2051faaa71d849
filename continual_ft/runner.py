"""``run(config) -> Results``: the whole continual run that the CLI is a thin shell over.

Everything the user can get wrong (config, strategy names, scenario and data files, model
name) is checked before the run directory is created, so bad input never leaves a
half-made run behind, and every file is written atomically.
"""

from __future__ import annotations

import platform
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from continual_ft import adapters, metrics
from continual_ft.batching import Encoder, collate, length_grouped_batches, mean_token_loss, to_device
from continual_ft.config import RunConfig, to_dict
from continual_ft.evaluation import evaluate_task
from continual_ft.models import load_model
from continual_ft.plots import plot_run
from continual_ft.results import format_matrix, format_metrics, write_csv, write_json, write_yaml
from continual_ft.scenario import load_scenario
from continual_ft.trainer import autocast_for, resolve_precision, train_stage

__all__ = ["Results", "run", "peak_memory_mb", "reset_peak_memory"]

METRICS = ("accuracy", "exact_match")


@dataclass
class Results:
    run_dir: Path
    data: dict

    @property
    def R(self) -> list[list[float]]:
        return self.data["R"][self.data["primary_metric"]]

    @property
    def metrics(self) -> dict:
        return self.data["metrics"][self.data["primary_metric"]]


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak, so a run's peak is its own when several runs share a process (``compare``)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: resets VmHWM, the peak resident set size, to the current size
    except OSError:
        pass  # elsewhere the peak stays the process's, as ru_maxrss reports it


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory since :func:`reset_peak_memory`: CUDA allocator peak on GPU, else peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def _unique_dir(parent: Path, name: str) -> Path:
    """A fresh run directory: never write into one that already holds results."""
    path, k = parent / name, 1
    while path.exists():
        k += 1
        path = parent / f"{name}-{k}"
    return path


def _quantization(config: RunConfig):
    if config.quantize == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        from continual_ft.errors import ContinualFTError

        raise ContinualFTError("quantize=nf4 needs bitsandbytes: pip install 'continual-ft[qlora]'") from None
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def run(config: RunConfig, progress: bool = True) -> Results:
    from continual_ft.errors import ContinualFTError
    from continual_ft.strategies import StageInfo, build
    from continual_ft.strategies import settings as strategy_settings

    t_start = time.perf_counter()
    strategies = build(config.strategy, config.strategy_args)
    for s in strategies:
        needs = getattr(s, "requires_adapter", None)  # e.g. O-LoRA needs a fresh adapter per stage
        if needs and config.adapter not in needs:
            raise ContinualFTError(f"strategy={s.name} needs adapter={' or '.join(needs)}, not {config.adapter}")
    if config.adapter not in adapters.ADAPTER_MODES:
        raise ContinualFTError(f"unknown adapter {config.adapter!r}; choose from {', '.join(adapters.ADAPTER_MODES)}")
    if config.quantize != "none" and config.model == "tiny":
        raise ContinualFTError(
            "quantize=nf4 loads a checkpoint in 4 bit; model=tiny is built in memory, use a directory"
        )
    if config.quantize != "none" and config.adapter == "merge":
        raise ContinualFTError("adapter=merge would requantize the 4-bit base after every stage; use merge_final")
    scenario = load_scenario(config.scenario, quick=config.quick, seed=config.seed, sizes=config.data.sizes())
    n_weights = len(config.merge.weights)
    if config.adapter == "merge_final" and n_weights and n_weights != len(scenario.stages):
        raise ContinualFTError(f"merge.weights has {n_weights} values; the scenario has {len(scenario.stages)} stages")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve_precision(config.precision, device)
    reset_peak_memory(device)
    torch.manual_seed(config.seed)
    model, tokenizer = load_model(
        config.model,
        trust_remote_code=config.trust_remote_code,
        seed=config.seed,
        quantization_config=_quantization(config),
    )
    if config.quantize == "none":
        # Frozen base weights in bf16 halve memory and skip autocast's per-step casts;
        # PEFT keeps the LoRA weights themselves in fp32.
        model = model.to(device=device, dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    autocast = autocast_for(precision, device)
    encoder = Encoder(tokenizer, config.train.max_length, config.data.chat_template, config.data.system_prompt)

    run_dir = _unique_dir(Path(config.output_dir), config.run_name())
    run_dir.mkdir(parents=True)
    resolved = to_dict(config)
    # Defaults included, so a finished run is not reused (compare) once a strategy's default changes.
    resolved["strategy_settings"] = strategy_settings(strategies)
    resolved["resolved"] = {"precision": precision, "device": str(device), "scenario_file": scenario.source_file}
    write_yaml(run_dir / "config.yaml", resolved)

    tasks = list(scenario.tasks)
    first = [next(i + 1 for i, st in enumerate(scenario.stages) if t in st.tasks) for t in tasks]
    data = {
        "scenario": scenario.name,
        "strategy": config.strategy,
        "adapter": config.adapter,
        "merge": to_dict(config)["merge"] if config.adapter == "merge_final" else None,
        "model": config.model,
        "precision": precision,
        "device": str(device),
        "seed": config.seed,
        "quick": config.quick,
        "tasks": tasks,
        "stages": [{"name": s.name, "tasks": s.tasks} for s in scenario.stages],
        "first_stage": first,
        "primary_metric": scenario.metric,
        "rows": [],
        "R": {m: [] for m in METRICS},
        "metrics": {},
        "stage_stats": [],
        "eval": [],
        "complete": False,
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
    }

    def evaluate_all(row_name: str) -> None:
        scores = {
            t: evaluate_task(
                model,
                encoder,
                scenario.tasks[t],
                batch_size=config.eval.batch_size,
                max_new_tokens=config.eval.max_new_tokens,
                autocast=autocast,
            )
            for t in tasks
        }
        data["rows"].append(row_name)
        for m in METRICS:
            data["R"][m].append([getattr(scores[t], m) for t in tasks])
        seconds = sum(s.seconds for s in scores.values())
        n = sum(s.n for s in scores.values())
        data["eval"].append(
            {
                "row": row_name,
                "seconds": seconds,
                "seconds_per_example": seconds / n,
                "tokens_per_s": sum(s.tokens_per_s * s.seconds for s in scores.values()) / seconds,
            }
        )
        _log(
            progress,
            f"[eval] {row_name}: "
            + ", ".join(f"{t} acc={100 * scores[t].accuracy:.1f} em={100 * scores[t].exact_match:.1f}" for t in tasks)
            + f" ({seconds:.0f}s)",
        )

    def save(complete: bool) -> None:
        data["complete"] = complete
        data["total_seconds"] = time.perf_counter() - t_start
        data["peak_memory_mb"] = peak_memory_mb(device)
        write_json(run_dir / "results.json", data)

    evaluate_all("before training")
    save(False)

    def batches(examples):
        encoded = [encoder.encode(e) for e in examples]
        for items in length_grouped_batches(encoded, config.train.batch_size, rng=None):
            yield to_device(collate(items, tokenizer.pad_token_id), device)

    def loss_fn(m, batch):
        with autocast():
            return mean_token_loss(m, batch)

    for i, stage_def in enumerate(scenario.stages):
        own = [ex for t in stage_def.tasks for ex in scenario.tasks[t].train]
        validation = [ex for t in stage_def.tasks for ex in scenario.tasks[t].validation]
        stage = StageInfo(
            index=i,
            tasks=list(stage_def.tasks),
            examples=own,
            batches=batches,
            loss_fn=loss_fn,
            final=i == len(scenario.stages) - 1,
        )
        hook_start = time.perf_counter()
        examples = own
        for s in strategies:
            examples = s.train_data(stage, examples)
        model = adapters.start_stage(model, config.adapter, i, config.lora)
        for s in strategies:
            s.before_stage(model, stage)
        hook_seconds = time.perf_counter() - hook_start
        _log(
            progress,
            f"[stage {i + 1}/{len(scenario.stages)}] {stage_def.name}: {len(examples)} examples "
            f"({len(own)} own), strategy={config.strategy}, adapter={config.adapter}, {precision}",
        )
        st = train_stage(
            model,
            encoder,
            examples,
            validation,
            config.train,
            strategies,
            stage,
            seed=config.seed + i,
            autocast=autocast,
            progress=progress,
            desc=f"stage {i + 1}",
        )
        hook_start = time.perf_counter()
        for s in strategies:
            s.after_stage(model, stage)  # EWC's Fisher pass runs here: its cost belongs to the stage
        hook_seconds += time.perf_counter() - hook_start
        trainable, total = adapters.trainable_parameters(model)
        out = adapters.finish_stage(model, config.adapter, i, run_dir, config.merge, seed=config.seed)
        model = out.model
        state = {s.name: s.state_dict() for s in strategies}
        if any(state.values()):
            # Beside the adapters, not inside: EWC's Fisher and anchors are not part of what a model serves.
            (run_dir / "strategy_state").mkdir(exist_ok=True)
            torch.save(state, run_dir / "strategy_state" / f"stage{i + 1}.pt")
        stats = {
            "stage": stage_def.name,
            "examples": len(examples),
            "steps": st.steps,
            "tokens": st.tokens,
            "train_seconds": st.seconds,
            "strategy_seconds": hook_seconds,  # train_data, adapter set-up, before/after_stage hooks
            "tokens_per_s": st.tokens_per_s,
            "train_loss": st.train_loss,
            "val_losses": st.val_losses,
            "best_val_loss": st.best_val_loss,
            "stopped_early": st.stopped_early,
            "trainable_params": trainable,
            "total_params": total,
            "adapter_dir": str(out.adapter_dir.relative_to(run_dir)),
            "adapter_bytes": adapters.dir_bytes(out.adapter_dir),
            # What the evaluated model adds to its base: all stacked adapters, the combined
            # one (merge_final), or nothing once merged into the weights (merge).
            "serving_adapter_bytes": sum(adapters.dir_bytes(d) for d in out.serving_dirs),
        }
        if out.merged_dir is not None:
            stats["merged_adapter_dir"] = str(out.merged_dir.relative_to(run_dir))
            stats["merged_adapter_bytes"] = adapters.dir_bytes(out.merged_dir)
        _log(
            progress,
            f"[stage {i + 1}] {st.steps} steps, {st.tokens} tokens in {st.seconds:.0f}s "
            f"({st.tokens_per_s:.0f} tok/s), train loss {st.train_loss:.3f}",
        )
        evaluate_all(f"after {stage_def.name}")
        latency = data["eval"][-1]
        stats["eval_seconds"] = latency["seconds"]
        stats["eval_seconds_per_example"] = latency["seconds_per_example"]
        stats["eval_tokens_per_s"] = latency["tokens_per_s"]
        data["stage_stats"].append(stats)
        save(False)

    merged = adapters.finish_run(model, config.adapter, run_dir, tokenizer)
    if merged is not None:
        data["merged_model_dir"] = str(merged.relative_to(run_dir))
    for m in METRICS:
        data["metrics"][m] = metrics.summary(data["R"][m], first)
    save(True)
    write_csv(run_dir / "results.csv", data)
    plot_run(run_dir)
    return Results(run_dir, data)


def report(results: Results) -> str:
    """The end-of-run text: the R table and the metrics, primary metric first."""
    d = results.data
    out = []
    for m in [d["primary_metric"]] + [m for m in d["R"] if m != d["primary_metric"]]:
        out += [format_matrix(d, m), format_metrics(d, m), ""]
    out.append(f"run time {d['total_seconds']:.0f}s, peak memory {d['peak_memory_mb']:.0f} MB → {results.run_dir}")
    return "\n".join(out)
