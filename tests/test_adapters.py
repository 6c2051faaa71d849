"""Adapter handling across stages, on a tiny model."""

import torch
from peft import PeftModel

from continual_ft.config import LoraConfig
from continual_ft.model.adapters import save_stage, start_stage
from continual_ft.model.loading import load_model


def _perturb(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)


def _lora_params(model, adapter):
    return {n: p.detach().clone() for n, p in model.named_parameters() if f".{adapter}." in n}


def test_saved_adapter_reloads_with_plain_peft(tmp_path):
    model, _ = load_model("tiny", seed=0)
    model = start_stage(model, "continue", 0, LoraConfig(r=4))
    _perturb(model)  # LoRA B starts at zero; make the adapter do something
    out = save_stage(model, "continue", 0, tmp_path)
    base, _ = load_model("tiny", seed=0)
    reloaded = PeftModel.from_pretrained(base, out)
    ids = torch.randint(0, 300, (2, 12))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)
        plain, _ = load_model("tiny", seed=0)
        assert not torch.equal(plain(input_ids=ids).logits, reloaded(input_ids=ids).logits)


def test_new_adapter_per_stage_keeps_earlier_frozen_and_active(tmp_path):
    model, _ = load_model("tiny", seed=0)
    model = start_stage(model, "new", 0, LoraConfig(r=4))
    _perturb(model)
    stage1 = _lora_params(model, "stage1")
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        only_first = model(input_ids=ids).logits
    model = start_stage(model, "new", 1, LoraConfig(r=4))
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".stage1." in n)
    assert all(p.requires_grad for n, p in model.named_parameters() if ".stage2." in n and "lora_" in n)
    assert model.base_model.active_adapters == ["stage1", "stage2"]
    _perturb(model)  # "trains" only what requires grad
    assert all(torch.equal(stage1[n], p) for n, p in _lora_params(model, "stage1").items())
    with torch.no_grad():
        assert not torch.equal(only_first, model(input_ids=ids).logits)  # both deltas apply
    out = save_stage(model, "new", 1, tmp_path)
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()


def test_frozen_layers_get_no_lora():
    model, _ = load_model("tiny", seed=0)
    model = start_stage(model, "continue", 0, LoraConfig(r=4, frozen_layers=[0]))
    names = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert names and all(".layers.1." in n for n in names)
