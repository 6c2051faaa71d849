"""How LoRA adapters carry from stage to stage, all in one place, on PEFT's own APIs.

* ``continue``: one adapter (``default``) trained on through every stage.
* ``new`` (alias ``stack``): a fresh adapter per stage (``stage1``, ``stage2``, ...). Earlier
  adapters stay active and frozen, so the model computes W x + Σ_k (α/r) B_k A_k x.

Each stage's adapter is saved in standard PEFT format under ``adapters/stage<i>``, so
``PeftModel.from_pretrained(base, dir)`` loads it back.
"""

from __future__ import annotations

from pathlib import Path

from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model

from continual_ft.config import LoraConfig
from continual_ft.errors import ContinualFTError

__all__ = ["ADAPTER_MODES", "peft_config", "start_stage", "save_stage", "adapter_names", "trainable_parameters"]

ADAPTER_MODES = {
    "continue": "one adapter trained on through all stages",
    "new": "a new adapter per stage; earlier ones stay frozen and active (same as stack)",
    "stack": "a new adapter per stage; earlier ones stay frozen and active, their deltas add up",
}


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


def start_stage(model, mode: str, stage: int, cfg: LoraConfig):
    """Prepare ``model`` to train stage ``stage`` (0-based); returns the (PEFT) model to train."""
    if mode not in ADAPTER_MODES:
        raise ContinualFTError(f"unknown adapter mode {mode!r}; choose from {', '.join(ADAPTER_MODES)}")
    num_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if not isinstance(model, PeftModel):
        _check_targets(model, cfg)
        name = "default" if mode == "continue" else "stage1"
        return get_peft_model(model, peft_config(cfg, num_layers), adapter_name=name)
    if mode == "continue":
        return model
    # new / stack: add this stage's adapter, keep all active, train only the new one.
    earlier = adapter_names(model)
    name = f"stage{stage + 1}"
    model.add_adapter(name, peft_config(cfg, num_layers))
    model.base_model.set_adapter(earlier + [name])
    model.base_model.set_requires_grad(earlier, requires_grad=False)
    model.base_model.set_requires_grad(name, requires_grad=True)
    return model


def save_stage(model, mode: str, stage: int, run_dir: Path) -> Path:
    """Save the adapter trained in ``stage`` in PEFT format; returns its directory."""
    name = "default" if mode == "continue" else f"stage{stage + 1}"
    out = Path(run_dir) / "adapters" / f"stage{stage + 1}"
    out.mkdir(parents=True, exist_ok=True)
    # PEFT writes a non-default adapter under a sub-folder named after it; save it as
    # "the" adapter of its own folder so plain `PeftModel.from_pretrained(base, out)` works.
    model.save_pretrained(out, selected_adapters=[name])
    nested = out / name
    if nested.is_dir():
        for f in nested.iterdir():
            f.replace(out / f.name)
        nested.rmdir()
    return out


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
