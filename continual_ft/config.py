"""Typed run configuration: dataclasses with help text and checks, merged with OmegaConf.

``python cli.py run scenario=legal_then_medical train.lr=2e-4`` becomes
``RunConfig`` through :func:`make_config`; unknown keys and wrong types fail with one
line that lists what is valid (the nanoGPT configurator's rule: no silent typos).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from continual_ft.errors import ContinualFTError

__all__ = [
    "TrainConfig",
    "LoraConfig",
    "EvalConfig",
    "DataConfig",
    "MergeConfig",
    "RunConfig",
    "make_config",
    "parse_overrides",
    "config_keys",
    "check_choice",
    "CHOICES",
    "SCHEDULES",
    "ATTENTIONS",
    "MERGE_METHODS",
    "ADAPTER_MODES",
    "PRECISIONS",
    "QUANTIZE",
    "TRACKER_NAMES",
    "SHORTHANDS",
]

#: Bare command-line keys that stand for a dotted one.
SHORTHANDS = {"method": "merge.method"}


def _help(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING):
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ContinualFTError(message)


#: How a setting's error reads where it is not ``<key> must be one of ...`` (kept as users and the docs know them).
_UNKNOWN = {
    "adapter": "unknown adapter {value!r}; choose from {choices}",
    "log": "unknown tracker log={value}; choose from {choices}",
}


def check_choice(key: str, value: str) -> None:
    """One line unless ``value`` is one of the allowed values of setting ``key`` (:data:`CHOICES`): the one
    check of these lists, for the dataclasses here and for code that takes such a value without them."""
    choices = CHOICES[key]
    if value not in choices:
        template = _UNKNOWN.get(key, "{key} must be one of {choices}, got {value!r}")
        raise ContinualFTError(template.format(key=key, value=value, choices=", ".join(choices)))


#: ``train.schedule``: names transformers' ``get_scheduler`` knows.
SCHEDULES = ("constant", "linear", "cosine")
#: ``train.attention``: ``auto``, or a transformers ``attn_implementation``.
ATTENTIONS = ("auto", "eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


@dataclass
class TrainConfig:
    lr: float = _help("peak learning rate of AdamW", 1e-3)
    schedule: str = _help(f"learning-rate schedule after warmup: {', '.join(SCHEDULES)}", "cosine")
    warmup_steps: int = _help("linear warmup steps at the start of every stage", 5)
    batch_size: int = _help("examples per micro-batch (unless max_tokens is set)", 8)
    max_tokens: int = _help(
        "form micro-batches by a token budget instead: padded rows × longest row (or real tokens when packed); 0 = off",
        0,
    )
    packing: bool = _help(
        "pack each micro-batch's examples into one padding-free row (positions restart per example, "
        "no attention across examples)",
        False,
    )
    grad_accum: int = _help("micro-batches per optimizer step (effective batch = batch_size × grad_accum)", 1)
    micro_tokens: int = _help(
        "most padded tokens per forward pass: a bigger micro-batch is split and its gradients added up (the same "
        "step, less activation memory; one process only); 0 = 768 on CPU, no split elsewhere; -1 = never split",
        0,
    )
    pad_to_multiple_of: int = _help(
        "round each micro-batch's padded width up to a multiple of this (fewer distinct shapes: on CPU each new one "
        "builds and caches oneDNN kernels); 0 = 16 on CPU, 8 elsewhere; 1 = no rounding",
        0,
    )
    attention: str = _help(
        "attention kernel while training: auto (eager on CPU, where it trains LoRA ~1.3x faster than sdpa; the "
        "model's own elsewhere), or a transformers attn_implementation (sdpa, eager, ...); evaluation keeps its own",
        "auto",
    )
    gradient_checkpointing: bool = _help(
        "recompute each decoder layer's activations in the backward pass instead of keeping them: less memory, "
        "about one more forward of compute per step",
        False,
    )
    epochs: int = _help("passes over each stage's training data", 1)
    max_steps: int = _help("optimizer steps per stage; 0 = as many as `epochs` gives", 0)
    weight_decay: float = _help("AdamW weight decay on adapter weights", 0.0)
    max_grad_norm: float = _help("gradient clipping norm; 0 = no clipping", 1.0)
    max_length: int = _help("longest tokenized example; longer prompts are cut from the left", 256)
    eval_every: int = _help("validation loss every N optimizer steps; 0 = once at the end of the stage", 0)
    patience: int = _help("early stopping: stop a stage after this many validations without improvement; 0 = off", 0)
    checkpoint_every: int = _help(
        "save an in-stage checkpoint every N optimizer steps (latest only), for `resume`; 0 = off", 0
    )
    checkpoint_minutes: float = _help("also save one when this many minutes passed since the last; 0 = off", 0.0)

    def __post_init__(self):
        _require(self.lr > 0, f"train.lr must be > 0, got {self.lr}")
        check_choice("train.schedule", self.schedule)
        _require(self.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        _require(self.batch_size >= 1, f"train.batch_size must be >= 1, got {self.batch_size}")
        _require(self.max_tokens >= 0, f"train.max_tokens must be >= 0, got {self.max_tokens}")
        _require(self.grad_accum >= 1, f"train.grad_accum must be >= 1, got {self.grad_accum}")
        check_choice("train.attention", self.attention)
        _require(self.micro_tokens >= -1, f"train.micro_tokens must be >= -1, got {self.micro_tokens}")
        _require(self.pad_to_multiple_of >= 0, f"train.pad_to_multiple_of must be >= 0, got {self.pad_to_multiple_of}")
        _require(self.epochs >= 1, f"train.epochs must be >= 1, got {self.epochs}")
        _require(self.max_steps >= 0, f"train.max_steps must be >= 0, got {self.max_steps}")
        _require(self.weight_decay >= 0, f"train.weight_decay must be >= 0, got {self.weight_decay}")
        _require(self.max_grad_norm >= 0, f"train.max_grad_norm must be >= 0, got {self.max_grad_norm}")
        _require(self.max_length >= 16, f"train.max_length must be >= 16, got {self.max_length}")
        _require(self.eval_every >= 0, f"train.eval_every must be >= 0, got {self.eval_every}")
        _require(self.patience >= 0, f"train.patience must be >= 0, got {self.patience}")
        _require(self.patience == 0 or self.eval_every > 0, "train.patience needs train.eval_every > 0")
        _require(self.checkpoint_every >= 0, f"train.checkpoint_every must be >= 0, got {self.checkpoint_every}")
        _require(self.checkpoint_minutes >= 0, f"train.checkpoint_minutes must be >= 0, got {self.checkpoint_minutes}")


@dataclass
class LoraConfig:
    r: int = _help("LoRA rank", 8)
    alpha: int = _help("LoRA alpha; the update is scaled by alpha / r", 16)
    # Dropout costs ~25% of LoRA training throughput on CPU (measured: 272 vs 353 tok/s
    # on SmolLM2-135M, bf16); off by default, set lora.dropout=0.05 to regularise.
    dropout: float = _help("dropout on the LoRA input", 0.0)
    target_modules: List[str] = _help(
        "module names that get LoRA",
        factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    frozen_layers: List[int] = _help("transformer layer indices left without LoRA (kept frozen)", factory=list)

    def __post_init__(self):
        _require(self.r >= 1, f"lora.r must be >= 1, got {self.r}")
        _require(self.alpha > 0, f"lora.alpha must be > 0, got {self.alpha}")
        _require(0 <= self.dropout < 1, f"lora.dropout must be in [0, 1), got {self.dropout}")
        _require(len(self.target_modules) > 0, "lora.target_modules must name at least one module")
        _require(all(i >= 0 for i in self.frozen_layers), "lora.frozen_layers must be layer indices >= 0")


@dataclass
class EvalConfig:
    batch_size: int = _help("prompts per evaluation forward pass", 16)
    max_new_tokens: int = _help("greedy tokens generated for exact match; 0 = longest label + 3", 0)
    # A decode step's cost grows far slower than its rows on a CPU (a bf16 up-projection: 64 rows 1.7x the time
    # of 16), and a finished row leaves the batch, so generative answers decode in larger batches.
    generate_batch_size: int = _help("prompts decoded together for a generative task's answers", 64)

    def __post_init__(self):
        _require(self.batch_size >= 1, f"eval.batch_size must be >= 1, got {self.batch_size}")
        _require(
            self.generate_batch_size >= 1, f"eval.generate_batch_size must be >= 1, got {self.generate_batch_size}"
        )
        _require(self.max_new_tokens >= 0, f"eval.max_new_tokens must be >= 0, got {self.max_new_tokens}")


@dataclass
class DataConfig:
    train_size: int | None = _help("training examples per task; overrides the scenario's sizes", None)
    validation_size: int | None = _help("validation examples per task; overrides the scenario", None)
    test_size: int | None = _help("test examples per task; overrides the scenario", None)
    chat_template: bool = _help("wrap prompts in the tokenizer's chat template when it has one", True)
    system_prompt: str = _help("system message used with the chat template", "Answer with the label only.")

    def __post_init__(self):
        for name in ("train_size", "validation_size", "test_size"):
            value = getattr(self, name)
            _require(value is None or value >= 1, f"data.{name} must be >= 1, got {value}")

    def sizes(self) -> dict[str, int]:
        pairs = {"train": self.train_size, "validation": self.validation_size, "test": self.test_size}
        return {k: v for k, v in pairs.items() if v is not None}


#: ``merge.method``, how ``adapter=merge_final`` combines: PEFT ``add_weighted_adapter`` combination types.
MERGE_METHODS = {
    "cat": "exact sum Σ w_k ΔW_k: concatenates the adapters along the rank (rank = Σ r_k)",
    "svd": "the sum Σ w_k ΔW_k truncated to rank r by SVD (size of one adapter)",
    "linear": "weighted sum of the A and B factors separately (cheap; with several adapters adds cross terms)",
    "ties": "TIES (Yadav et al. 2023) on the A and B factors: trim to `density`, elect signs, merge",
    "dare_ties": "DARE (Yu et al. 2023) random drop to `density` and rescale, then TIES sign election",
    "magmax": "MagMax (Marczak et al. 2024): per weight entry, the stage delta of largest magnitude (full rank)",
}


@dataclass
class MergeConfig:
    # Default `cat`: with independently trained adapters it is plain task arithmetic, exact and
    # deterministic, so R measures interference between the stages' updates and nothing else.
    # PEFT's linear/ties/dare_ties act on A and B separately (peft/tuners/lora/model.py,
    # `_generalized_task_arithmetic_weighted_adapter`), which mixes A_i with B_j across stages.
    method: str = _help(
        f"how adapter=merge_final combines the stage adapters: {', '.join(MERGE_METHODS)} (shorthand: method=...)",
        "cat",
    )
    weights: List[float] = _help("weight of each stage's adapter, one per stage; empty = 1.0 each", factory=list)
    density: float = _help("fraction of values kept by ties / dare_ties, in (0, 1]", 0.5)

    def __post_init__(self):
        check_choice("merge.method", self.method)
        _require(0 < self.density <= 1, f"merge.density must be in (0, 1], got {self.density}")
        _require(all(w == w for w in self.weights), "merge.weights must be numbers, got NaN")


#: ``adapter``: how LoRA adapters carry across stages (:mod:`continual_ft.model.adapters` implements each).
ADAPTER_MODES = {
    "continue": "one adapter trained on through all stages",
    "new": "a new adapter per stage; earlier ones stay frozen and active (same as stack)",
    "stack": "a new adapter per stage; earlier ones stay frozen and active, their deltas add up",
    "merge": "each stage's adapter is merged into the base weights; the next stage trains a fresh one",
    "merge_final": "one adapter per stage trained from the base, combined with merge.method after each stage",
}
#: ``precision``: compute precision (:mod:`continual_ft.train.precision` resolves ``auto``).
PRECISIONS = ("auto", "bf16", "fp32")
#: ``quantize``: base-weight quantization.
QUANTIZE = ("none", "nf4")
#: ``log=[...]``: the optional trackers (:data:`continual_ft.report.tracking.TRACKERS` has a backend for each).
TRACKER_NAMES = ("tensorboard", "wandb", "mlflow")


@dataclass
class RunConfig:
    scenario: str = _help("built-in scenario name or path to a scenario YAML", "legal_then_medical")
    strategy: str = _help("anti-forgetting strategy; combine with '+', e.g. replay+ewc", "naive")
    adapter: str = _help(f"how LoRA adapters carry across stages: {', '.join(ADAPTER_MODES)}", "continue")
    model: str = _help("smollm2-135m, tiny, a local directory or a hub id", "smollm2-135m")
    precision: str = _help(
        f"compute precision: {', '.join(PRECISIONS)} (auto = bf16 on a GPU that supports it, on a CPU where a cached "
        "matmul probe finds it >= 1.1x as fast as fp32; else fp32)",
        "auto",
    )
    quantize: str = _help(f"base-weight quantization: {', '.join(QUANTIZE)} (nf4 = QLoRA via bitsandbytes)", "none")
    trust_remote_code: bool = _help("allow custom model code from a hub repo", False)
    seed: int = _help("seed for data sampling, initialisation and shuffling", 0)
    quick: bool = _help("use the scenario's small `quick` sizes (a ~2 minute run)", False)
    output_dir: str = _help("parent directory of run directories", "runs")
    name: str | None = _help("run directory name; default derived from scenario, strategy, adapter", None)
    train: TrainConfig = _help("training hyperparameters", factory=TrainConfig)
    lora: LoraConfig = _help("LoRA hyperparameters", factory=LoraConfig)
    eval: EvalConfig = _help("evaluation settings", factory=EvalConfig)
    data: DataConfig = _help("data sizes and prompt formatting", factory=DataConfig)
    merge: MergeConfig = _help("how adapter=merge_final combines the stage adapters", factory=MergeConfig)
    strategy_args: Dict[str, Any] = _help("per-strategy settings, e.g. replay.buffer_size=200", factory=dict)
    log: List[str] = _help(
        f"trackers that get the metrics besides the run folder's log.jsonl: log=[{','.join(TRACKER_NAMES)}]",
        factory=list,
    )

    def __post_init__(self):
        check_choice("precision", self.precision)
        check_choice("quantize", self.quantize)
        for name in self.log:
            check_choice("log", name)
        check_choice("adapter", self.adapter)
        self.log = list(dict.fromkeys(self.log))

    def run_name(self) -> str:
        if self.name:
            return self.name
        from pathlib import Path

        scenario = Path(self.scenario).stem
        adapter = f"{self.adapter}-{self.merge.method}" if self.adapter == "merge_final" else self.adapter
        return f"{scenario}-{self.strategy}-{adapter}" + ("-quick" if self.quick else "")


#: Every setting with a closed list of allowed values, by its dotted key: the lists above, checked by
#: :func:`check_choice` in the dataclasses' ``__post_init__``.
CHOICES = {
    "train.schedule": SCHEDULES,
    "train.attention": ATTENTIONS,
    "merge.method": MERGE_METHODS,
    "adapter": ADAPTER_MODES,
    "precision": PRECISIONS,
    "quantize": QUANTIZE,
    "log": TRACKER_NAMES,
}


def config_keys(cls=RunConfig, prefix: str = "") -> list[str]:
    """Every settable dotted key, for error messages and `list`."""
    keys = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            keys += config_keys(f.default_factory, f"{prefix}{f.name}.")
        elif f.name != "strategy_args":
            keys.append(prefix + f.name)
    return keys


def _one_line(e: OmegaConfBaseException) -> str:
    msg = str(e).splitlines()[0]
    key = getattr(e, "full_key", None)
    return f"{key}: {msg}" if key and key not in msg else msg


def parse_overrides(items: list[str]) -> list[tuple[str, str]]:
    """``["quick", "method=ties", "train.lr=2e-4"]`` → ``[("quick", "true"), ("merge.method", "ties"), ...]``:
    bare flags and shorthands resolved, values left as text (``compare`` splits them on commas)."""
    pairs = []
    for item in items:
        if item == "quick":
            item = "quick=true"
        if "=" not in item:
            raise ContinualFTError(f"expected key=value, got {item!r}")
        key, value = item.split("=", 1)
        pairs.append((SHORTHANDS.get(key, key), value))
    return pairs


def make_config(overrides: list[str] | dict | None = None, strategy_names: tuple[str, ...] = ()) -> RunConfig:
    """Build a RunConfig from ``key=value`` strings (dotted keys allowed) or a nested dict.

    Keys that start with a strategy name (``replay.buffer_size=200``) go to ``strategy_args``,
    where the strategy's own typed config checks them. A bare key in ``SHORTHANDS`` stands for
    its dotted key: ``method=ties`` is ``merge.method=ties``.
    """
    base = OmegaConf.structured(RunConfig)
    if isinstance(overrides, dict):
        overrides = dict(overrides)
        if isinstance(overrides.get("log"), str):  # log: tensorboard, as log: [tensorboard]
            overrides["log"] = [overrides["log"]]
        for short, full in SHORTHANDS.items():
            if short in overrides:
                section, key = full.split(".")
                overrides[section] = {**overrides.get(section, {}), key: overrides.pop(short)}
        extra = OmegaConf.create(overrides)
    else:
        items = []
        for key, value in parse_overrides(list(overrides or [])):
            head = key.split(".", 1)[0]
            if head in strategy_names:
                key = f"strategy_args.{key}"
            elif head not in {f.name for f in dataclasses.fields(RunConfig)}:
                raise ContinualFTError(f"unknown config key {key!r}; valid keys: {', '.join(config_keys())}")
            if key == "log" and not value.startswith("["):  # log=tensorboard or log=tensorboard,wandb
                value = f"[{value}]"
            items.append(f"{key}={value}")
        try:
            extra = OmegaConf.from_dotlist(items)
        except OmegaConfBaseException as e:
            raise ContinualFTError(f"cannot parse overrides: {_one_line(e)}") from None
    try:
        merged = OmegaConf.merge(base, extra)
        return OmegaConf.to_object(merged)
    except ConfigKeyError as e:
        raise ContinualFTError(f"invalid config: {_one_line(e)}; valid keys: {', '.join(config_keys())}") from None
    except OmegaConfBaseException as e:
        raise ContinualFTError(f"invalid config: {_one_line(e)}") from None


def to_dict(config: RunConfig) -> dict:
    """Plain nested dict of a RunConfig (what `config.yaml` holds)."""
    return dataclasses.asdict(config)
