"""How LoRA adapters carry from stage to stage, all in one place, on PEFT's own APIs.

The runner calls three functions; everything mode-specific happens inside them::

    model = start_stage(model, mode, i, lora_cfg)           # the model to train in stage i
    ... train ...
    out = finish_stage(model, mode, i, run_dir, merge_cfg)  # saves, merges, combines
    ... evaluate out.model ...
    finish_run(out.model, mode, run_dir, tokenizer)         # merge: the merged checkpoint

Modes (W is a frozen base weight, B_k A_k the LoRA of stage k, s = α/r):

* ``continue``: one adapter (``default``) trained on through every stage: W x + s B A x.
* ``new`` (alias ``stack``): a fresh adapter per stage (``stage1``, ``stage2``, ...); earlier ones
  stay active and frozen, so after stage k the model computes W x + Σ_{j≤k} s B_j A_j x. Inference
  cost grows with the number of stages.
* ``merge``: after each stage the adapter is folded into the base (``merge_and_unload``),
  W ← W + s B_k A_k, and the next stage trains a fresh adapter on the merged model. Inference cost
  stays that of the base model. The merge happens in the base dtype: with ``precision=bf16`` the
  runner holds the base in bf16, so every merge rounds W + s B A to bf16 (about 3 significant
  digits), and small updates can partly vanish.
* ``merge_final``: each stage trains a fresh adapter from the base model (only it is active while
  training), then the adapters of stages 1..k are combined into one (``merged``) with PEFT's
  ``add_weighted_adapter``, W x + Σ_j w_j ΔW_j for ``cat``/``svd`` (task arithmetic; ``svd`` truncates
  the sum to rank r), a TIES/DARE combination, or MagMax (per weight entry, the stage delta of
  largest magnitude): model merging as a continual-learning strategy.
  Evaluation after stage k uses the combination of stages 1..k. While stage k trains, the
  combination of stages 1..k−1 stays in the model, inactive and frozen: it is the model evaluated
  after stage k−1, which LwF distils (:func:`evaluated_adapter`, :func:`only_adapter`). It costs the
  memory it took at that evaluation (for ``magmax``, up to twice the targeted weights, in fp32).

Saved in standard PEFT format, each loadable with ``PeftModel.from_pretrained(base, dir)``:
``adapters/stage<k>`` (the adapter trained in stage k; under ``merge`` it applies on top of the
model merged through stage k−1) and, for ``merge_final``, ``adapters/merged`` (the combination of
all stages so far). ``merge`` also writes ``merged/``, a plain transformers checkpoint with its
tokenizer, loadable with ``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model

from continual_ft.config import ADAPTER_MODES, MERGE_METHODS, LoraConfig, MergeConfig, check_choice
from continual_ft.errors import ContinualFTError
from continual_ft.files import atomic_dir

__all__ = [
    "ADAPTER_MODES",
    "MERGE_METHODS",
    "StageOutput",
    "peft_config",
    "start_stage",
    "finish_stage",
    "finish_run",
    "restore",
    "evaluated_adapter",
    "only_adapter",
    "save_stage",
    "combine",
    "magmax",
    "adapter_names",
    "trainable_parameters",
    "dir_bytes",
]

MERGED = "merged"  # name of the combined adapter under merge_final


@dataclass
class StageOutput:
    """What :func:`finish_stage` hands back to the runner."""

    model: torch.nn.Module  # the model to evaluate (and to pass to the next start_stage)
    adapter_dir: Path  # this stage's adapter, PEFT format
    merged_dir: Path | None = None  # merge_final: the combined adapter of stages 1..k
    serving_dirs: list[Path] = field(default_factory=list)  # adapters the evaluated model adds to its base


def peft_config(cfg: LoraConfig, num_layers: int | None = None) -> PeftLoraConfig:
    layers = None
    if cfg.frozen_layers:
        if num_layers is None:
            raise ContinualFTError("lora.frozen_layers needs a model that reports num_hidden_layers")
        bad = [i for i in cfg.frozen_layers if i >= num_layers]
        if bad:
            raise ContinualFTError(f"lora.frozen_layers: layer {bad[0]} does not exist (the model has {num_layers})")
        layers = [i for i in range(num_layers) if i not in set(cfg.frozen_layers)]
        if not layers:
            raise ContinualFTError("lora.frozen_layers freezes every layer: nothing would train")
    return PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        layers_to_transform=layers,
        task_type="CAUSAL_LM",
    )


def adapter_names(model) -> list[str]:
    return list(model.peft_config) if isinstance(model, PeftModel) else []


def _check_targets(model, cfg: LoraConfig) -> None:
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in cfg.target_modules if t not in names]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if m.__class__.__name__ == "Linear"})
        raise ContinualFTError(f"lora.target_modules: {missing[0]!r} is not in the model; it has {', '.join(linear)}")


def _stage_name(mode: str, stage: int) -> str:
    # Distinct names per stage also keep EWC's name-keyed anchors off a fresh adapter.
    return "default" if mode == "continue" else f"stage{stage + 1}"


def start_stage(model, mode: str, stage: int, cfg: LoraConfig):
    """Prepare ``model`` to train stage ``stage`` (0-based); returns the (PEFT) model to train.

    Exactly the parameters of this stage's adapter require grad afterwards.
    """
    check_choice("adapter", mode)  # a caller without a RunConfig (the examples) gets the same line
    num_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    name = _stage_name(mode, stage)
    if not isinstance(model, PeftModel):  # first stage, or the base just merged under `merge`
        _check_targets(model, cfg)
        return get_peft_model(model, peft_config(cfg, num_layers), adapter_name=name)
    if mode == "continue":
        return model
    earlier = [n for n in adapter_names(model) if n != MERGED]
    model.add_adapter(name, peft_config(cfg, num_layers))
    # new / stack: every adapter active, only the new one trains.
    # merge_final: only the new adapter is active, so it learns from the base model alone; `merged` (the
    # model evaluated after the previous stage) stays, inactive and frozen, until finish_stage rebuilds it.
    active = earlier + [name] if mode in ("new", "stack") else [name]
    model.base_model.set_adapter(active)
    if earlier:
        model.base_model.set_requires_grad(earlier, requires_grad=False)
    model.base_model.set_requires_grad(name, requires_grad=True)
    return model


def evaluated_adapter(model) -> str | None:
    """The adapter that alone makes the model evaluated after the previous stage, where the model trains
    another: under ``merge_final``, ``merged`` (stages 1..k−1 combined) while stage k's adapter trains from
    the base. None elsewhere: under ``continue``, ``new``/``stack`` and ``merge`` the trained model starts
    a stage as the model evaluated after the previous one (a fresh adapter's B is 0)."""
    if isinstance(model, PeftModel) and MERGED in model.peft_config:
        if MERGED not in model.base_model.active_adapters:
            return MERGED
    return None


@contextmanager
def only_adapter(model, name: str):
    """Inside the block ``model`` computes with adapter ``name`` alone (for a no-grad forward); after it the
    active adapters, and which parameters require grad, are as before. PEFT's ``set_adapter`` also sets
    ``requires_grad`` (and the adapters' dropout mode): the flags are put back one by one."""
    active = list(model.base_model.active_adapters)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.base_model.set_adapter(name, inference_mode=True)
    try:
        yield model
    finally:
        model.base_model.set_adapter(active)
        for p, flag in flags:
            p.requires_grad_(flag)


def _save_adapter(model, name: str, out: Path, state_dict: dict | None = None) -> Path:
    """Save adapter ``name`` as "the" adapter of ``out``, replacing what was there (from ``state_dict`` if given)."""
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, selected_adapters=[name], **({"state_dict": state_dict} if state_dict else {}))
        # PEFT writes a non-default adapter under a sub-folder named after it; lift it up so
        # plain `PeftModel.from_pretrained(base, out)` finds it.
        nested = tmp / name
        if name != "default" and nested.is_dir():
            for f in nested.iterdir():
                f.replace(tmp / f.name)
            nested.rmdir()
    return out


def save_stage(model, mode: str, stage: int, run_dir: Path) -> Path:
    """Save the adapter trained in ``stage`` in PEFT format under ``adapters/stage<k>``; returns its directory."""
    return _save_adapter(model, _stage_name(mode, stage), Path(run_dir) / "adapters" / f"stage{stage + 1}")


def combine(model, names: list[str], cfg: MergeConfig, seed: int = 0) -> str:
    """Combine adapters ``names`` into one adapter ``merged`` with ``cfg.method``; make it the only active one.

    With one adapter PEFT always combines linearly: A' = √(w s) A, B' = √(w s) B with the new
    scaling 1, so B'A' = w s B A (exact up to the rounding of the square root). ``cat`` is exact
    for any number: it stacks w_j s_j A_j and B_j along the rank (rank Σ r_j). ``svd`` is the best
    rank-r approximation of Σ_j w_j s_j B_j A_j. PEFT's ``linear``, ``ties`` and ``dare_ties``
    combine the A and B factors separately, so with several adapters the product also holds
    cross terms B_i A_j.
    """
    weights = list(cfg.weights[: len(names)]) if cfg.weights else [1.0] * len(names)
    if len(weights) != len(names):
        raise ContinualFTError(f"merge.weights has {len(cfg.weights)} values for {len(names)} adapters")
    if MERGED in model.peft_config:
        model.delete_adapter(MERGED)  # add_weighted_adapter silently keeps an existing name
    density = cfg.density if cfg.method in ("ties", "dare_ties") else None
    with torch.random.fork_rng():  # DARE drops at random: seed it, without disturbing training's RNG
        torch.manual_seed(seed)
        if cfg.method == "magmax":
            magmax(model, names, weights)
        else:
            model.add_weighted_adapter(names, weights, MERGED, combination_type=cfg.method, density=density)
    model.base_model.set_adapter(MERGED, inference_mode=True)
    return MERGED


def magmax(model, names: list[str], weights: list[float]) -> None:
    """MagMax (Marczak et al. 2024, https://arxiv.org/abs/2407.06322) of adapters ``names`` into ``merged``.

    With ΔW_j = w_j s_j B_j A_j the delta of stage j, each entry keeps the delta of largest magnitude,
    sign and all (the first stage's on a tie):

        ΔW[o, i] = ΔW_j*[o, i],   j* = argmax_j |ΔW_j[o, i]|

    An entry-wise choice is not low-rank, so ``merged`` holds ΔW exactly, at rank m = min(out, in) of
    each layer (``rank_pattern``) and scaling 1: B = ΔW, A = I when in <= out, else B = I, A = ΔW.
    Exact, at a price: ``merged`` is up to twice the size of the weights it targets (ΔW and an identity),
    and a targeted layer computes up to twice its base's multiply-adds.
    """
    from peft.tuners.lora import LoraLayer

    modules = model.base_model.model.named_modules()
    layers = {k: m for k, m in modules if isinstance(m, LoraLayer) and names[0] in m.lora_A}
    deltas, pairs = {}, list(zip(names, weights))
    for key, layer in layers.items():
        if not all(isinstance(layer.lora_A[n], torch.nn.Linear) for n in names):
            raise ContinualFTError(f"merge.method=magmax merges linear LoRA layers only; {key} is not one")
        stacked = torch.stack(
            [w * layer.scaling[n] * layer.lora_B[n].weight.float() @ layer.lora_A[n].weight.float() for n, w in pairs]
        )
        deltas[key] = stacked.gather(0, stacked.abs().argmax(0, keepdim=True)).squeeze(0)
    # Escaped: PEFT matches a pattern key as a regex against the end of each module's name.
    ranks = {re.escape(k): min(d.shape) for k, d in deltas.items()}
    top = max(ranks.values())
    config = replace(
        model.peft_config[names[0]], r=top, lora_alpha=top, rank_pattern=ranks, alpha_pattern=ranks, use_rslora=False
    )
    model.add_adapter(MERGED, config)
    with torch.no_grad():
        for key, delta in deltas.items():
            A, B = layers[key].lora_A[MERGED].weight, layers[key].lora_B[MERGED].weight
            eye = torch.eye(min(delta.shape), dtype=A.dtype, device=A.device)
            out, inp = delta.shape
            A.copy_(eye if inp <= out else delta)
            B.copy_(delta if inp <= out else eye)


def finish_stage(
    model,
    mode: str,
    stage: int,
    run_dir: Path,
    merge_cfg: MergeConfig,
    seed: int = 0,
    save: bool = True,
    gather: Callable[[dict], dict] | None = None,
) -> StageOutput:
    """Save stage ``stage``'s adapter and turn the trained model into the one to evaluate.

    ``continue``/``new``/``stack``: the model as trained. ``merge``: the adapter merged into the base
    (a plain transformers model). ``merge_final``: the adapters of stages 1..k combined into ``merged``,
    also saved under ``adapters/merged``. ``save=False`` (every process but the first of a multi-process
    run) changes the model alike and writes nothing. ``gather`` (under FSDP, where every process must
    call this) turns the adapter's per-process shards into whole tensors before the first process saves.
    """
    check_choice("adapter", mode)
    run_dir = Path(run_dir)
    name = _stage_name(mode, stage)
    adapter_dir = run_dir / "adapters" / f"stage{stage + 1}"
    state = gather({k: v for k, v in model.state_dict().items() if "lora_" in k}) if gather else None
    if save:
        _save_adapter(model, name, adapter_dir, state)
    if mode == "continue":
        return StageOutput(model, adapter_dir, serving_dirs=[adapter_dir])
    if mode in ("new", "stack"):
        stages = [run_dir / "adapters" / f"stage{j + 1}" for j in range(stage + 1)]
        return StageOutput(model, adapter_dir, serving_dirs=stages)
    if mode == "merge":
        return StageOutput(model.merge_and_unload(), adapter_dir)
    names = [f"stage{j + 1}" for j in range(stage + 1)]
    combine(model, names, merge_cfg, seed=seed + stage)
    merged_dir = run_dir / "adapters" / MERGED
    if save:
        _save_adapter(model, MERGED, merged_dir)
    return StageOutput(model, adapter_dir, merged_dir=merged_dir, serving_dirs=[merged_dir])


def finish_run(model, mode: str, run_dir: Path, tokenizer=None) -> Path | None:
    """After the last stage: under ``merge``, save the merged model (and tokenizer) as a plain
    transformers checkpoint in ``merged/``; returns that directory, or None for other modes."""
    if mode != "merge":
        return None
    out = Path(run_dir) / "merged"
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def dir_bytes(path: Path) -> int:
    """Size on disk of the files under ``path``."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def restore(model, mode: str, stages_done: int, run_dir: Path, cfg: LoraConfig, merge_cfg: MergeConfig, seed: int = 0):
    """The model as it stood after ``stages_done`` stages of a run, rebuilt from the run's saved adapters.

    Replays what the run did, stage by stage: :func:`start_stage`, then the stage's trained weights
    from ``adapters/stage<k>`` instead of training, then under ``merge`` the same merge into the base,
    and under ``merge_final`` the same combination ``merged`` of them all (``merge_cfg``, ``seed``: the
    run's), rebuilt rather than read from ``adapters/merged``, which a run stopped after saving a stage
    but before its results may have written one stage ahead. The same operations on the same weights
    give the same model, bit for bit.
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    for stage in range(stages_done):
        model = start_stage(model, mode, stage, cfg)
        path = Path(run_dir) / "adapters" / f"stage{stage + 1}" / "adapter_model.safetensors"
        if not path.is_file():
            raise ContinualFTError(f"{path.parent}: missing; the run cannot be resumed past stage {stage}")
        result = set_peft_model_state_dict(model, load_file(path), adapter_name=_stage_name(mode, stage))
        if result.unexpected_keys:
            raise ContinualFTError(f"{path}: does not match the model ({result.unexpected_keys[0]})")
        if mode == "merge":
            model = model.merge_and_unload()
    if mode == "merge_final" and stages_done:  # the model evaluated after the last stage done (LwF's teacher)
        combine(model, [_stage_name(mode, j) for j in range(stages_done)], merge_cfg, seed=seed + stages_done - 1)
    return model
