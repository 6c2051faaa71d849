"""QLoRA: 4-bit NF4 base weights through bitsandbytes, LoRA trained on top (CPU path)."""

import json

import pytest
from toy import write_toy_scenario

from continual_ft.config import make_config
from continual_ft.models import load_model
from continual_ft.runner import run

pytest.importorskip("bitsandbytes")


def test_nf4_run_trains_adapters_on_a_4bit_base(tmp_path):
    model, tok = load_model("tiny", seed=0)
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    scenario = write_toy_scenario(tmp_path / "data", train=8, test=4)
    config = make_config(
        [
            f"scenario={scenario}",
            f"model={tmp_path / 'tiny'}",
            "quantize=nf4",
            "train.max_steps=2",
            "train.batch_size=4",
            f"output_dir={tmp_path / 'runs'}",
        ]
    )
    results = run(config, progress=False)
    assert results.data["complete"]
    assert json.loads((results.run_dir / "adapters" / "stage1" / "adapter_config.json").read_text())["r"] == 8
    config_yaml = (results.run_dir / "config.yaml").read_text()
    assert "quantize: nf4" in config_yaml


def test_nf4_refuses_the_in_memory_tiny_model():
    from continual_ft.errors import ContinualFTError

    with pytest.raises(ContinualFTError, match="quantize=nf4"):
        run(make_config(["model=tiny", "quantize=nf4"]), progress=False)
