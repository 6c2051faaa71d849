"""``run(config) -> Results`` and ``resume(run_dir) -> Results``: a continual run, set up, stage by stage, finished.

    run = _setup(config)                # checks, model, data, the run record
    for stage in remaining stages:
        _train_and_record(run, stage)   # adapter, hooks + training (train.protocol), save, evaluate, record
    _finish(run)                        # merged model, metrics, CSV, heatmaps

Everything the user can get wrong is checked before the run directory is created, so bad input
never leaves a half-made run behind. After each stage everything needed to go on is on disk
(adapters, strategy state, the rows of R, the RNG states), and with ``train.checkpoint_every``
also inside a stage, so ``resume`` ends exactly as the uninterrupted run would have.
With several processes (``torchrun``, ``accelerate launch``) only the first writes files.
Each step and each stage boundary also go to ``log.jsonl`` and the trackers ``log=`` names
(:mod:`continual_ft.report.tracking`).
"""

from __future__ import annotations

import resource
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from continual_ft.config import RunConfig, make_config, to_dict
from continual_ft.data.scenario import Scenario, load_scenario
from continual_ft.errors import ContinualFTError
from continual_ft.eval.scoring import evaluate_task
from continual_ft.files import write_yaml
from continual_ft.model import adapters
from continual_ft.model.loading import load_model
from continual_ft.report.results import load_results
from continual_ft.report.tracking import Trackers, open_trackers, stage_values
from continual_ft.run.checkpoint import load_boundary, save_boundary
from continual_ft.run.checks import check_config, check_fsdp, check_lengths, check_scenario
from continual_ft.run.record import RunRecord
from continual_ft.state_codec import load_tree, save_tree
from continual_ft.train.batching import Encoder
from continual_ft.train.checkpoint import StepCheckpoints, set_rng_state
from continual_ft.train.distributed import Dist, get_dist
from continual_ft.train.loop import NonFiniteLoss, autocast_for, train_stage
from continual_ft.train.precision import PrecisionChoice, choose_precision
from continual_ft.train.protocol import Batches, StageInfo, StageRun, run_stage, stage_info, training_loop

__all__ = ["Results", "run", "resume", "report", "peak_memory_mb", "reset_peak_memory"]


@dataclass
class Results:
    run_dir: Path
    data: dict  # what results.json holds
    model: torch.nn.Module | None = field(default=None, repr=False)  # the trained model, in memory

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


def _quantization(config: RunConfig, fsdp: bool = False):
    """QLoRA's 4-bit base weights. Under FSDP their packed bytes are stored as the compute dtype (PEFT's
    FSDP + QLoRA guide): FSDP2 shards floating-point tensors only, and accelerate leaves uint8-stored
    4-bit weights out of the shards, whole on every process. The bytes, and so the weights, are the same."""
    if config.quantize == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise ContinualFTError("quantize=nf4 needs bitsandbytes: pip install 'continual-ft[qlora]'") from None
    storage = {"bnb_4bit_quant_storage": torch.bfloat16} if fsdp else {}
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16, **storage
    )


@dataclass
class _Run:
    """Everything a stage needs: set up once by :func:`_setup`."""

    config: RunConfig
    scenario: Scenario
    strategies: list
    model: torch.nn.Module
    tokenizer: object
    encoder: Encoder
    device: torch.device
    precision: str
    dist: Dist
    precision_choice: PrecisionChoice | None = None  # why ``precision``: printed at the start, kept in results.json
    record: RunRecord | None = None
    progress: bool = True
    resume_stage: int | None = None  # the stage a resumed run goes on in
    tracker: Trackers = field(default_factory=Trackers)  # log.jsonl and log=[...]; empty on other processes

    @property
    def run_dir(self) -> Path:
        return self.record.run_dir

    def log(self, msg: str) -> None:
        if self.progress and self.dist.is_main:
            print(msg, file=sys.stderr, flush=True)

    def autocast(self):
        return autocast_for(self.precision, self.device)()

    def save(self, complete: bool = False) -> None:
        if self.dist.is_main:
            self.record.save(peak_memory_mb(self.device), complete)


def _setup(config: RunConfig, progress: bool, kept_precision: str | None = None) -> _Run:
    """Checks, then the scenario, the model in its training precision and the tokenizer.

    ``kept_precision``: a resumed run's precision, kept whatever ``auto`` would choose here now."""
    strategies = check_config(config)
    scenario = load_scenario(config.scenario, quick=config.quick, seed=config.seed, sizes=config.data.sizes())
    check_scenario(config, scenario)
    dist = get_dist()
    if dist.is_fsdp:
        check_fsdp(config, strategies, dist.fsdp_version)
    device = dist.device
    if kept_precision:
        choice = PrecisionChoice(kept_precision, "as the run it resumes")
    else:
        choice = choose_precision(config.precision, device, dist)
    precision = choice.precision
    reset_peak_memory(device)
    torch.manual_seed(config.seed)
    # Frozen base weights in bf16 halve memory and skip autocast's per-step casts; loaded straight
    # in bf16, the fp32 copy never exists. PEFT keeps the LoRA weights themselves in fp32.
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model, tokenizer = load_model(
        config.model,
        dtype=dtype if config.quantize == "none" else torch.float32,
        trust_remote_code=config.trust_remote_code,
        seed=config.seed,
        quantization_config=_quantization(config, fsdp=dist.is_fsdp),
        device=device,  # a 4-bit model is placed as it loads (each process's own device), never moved after
    )
    if config.quantize == "none":
        # FSDP: the whole model stays on the CPU; _shard moves each process's share to its device.
        model = model.to(device=torch.device("cpu") if dist.is_fsdp else device, dtype=dtype)
    encoder = Encoder(tokenizer, config.train.max_length, config.data.chat_template, config.data.system_prompt)
    fits = check_lengths(encoder, scenario)
    run = _Run(
        config, scenario, strategies, model, tokenizer, encoder, device, precision, dist, choice, progress=progress
    )
    run.log(choice.line)
    for name, fit in fits.items():
        if fit.cut:
            run.log(
                f"task '{name}': {fit.cut} of {fit.examples} training prompts cut from the left to fit "
                f"train.max_length={encoder.max_length}"
                + (f", {fit.too_long} answers fill it alone" if fit.too_long else "")
            )
    return run


def _shard(run: _Run) -> None:
    """FSDP: attach the adapter every stage trains (``adapter=continue``, the only mode FSDP runs) and
    shard the model, before anything runs it, so that no process holds it whole on its device."""
    if run.dist.is_fsdp:
        run.model = run.dist.shard_model(adapters.start_stage(run.model, run.config.adapter, 0, run.config.lora))


def _evaluate(run: _Run, row: str) -> dict:
    """Score every task, add the row to R; returns the row's timing entry."""
    scores = {
        name: evaluate_task(
            run.model,
            run.encoder,
            task,
            batch_size=run.config.eval.generate_batch_size if task.generative else run.config.eval.batch_size,
            max_new_tokens=run.config.eval.max_new_tokens,
            autocast=run.autocast,
            dist=run.dist,
        )
        for name, task in run.scenario.tasks.items()
    }
    entry = run.record.add_row(row, scores)
    run.log(f"[eval] {row}: " + ", ".join(_score_line(t, s) for t, s in scores.items()) + f" ({entry['seconds']:.0f}s)")
    return entry


#: How the eval line names a metric: ``legal acc=17.3 em=2.0``, ``qa rouge_l=41.2 em=12.0 chrf=50.3``.
_SHORT = {"accuracy": "acc", "exact_match": "em"}


def _score_line(task: str, score) -> str:
    """One task's scores on the ``[eval]`` line, in percent."""
    if score.accuracy is not None:
        return f"{task} acc={100 * score.accuracy:.1f} em={100 * score.exact_match:.1f}"
    return task + " " + " ".join(f"{_SHORT.get(m, m)}={100 * v:.1f}" for m, v in score.scores.items())


def _save_boundary(run: _Run) -> None:
    """After the rows of R: the RNG states, then results.json, the file that says the stage is done."""
    if run.dist.is_main:
        save_boundary(run.run_dir, run.record.stages_done)
    run.save()
    run.tracker.log_stage(run.record.stages_done, stage_values(run.record.data))


def _open_tracking(run: _Run) -> Trackers:
    """``log.jsonl`` and the trackers ``log=`` names, on the first process only, told the run's config."""
    if not run.dist.is_main:
        return Trackers()
    trackers = open_trackers(run.config.log, run.run_dir, run.run_dir.name)
    trackers.log_config(yaml.safe_load((run.run_dir / "config.yaml").read_text()))
    return trackers


def _as_is(x):
    return x


def _train_and_record(run: _Run, i: int) -> None:
    """Stage ``i``: its adapter, the strategy hooks around training, then save, evaluate and record it."""
    name = run.scenario.stages[i].name
    info, validation = _stage_data(run, i)
    setup = time.perf_counter()
    run.model = adapters.start_stage(run.model, run.config.adapter, i, run.config.lora)
    setup = time.perf_counter() - setup
    checkpoints = StepCheckpoints(
        run.run_dir,
        i,
        run.config.train.checkpoint_every,
        run.config.train.checkpoint_minutes,
        write=run.dist.is_main,
        resumable=i == run.resume_stage,  # only the stage a resume goes on in can have a checkpoint to load
    )
    _log_start(run, i)
    done = _train(run, i, info, validation, checkpoints)
    params = adapters.trainable_parameters(run.model)  # before finish_stage, which may merge the adapter away
    out = _save_stage(run, i)
    _log_trained(run, i, done, len(info.examples))
    latency = _evaluate(run, f"after {name}")
    stats = {
        "stage": name,
        **_training_stats(done, setup),
        "strategy_stats": {s.name: s.stats() for s in run.strategies if s.stats()},
        **_adapter_stats(run, out, params),
        **_evaluation_stats(latency),
        **_merged_stats(run, out),
    }
    run.record.add_stage(stats)
    _save_boundary(run)
    checkpoints.clear()


def _stage_data(run: _Run, i: int) -> tuple[StageInfo, list]:
    """What the strategies see of stage ``i`` (its own examples, batching, ...) and its validation examples."""
    stage_def, tasks, config = run.scenario.stages[i], run.scenario.tasks, run.config
    own = [ex for t in stage_def.tasks for ex in tasks[t].train]
    validation = [ex for t in stage_def.tasks for ex in tasks[t].validation]
    # The global batch size, each process taking its share of the batches: as one process would batch them.
    # Under FSDP every process runs every batch instead, with nothing to sum: each forward all-gathers, and
    # a backward averages the processes' gradients, which is the batch's own when they all ran it (EWC's Fisher).
    batch_size = config.train.batch_size * run.dist.world
    every = run.dist.is_fsdp
    batches = Batches(run.encoder, batch_size, run.device, run.autocast, shard=_as_is if every else run.dist.shard)
    last = i == len(run.scenario.stages) - 1
    generative = [t for t in stage_def.tasks if run.scenario.tasks[t].generative]
    info = stage_info(
        i,
        stage_def.tasks,
        own,
        batches,
        final=last,
        sum_across=_as_is if every else run.dist.sum,
        generative=generative,
    )
    return info, validation


def _log_start(run: _Run, i: int) -> None:
    config, dist = run.config, run.dist
    run.log(
        f"[stage {i + 1}/{len(run.scenario.stages)}] {run.scenario.stages[i].name}: strategy={config.strategy}, "
        f"adapter={config.adapter}, {run.precision}"
        + (f", {dist.world} processes{' (FSDP)' if dist.is_fsdp else ''}" if dist.world > 1 else "")
    )


def _step_logger(run: _Run, i: int) -> Callable[[int, dict], None]:
    """Each optimizer step's values to the trackers, on a step axis that runs on across stages."""
    first_step = sum(s["steps"] for s in run.record.data["stage_stats"])

    def on_step(step: int, values: dict) -> None:
        run.tracker.log_step(first_step + step, {"train/stage": i + 1, **{f"train/{k}": v for k, v in values.items()}})

    return on_step


def _train(run: _Run, i: int, info: StageInfo, validation: list, checkpoints: StepCheckpoints) -> StageRun:
    """The strategy hooks around the training loop (:func:`continual_ft.train.protocol.run_stage`)."""
    config, on_step = run.config, _step_logger(run, i)
    # A method that is a loop of its own (integrations/avalanche_loops.py: Avalanche's) trains the stage instead.
    loop = training_loop(run.strategies, train_stage)

    def train(examples):
        return loop(
            run.model,
            run.encoder,
            examples,
            validation,
            config.train,
            run.strategies,
            info,
            seed=config.seed + i,
            autocast=run.autocast,
            progress=run.progress and run.dist.is_main,
            desc=f"stage {i + 1} ({run.scenario.stages[i].name})",
            checkpoints=checkpoints,
            dist=run.dist,
            on_step=on_step,
        )

    try:
        return run_stage(run.model, info, run.strategies, train)
    except NonFiniteLoss as e:
        raise ContinualFTError(
            f"{e}; results so far are intact: lower train.lr and go on from the last checkpoint with "
            f"`python cli.py resume {run.run_dir} --set train.lr=...`"
        ) from None


def _save_stage(run: _Run, i: int) -> adapters.StageOutput:
    """The stage's adapter (merged, combined, as ``adapter=`` says) and the strategies' state, on disk."""
    config = run.config
    out = adapters.finish_stage(
        run.model,
        config.adapter,
        i,
        run.run_dir,
        config.merge,
        seed=config.seed,
        save=run.dist.is_main,
        gather=run.dist.full_tensors if run.dist.is_fsdp else None,
    )
    run.model = out.model
    state = {s.name: s.state_dict() for s in run.strategies}
    if any(state.values()) and run.dist.is_main:
        # Beside the adapters, not inside: EWC's Fisher and anchors are not part of what a model serves.
        save_tree(run.run_dir / "strategy_state" / f"stage{i + 1}", state)
    return out


def _log_trained(run: _Run, i: int, done: StageRun, own: int) -> None:
    st = done.result
    run.log(
        f"[stage {i + 1}] {done.examples} examples ({own} own), {st.steps} steps, {st.tokens} tokens in "
        f"{st.seconds:.0f}s ({st.tokens_per_s:.0f} tok/s), train loss {st.train_loss:.3f}"
        + (f", resumed at step {st.resumed_at_step}" if st.resumed_at_step else "")
    )


def _training_stats(done: StageRun, setup_seconds: float) -> dict:
    """results.json's training entries of a stage, in their order there."""
    st = done.result
    return {
        "examples": done.examples,
        "steps": st.steps,
        "tokens": st.tokens,
        "train_seconds": st.seconds,
        "strategy_seconds": done.hook_seconds + setup_seconds,  # train_data, adapter set-up, before/after_stage hooks
        "checkpoint_seconds": st.checkpoint_seconds,
        "resumed_at_step": st.resumed_at_step,
        "tokens_per_s": st.tokens_per_s,
        "train_loss": st.train_loss,
        "val_losses": st.val_losses,
        "best_val_loss": st.best_val_loss,
        "stopped_early": st.stopped_early,
        "penalty": st.penalty,
    }


def _adapter_stats(run: _Run, out: adapters.StageOutput, params: tuple[int, int]) -> dict:
    """The parameters trained and the adapter files' sizes."""
    trainable, total = params
    return {
        "trainable_params": trainable,
        "total_params": total,
        "adapter_dir": str(out.adapter_dir.relative_to(run.run_dir)),
        "adapter_bytes": adapters.dir_bytes(out.adapter_dir),
        # What the evaluated model adds to its base: all stacked adapters, the combined
        # one (merge_final), or nothing once merged into the weights (merge).
        "serving_adapter_bytes": sum(adapters.dir_bytes(d) for d in out.serving_dirs),
    }


def _evaluation_stats(latency: dict) -> dict:
    return {
        "eval_seconds": latency["seconds"],
        "eval_seconds_per_example": latency["seconds_per_example"],
        "eval_tokens_per_s": latency["tokens_per_s"],
    }


def _merged_stats(run: _Run, out: adapters.StageOutput) -> dict:
    """The merged adapter's folder and size, where ``adapter=`` merges one."""
    if out.merged_dir is None:
        return {}
    return {
        "merged_adapter_dir": str(out.merged_dir.relative_to(run.run_dir)),
        "merged_adapter_bytes": adapters.dir_bytes(out.merged_dir),
    }


def _finish(run: _Run) -> Results:
    if run.dist.is_main:
        merged = adapters.finish_run(run.model, run.config.adapter, run.run_dir, run.tokenizer)
        if merged is not None:
            run.record.data["merged_model_dir"] = str(merged.relative_to(run.run_dir))
        run.record.finish(peak_memory_mb(run.device))
        run.tracker.log_images({p.stem: p for p in sorted(run.run_dir.glob("*.png"))})  # the heatmaps
        for name in ("results.json", "results.csv", "config.yaml"):
            run.tracker.log_file(run.run_dir / name)
        shutil.rmtree(run.run_dir / "resume", ignore_errors=True)  # a finished run needs no resume state
    run.dist.barrier()
    return Results(run.run_dir, run.record.data, run.model)


def _run_stages(run: _Run, on_stage: Callable[[int, RunRecord], None] | None = None) -> Results:
    for i in range(run.record.stages_done, len(run.scenario.stages)):
        _train_and_record(run, i)
        if on_stage is not None:  # after results.json is saved: an exception here leaves the stages done readable
            on_stage(i, run.record)
    return _finish(run)


def run(config: RunConfig, progress: bool = True, on_stage: Callable[[int, RunRecord], None] | None = None) -> Results:
    """Train and evaluate ``config``'s scenario stage by stage in a new run directory.

    ``on_stage(i, record)`` is called after stage ``i`` (0-based) is recorded and saved; an exception
    it raises stops the run there, ``results.json`` left with ``complete: false`` (``tune`` prunes so).
    """
    run = _setup(config, progress)
    # Every process must agree on the directory: the first picks it.
    run_dir = run.dist.broadcast(str(_unique_dir(Path(config.output_dir), config.run_name())))
    run.record = RunRecord.start(
        Path(run_dir),
        config=config,
        scenario=run.scenario,
        precision=run.precision,
        device=run.device,
        world=run.dist.world,
        precision_reason=run.precision_choice.reason,
        precision_probe=run.precision_choice.probe,
    )
    if run.dist.is_main:
        run.run_dir.mkdir(parents=True)
        resolved = to_dict(config)
        # Defaults included, so a finished run is not reused (compare) once a strategy's default changes.
        from continual_ft.strategies import settings

        resolved["strategy_settings"] = settings(run.strategies)
        resolved["resolved"] = {
            "precision": run.precision,
            "device": str(run.device),
            "scenario_file": run.scenario.source_file,
        }
        write_yaml(run.run_dir / "config.yaml", resolved)
    run.tracker = _open_tracking(run)
    _shard(run)  # its adapter's B is 0: the "before training" row is the base model's
    with run.tracker:  # closed at the end, marked failed if an exception ends the run
        _evaluate(run, "before training")
        _save_boundary(run)
        return _run_stages(run, on_stage)


#: What ``resume --set`` may change: training settings that do not change what the run is.
RESUME_SETTABLE = ("train.lr", "train.max_grad_norm", "train.checkpoint_every", "train.checkpoint_minutes")


def load_config(run_dir: Path, changes: list[str] = ()) -> RunConfig:
    """The configuration a run was made with (its ``config.yaml``), with ``changes`` from ``RESUME_SETTABLE``."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ContinualFTError(f"{run_dir}: no config.yaml; not a continual-ft run directory")
    try:
        saved = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ContinualFTError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(saved, dict):
        raise ContinualFTError(f"{path}: not a continual-ft config")
    saved = {k: v for k, v in saved.items() if k not in ("strategy_settings", "resolved")}
    for item in changes:
        key, _, value = item.partition("=")
        if key not in RESUME_SETTABLE or not value:
            raise ContinualFTError(f"resume --set takes {', '.join(k + '=...' for k in RESUME_SETTABLE)}; got {item!r}")
        section, name = key.split(".")
        saved.setdefault(section, {})[name] = yaml.safe_load(value)
    return make_config(saved)


def resume(run_dir: Path, progress: bool = True, changes: list[str] = ()) -> Results:
    """Go on with the interrupted run in ``run_dir``, in the same directory, from its last checkpoint.

    ``changes`` (``train.lr=1e-4``, ...) apply from here on and are recorded; without them the run
    ends exactly as the uninterrupted one would have.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or not (run_dir / "results.json").is_file():
        raise ContinualFTError(f"{run_dir}: not a run directory (no results.json)")
    config = load_config(run_dir, changes)
    previous = load_results(run_dir)
    if previous.get("complete"):
        return Results(run_dir, previous)
    run = _setup(config, progress, previous.get("precision"))
    done = len(previous.get("stage_stats", []))
    boundary = load_boundary(run_dir, done)
    if boundary is None:
        raise ContinualFTError(f"{run_dir}: no checkpoint after stage {done} (resume/stage{done}); cannot resume")
    position = StepCheckpoints.position(run_dir)
    where = f"stage {done + 1}" + (f", step {position[1]}" if position and position[0] == done else "")
    record = RunRecord.load(run_dir, where)
    if changes:
        record.data.setdefault("resume_changes", []).append({"part": len(record.data["parts"]), "set": list(changes)})
    run.record, run.resume_stage = record, done
    run.model = adapters.restore(run.model, config.adapter, done, run_dir, config.lora, config.merge, config.seed)
    _shard(run)
    if done:
        path = run_dir / "strategy_state" / f"stage{done}"
        state = load_tree(path) if path.is_dir() else {}
        for s in run.strategies:
            if s.name in state:
                s.load_state_dict(state[s.name])
    set_rng_state(boundary["rng"])
    run.log(f"[resume] {run_dir}: {done} of {len(run.scenario.stages)} stages done, going on at {where}")
    run.tracker = _open_tracking(run)
    with run.tracker:
        return _run_stages(run)


def report(results: Results) -> str:
    """The end-of-run text: the R table and the metrics, primary metric first."""
    return RunRecord(results.run_dir, results.data).report()
