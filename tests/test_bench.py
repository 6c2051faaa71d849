"""The benchmarks run end to end on tiny models and report both variants; the random architectures are SmolLM2's."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench" / "throughput.py"
sys.path.insert(0, str(BENCH.parent))

from mfu import flops_per_token, known_peak_tflops, measure_matmul_tflops  # noqa: E402
from random_arch import ARCHS, arch_config, build_random  # noqa: E402
from throughput import parse_args  # noqa: E402


def test_throughput_bench_tiny(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(BENCH), "--model", "tiny", "--examples", "32", "--steps", "4", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ours/baseline real tokens/s" in proc.stdout
    results = json.loads(out.read_text())
    variants = results["variants"]
    assert set(variants) == {"ours", "baseline"}
    for r in variants.values():  # 2 warm-up steps before the timed run, which is timed whole
        assert r["steps"] == r["timed_steps"] == 4 and r["warmup_steps_excluded"] == 0
        assert r["tokens_per_s"] > 0 and r["real_tokens"] > 0 and r["seconds"] > 0
        assert r["peak_memory_mb"] > 0
        assert r["real_tokens"] <= r["padded_tokens"]
        assert r["tflops"] > 0 and r["median"]["tokens_per_s"] == r["tokens_per_s"] and r["device_name"]
    assert variants["ours"]["pid"] != variants["baseline"]["pid"]  # each in its own process
    # 32 examples, batch 8, 4 steps = one epoch each: the very same tokens were trained on, and timed (the
    # warm-up is a run of its own on the same examples in both, not the first batches, which differ).
    assert variants["ours"]["all_steps_real_tokens"] == variants["baseline"]["all_steps_real_tokens"]
    assert variants["ours"]["real_tokens"] == variants["baseline"]["real_tokens"]
    assert results["same_tokens_all_steps"]
    # --baseline auto: the typical GPU script on CUDA (bf16 weights, bf16=True), the typical CPU one elsewhere
    assert variants["baseline"]["precision"] == ("bf16" if torch.cuda.is_available() else "fp32")
    # The usual model FLOPs belong to the model and the data; the FLOPs computed leave out the logits ours skips.
    ours, base = variants["ours"], variants["baseline"]
    assert ours["model_flops_per_token"] == base["model_flops_per_token"] == base["flops_per_token"]
    assert base["projected_share"] == 1 and 0 < ours["projected_share"] < 1
    assert ours["flops_per_token"] == pytest.approx(
        ours["model_flops_per_token"] - 4 * ours["vocab_params"] * (1 - ours["projected_share"])
    )
    assert ours["fraction_of_peak"] < ours["model_fraction_of_peak"]
    assert results["ratio_tokens_per_s"] > 0
    # On a CPU (no data-sheet peak) the fraction of peak is against the bf16 matmul speed measured before the runs.
    measured = results["measured_matmul_tflops"]
    assert measured["bf16"] > 0 and measured["fp32"] > 0 and "measured dense matmul" in proc.stdout
    # On a known GPU, the card's data-sheet bf16 peak instead.
    known = known_peak_tflops(torch.cuda.get_device_name()) if torch.cuda.is_available() else None
    for r in variants.values():
        assert r["peak_tflops"] == (known if known is not None else measured["bf16"])
        assert r["fraction_of_peak"] == pytest.approx(r["tflops"] / r["peak_tflops"])


def test_packed_rows_count_their_real_tokens(tmp_path):
    """Ours with a token budget and packing (rows rounded up to the pad multiple) trains on exactly the
    baseline's real tokens: the meter leaves a packed row's fill out, as StageStats does."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(BENCH), "--model", "tiny", "--examples", "16", "--json", str(out)]  # one epoch each
    cmd += ["--set", "train.max_tokens=512", "--set", "train.packing=true", "--set", "train.pad_to_multiple_of=64"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    variants = json.loads(out.read_text())["variants"]
    assert variants["ours"]["all_steps_real_tokens"] == variants["baseline"]["all_steps_real_tokens"]


def test_step_timer_leaves_the_fill_of_a_packed_row_out():
    from meters import StepTimer

    from continual_ft.train.batching import Encoded, collate_packed

    items = [Encoded((5, 6, 7), (8, 2), "a"), Encoded((9, 10), (2,), "a")]
    model = torch.nn.Linear(1, 1)
    for pad in (0, 2):  # 2: the pad token is also the answers' end, as where pad = EOS
        timer = StepTimer(model, torch.device("cpu"), pad_id=pad)
        try:
            for multiple, fill in ((1, 0), (16, 8), (4, 0)):  # 8 real tokens: rounded to 16 adds 8, to 4 none
                batch = collate_packed(items, pad, multiple)
                timer.real = timer.padded = timer.projected = 0
                kwargs = {k: batch[k] for k in ("input_ids", "position_ids", "logits_to_keep")}
                timer._forward(model.train(), (), kwargs)
                assert (timer.real, timer.padded) == (8, 8 + fill)
                # logits for the 3 positions that predict an answer token, and the row's last one if it is real
                assert timer.projected == 3 + (fill == 0)
        finally:
            timer.close()


def test_step_timer_counts_the_real_tokens_whose_logits_are_computed():
    """Left-padded rows with ``logits_to_keep`` (ours: an int or the indices of the last positions) project
    only those positions' real tokens; a plain forward (the HF Trainer's) projects every real token."""
    from meters import StepTimer

    from continual_ft.train.batching import Encoded, collate
    from continual_ft.train.losses import model_inputs

    items = [Encoded((5, 6, 7, 8), (9, 2), "a"), Encoded((4,), (2,), "a")]  # 6 and 2 real tokens, width 6
    batch = collate(items, 0)
    model = torch.nn.Linear(1, 1).train()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    timer = StepTimer(model, torch.device("cpu"))
    try:
        for keep in (batch["logits_to_keep"], model_inputs(batch)["logits_to_keep"]):  # 3, then its indices
            timer.real = timer.projected = 0
            timer._forward(model, (), {**inputs, "logits_to_keep": keep})
            assert (timer.real, timer.projected) == (8, 3 + 2)  # the short row has 2 real tokens among the last 3
        timer.real = timer.projected = 0
        timer._forward(model, (), inputs)
        assert timer.projected == timer.real == 8
    finally:
        timer.close()


def test_random_arch_bench_runs_without_datasets(tmp_path):
    """--arch with --save-random, both variants (baseline bf16) in processes where `import datasets` fails."""
    blocker = tmp_path / "site"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['datasets'] = None  # import datasets fails\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), os.environ.get("PYTHONPATH", "")])}
    probe = subprocess.run([sys.executable, "-c", "import datasets"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "datasets" in probe.stderr  # the blocker works, children inherit it

    ckpt, out = tmp_path / "ckpt", tmp_path / "bench.json"
    cmd = [sys.executable, str(BENCH), "--arch", "smollm2-135m", "--layers", "2", "--tokenizer", "tiny"]
    cmd += ["--save-random", str(ckpt), "--baseline", "bf16", "--examples", "8", "--batch-size", "4"]
    cmd += ["--warmup-steps", "1", "--set", "lora.r=4", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]

    config = json.loads((ckpt / "config.json").read_text())
    shapes = {k: config[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")}
    assert shapes == {k: ARCHS["smollm2-135m"][k] for k in shapes}
    assert config["num_hidden_layers"] == 2 and config["vocab_size"] == 49152 and config["tie_word_embeddings"]
    assert json.loads((ckpt / "random_arch.json").read_text())["arch"] == "smollm2-135m"

    results = json.loads(out.read_text())
    ours, base = results["variants"]["ours"], results["variants"]["baseline"]
    assert base["precision"] == "bf16" and "bf16=True" in base["recipe"]
    assert ours["steps"] == base["steps"] == 2 and results["same_tokens_all_steps"]
    assert ours["model_flops_per_token"] == base["model_flops_per_token"] == base["flops_per_token"]
    assert ours["flops_per_token"] < base["flops_per_token"]  # the vocabulary projection of prompt tokens skipped
    assert ours["lora_params"] == 2 * 4 * sum(  # r=4 from --set reached both variants
        (576 + out_features) for out_features in (576, 192, 192, 576, 1536, 1536)
    ) + 2 * 4 * (1536 + 576)
    assert "smollm2-135m (random weights, 2 layers)" in proc.stdout

    # model=<dir> loads it as any local checkpoint: what `continual-ft run model=<dir>` does.
    from continual_ft.model.loading import load_model

    model, tokenizer = load_model(str(ckpt))
    assert model.config.num_hidden_layers == 2 and len(tokenizer) == 400


@pytest.mark.parametrize(
    ("arch", "params"), [("smollm2-135m", 134_515_008), ("smollm2-360m", 361_821_120), ("smollm2-1.7b", 1_711_376_384)]
)
def test_random_arch_has_the_published_parameter_count(arch, params):
    with torch.device("meta"):  # shapes only: no memory, no time
        model = build_random(arch, None, torch.device("meta"))
    assert sum(p.numel() for p in model.parameters()) == params
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as SmolLM2


def test_random_arch_is_seeded_and_in_bf16():
    a, b = (build_random("smollm2-135m", None, torch.device("cpu"), seed=3, layers=1) for _ in range(2))
    assert next(a.parameters()).dtype == torch.bfloat16
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    c = build_random("smollm2-135m", None, torch.device("cpu"), seed=4, layers=1)
    assert not torch.equal(a.model.layers[0].mlp.up_proj.weight, c.model.layers[0].mlp.up_proj.weight)


def test_flops_per_token_is_4n_plus_lora_plus_attention():
    from peft import LoraConfig, get_peft_model

    config = arch_config("smollm2-135m", layers=1)
    with torch.device("meta"):
        from transformers import LlamaForCausalLM

        model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=2, target_modules=["q_proj"]))
    d, kv, v = 576, 192, 49152
    n = d * d + 2 * d * kv + d * d + 3 * d * 1536 + v * d  # one layer's projections + the (tied) vocabulary projection
    context = (3 * 4 / 2 + 5 * 6 / 2) / 8
    full = 4 * n + 6 * 2 * (d + d) + 12 * 1 * d * context
    for projected in (1.0, 0.25):  # every token's logits (a plain forward), a quarter of them (logits_to_keep)
        work = flops_per_token(model, [3, 5], projected)
        assert work["matmul_params"] == n and work["lora_params"] == 2 * (d + d) and work["vocab_params"] == v * d
        assert work["mean_causal_context"] == context
        assert work["model_flops_per_token"] == full
        assert work["flops_per_token"] == full - 4 * v * d * (1 - projected)


def test_measured_matmul_peak_counts_the_flops_of_a_product():
    """2·n³ FLOPs over the median time: a slower dtype or a smaller thread count gives a smaller figure, never 0."""
    tflops = measure_matmul_tflops(torch.device("cpu"), torch.float32, size=256, repeat=3)
    assert 1e-4 < tflops < 1e3


def test_known_gpu_peaks():
    assert known_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert known_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert known_peak_tflops("NVIDIA H200") == 989.0
    assert known_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert known_peak_tflops("AMD EPYC") is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--set", "train.lr=0.1"], "use --lr"),
        (["--set", "quick=true"], "not used here"),
        (["--set", "train.no_such_key=1"], "not in 'TrainConfig'"),
        (["--model", "tiny", "--arch", "smollm2-135m"], "not both"),
        (["--layers", "2"], "need --arch"),
    ],
)
def test_bad_options_fail_before_any_run(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_set_reaches_ours_config():
    from throughput import run_config

    config = run_config(parse_args(["--set", "train.max_tokens=4096", "--set", "train.packing=true", "--lr", "3e-4"]))
    assert config.train.max_tokens == 4096 and config.train.packing and config.train.lr == 3e-4


OVERHEAD = BENCH.parent / "strategy_overhead.py"


def test_strategy_overhead_bench_tiny(tmp_path):
    out = tmp_path / "overhead.json"
    cmd = [sys.executable, str(OVERHEAD), "--model", "tiny", "--batches", "8", "--warmup", "0", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    variants = json.loads(out.read_text())["variants"]
    assert set(variants) == {
        *("naive", "ewc", "lwf", "lwf (fraction=1)", "naive (adapter=new)", "olora"),
        *("agem", "agem (reference_every=8)", "agem (reference_batch=2)", "ssr", "ssr (samples=1)"),
        "magmax (merge_final)",
    }
    every8 = variants["agem (reference_every=8)"]  # one step in eight pays the reference pass: timed by the mean
    assert every8["step_seconds"] == every8["step_seconds_mean"] != every8["step_seconds_median"]
    assert variants["agem"]["step_seconds"] == variants["agem"]["step_seconds_median"]  # every step pays
    for name in ("naive", "naive (adapter=new)"):  # each baseline against itself
        assert variants[name]["step_ratio"] == 1.0 and variants[name]["stage_overhead"] == 1.0
    assert variants["olora"]["baseline"] == "naive (adapter=new)" and variants["ewc"]["baseline"] == "naive"
    assert variants["ewc"]["once_per_stage_seconds"] > 0  # the Fisher pass is timed and counted
    assert variants["ewc"]["stage_overhead"] > variants["ewc"]["step_ratio"]
    assert variants["ssr"]["once_per_stage_seconds"] > 0  # writing the synthetic examples is counted
    written = json.loads(out.read_text())["ssr"]  # each SSR variant's own writing
    assert set(written) == {"ssr", "ssr (samples=1)"} and all(w["generate_seconds"] > 0 for w in written.values())
    assert variants["magmax (merge_final)"]["once_per_stage_seconds"] > 0  # and merging the stage adapters
    assert all(v["step_seconds_median"] > 0 and v["s_per_1k_tokens"] > 0 for v in variants.values())
    assert "stage" in proc.stdout


def test_strategy_overhead_only_times_the_named_variants_and_their_baselines(tmp_path):
    out = tmp_path / "overhead.json"
    cmd = [sys.executable, str(OVERHEAD), "--model", "tiny", "--batches", "2", "--warmup", "0", "--json", str(out)]
    only = ["--only", "agem (reference_batch=2),olora"]
    proc = subprocess.run([*cmd, *only], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["variants"]) == {"naive", "agem (reference_batch=2)", "naive (adapter=new)", "olora"}
    assert result["ssr"] is None  # SSR's writing was not run
    # A-GEM's cost is its reference batch: 2 examples of the first stage, in tokens, beside the step's
    agem = result["variants"]["agem (reference_batch=2)"]
    assert 2 <= agem["reference_tokens"] <= 2 * 256 and "reference batch ~" in proc.stdout
    bad = subprocess.run([*cmd, "--only", "agem,nope"], capture_output=True, text=True, timeout=180)
    assert bad.returncode != 0 and "unknown variants ['nope']" in bad.stderr and "Traceback" not in bad.stderr


def test_save_random_never_overwrites_a_checkpoint(tmp_path):
    from random_arch import save_random

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="already holds a checkpoint"):
        save_random(None, None, tmp_path, {})


def test_compile_probe_bench_tiny(tmp_path):
    out = tmp_path / "probe.json"
    probe = BENCH.parent / "compile_probe.py"
    cmd = [sys.executable, str(probe), "--model", "tiny", "--steps", "3", "--warmup", "1", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["mode"] == "eager" and result["tokens_per_s"] > 0 and result["first_step_seconds"] > 0
    assert proc.stderr.count("[eager] step") == 3


def test_kill_and_resume_kills_at_a_seeded_point_between_checkpoints(tmp_path):
    """The killed run dies a seeded random fraction of a checkpoint interval after the checkpoint at --step,
    not right after it; the steps it did since are trained again by the resume, which ends with the same R."""
    import random

    from toy import write_toy_scenario

    scenario = write_toy_scenario(tmp_path / "data", n=80, train=32, test=4)
    script = BENCH.parent / "kill_and_resume.py"
    cmd = [sys.executable, str(script), "--every", "4", "--step", "8", "--seed", "0"]
    cmd += ["--json", str(tmp_path / "k.json")]
    cmd += ["--", f"scenario={scenario}", "model=tiny", "train.max_steps=16", "train.batch_size=4"]
    cmd += ["precision=fp32", "output_dir=runs", "name=k"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "k.json").read_text())
    assert out["kill_fraction"] == random.Random(0).random() > 0.5  # seed 0 draws 0.84 of an interval
    assert out["R_equal"] and len(out["parts"]) == 2
    # Up to --every steps since the checkpoint: on a busy machine the kill can fall after the next step is done
    # but before its checkpoint is written, and the resume trains all of them again.
    assert out["checkpoint_step"] in (8, 12) and 0 <= out["steps_trained_again"] <= 4
    if out["checkpoint_step"] == 8:  # the usual case: the kill fell before the next checkpoint
        assert out["killed_seconds_after_checkpoint"] >= 0.9 * out["kill_fraction"] * out["checkpoint_interval_s"]
        assert out["steps_done_at_kill"] > 8  # steps lost, as a kill between checkpoints loses them
    bad = subprocess.run([sys.executable, str(script), "--every", "4", "--step", "4", "--", "name=x"], cwd=tmp_path)
    assert bad.returncode == 2 and not (tmp_path / "runs" / "x").exists()
