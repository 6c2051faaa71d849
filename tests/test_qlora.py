"""QLoRA: 4-bit NF4 base weights through bitsandbytes, LoRA trained on top.

bitsandbytes places a 4-bit model on a device as it loads (transformers' ``device_map``; it cannot be
moved after), by default the current CUDA device wherever there is one. So every input here follows the
model's device, and a test that compares with CPU processes pins its own run to the CPU (``cpu_run``).
"""

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from test_fsdp_run import _launch, fsdp_env
from toy import write_toy_scenario

from continual_ft.config import make_config
from continual_ft.model.loading import load_model
from continual_ft.run.runner import _quantization, run
from continual_ft.train import distributed
from continual_ft.train.distributed import CPU_ENV

pytest.importorskip("bitsandbytes")


@pytest.fixture
def cpu_run(monkeypatch):
    """This process's runs on the CPU, as ``CONTINUAL_FT_CPU=1`` puts the gloo test processes (a fresh ``Dist``)."""
    monkeypatch.setenv(CPU_ENV, "1")
    monkeypatch.setattr(distributed, "_DIST", None)


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


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("qlora") / "tiny"
    model, tok = load_model("tiny", seed=0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_fsdp_stores_the_4bit_weights_in_the_compute_dtype():
    """PEFT's FSDP + QLoRA guide: FSDP2 shards floating-point tensors only, so the packed 4-bit bytes are
    stored as bf16 under FSDP. One process keeps transformers' default, uint8: the same bytes."""
    config = make_config(["quantize=nf4"])
    fsdp, plain = _quantization(config, fsdp=True), _quantization(config)
    assert fsdp.bnb_4bit_quant_storage == fsdp.bnb_4bit_compute_dtype == torch.bfloat16
    assert plain.bnb_4bit_quant_storage == torch.uint8
    differ = {k for k, v in fsdp.to_dict().items() if plain.to_dict()[k] != v}
    assert differ == {"bnb_4bit_quant_storage"}


def test_a_4bit_base_loads_on_the_runs_device(tiny_dir, cpu_run, monkeypatch):
    """A run on the CPU gets its 4-bit base on the CPU where bitsandbytes' default is a GPU. Without CUDA,
    transformers' quantizer is made to see one (``torch.cuda.is_available``): given no device it then
    places the model on ``cuda:0``, which fails here, as the gloo processes' models did on a GPU machine."""
    import bitsandbytes  # noqa: F401  (imported before CUDA is faked: it probes its backend at import)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    scenario = write_toy_scenario(tiny_dir.parent / "data-device", train=8, test=4)
    settings = [f"scenario={scenario}", f"model={tiny_dir}", "quantize=nf4", "train.max_steps=1", "train.batch_size=4"]
    results = run(make_config([*settings, f"output_dir={tiny_dir.parent / 'runs-device'}"]), progress=False)
    assert results.data["complete"]
    assert {p.device.type for p in results.model.parameters()} == {"cpu"}


def _lora_grads(path: Path, evaluate_first: bool) -> dict:
    config = make_config(["quantize=nf4"])
    model, _ = load_model(str(path), quantization_config=_quantization(config))
    # Eager attention: no kernel whose backward adds up in a varying order (CUDA's SDPA), so equal means equal.
    model.set_attn_implementation("eager")
    torch.manual_seed(0)  # only q_proj: its gradient reaches it through o_proj's 4-bit weights
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))
    ids = torch.arange(2, 26, device=model.device).reshape(2, 12)  # where bitsandbytes placed the model
    if evaluate_first:  # the run's "before training" row
        model.eval()
        with torch.inference_mode():
            model(input_ids=ids)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if "lora_B" in n}


def test_4bit_layers_pass_gradients_after_an_evaluation(tiny_dir):
    """On an AVX512-BF16 CPU, bitsandbytes repacks a 4-bit weight at an eval forward into a layout whose
    kernel has no backward; load_model keeps the loaded layout, so evaluating first changes no gradient."""
    fresh, evaluated = _lora_grads(tiny_dir, False), _lora_grads(tiny_dir, True)
    assert fresh.keys() == evaluated.keys() and len(fresh) == 2
    for name, g in fresh.items():
        assert evaluated[name] is not None and g.abs().max() > 0, name
        assert torch.equal(evaluated[name], g), name


def _losses(run_dir: Path) -> list[float]:
    rows = map(json.loads, (run_dir / "log.jsonl").read_text().splitlines())
    return [row["train/loss"] for row in rows if "train/loss" in row]


def test_fsdp_qlora_shards_the_4bit_weights_and_trains_as_one_process(tmp_path, tiny_dir, cpu_run):
    """2 gloo processes under the shipped FSDP config against 1 process (in this one), the same global
    batch: each rank holds half of every 4-bit weight (bf16-stored DTensor rows), the sharded base model
    scores every test example exactly as the whole one, and the training losses agree to 1e-5.

    The weights agree to 5e-3, not the 1e-5 of tests/test_fsdp_run.py's fp32 runs: bitsandbytes computes the 4-bit
    layers in bf16 (``bnb_4bit_compute_dtype``), whose rounding depends on each shard's padded shape, and
    Adam's first steps move an entry by about ``lr`` whatever its gradient's size, so an entry whose
    gradient is near 0 may move either way (observed: 1.2e-3 after 2 stages of 3 steps at lr 1e-2).
    The one process runs on the CPU as the two do (``cpu_run``), also where there is a GPU."""
    scenario = write_toy_scenario(tmp_path / "data", train=8, test=4)
    settings = [f"scenario={scenario}", f"model={tiny_dir}", "quantize=nf4", "strategy=naive", "train.max_steps=3"]
    settings += ["train.lr=1e-2", "precision=fp32", f"output_dir={tmp_path / 'runs'}"]
    one = run(make_config([*settings, "train.batch_size=4", "name=one"]), progress=False)
    (tmp_path / "two").mkdir()
    _launch(2, tmp_path / "two", [*settings, "train.batch_size=2", "name=two"], tmp_path, fsdp_env())
    four_bit = [m.weight for m in one.model.modules() if type(m).__name__ == "Linear4bit"]
    assert {w.dtype for w in four_bit} == {torch.uint8} and {w.device.type for w in four_bit} == {"cpu"}
    two = [json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in range(2)]
    assert two[0]["fsdp"] and two[0]["4bit"]["dtypes"] == ["torch.bfloat16"]
    assert two[0]["4bit"]["total"] * 2 == sum(w.numel() for w in four_bit)  # the same bytes, counted as bf16
    assert two[0]["4bit"]["held"] == two[1]["4bit"]["held"] == two[0]["4bit"]["total"] // 2
    row0 = [(tmp_path / "runs" / name / "predictions" / "row0.jsonl").read_bytes() for name in ("one", "two")]
    assert row0[0] == row0[1]  # before training: the base model, sharded and whole
    assert two[0]["R"] == two[1]["R"] == one.data["R"]
    assert _losses(tmp_path / "runs" / "two") == pytest.approx(_losses(tmp_path / "runs" / "one"), rel=1e-5)
    single = {n: p.detach() for n, p in one.model.named_parameters() if "lora_" in n}
    sharded = load_file(tmp_path / "two" / "rank0.safetensors")
    assert single.keys() == sharded.keys()
    assert [n for n, w in single.items() if "lora_B" in n and w.abs().max() > 0]  # the weights trained
    for name, w in single.items():
        assert torch.allclose(sharded[name], w, rtol=0, atol=5e-3), name
