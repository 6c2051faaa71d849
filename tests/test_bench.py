"""The throughput benchmark runs end to end on the tiny model and reports both variants."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "throughput.py"


def test_throughput_bench_tiny(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(BENCH), "--model", "tiny", "--examples", "32", "--steps", "4", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ours/baseline real tokens/s" in proc.stdout
    results = json.loads(out.read_text())
    variants = results["variants"]
    assert set(variants) == {"ours", "baseline"}
    for r in variants.values():
        assert r["steps"] == 4 and r["timed_steps"] == 2 and r["warmup_steps_excluded"] == 2
        assert r["tokens_per_s"] > 0 and r["real_tokens"] > 0 and r["seconds"] > 0
        assert r["peak_memory_mb"] > 0
        assert r["real_tokens"] <= r["padded_tokens"]
    assert variants["ours"]["pid"] != variants["baseline"]["pid"]  # each in its own process
    # 32 examples, batch 8, 4 steps = one epoch each: the very same tokens were trained on.
    assert variants["ours"]["all_steps_real_tokens"] == variants["baseline"]["all_steps_real_tokens"]
    assert results["ratio_tokens_per_s"] > 0


OVERHEAD = BENCH.parent / "strategy_overhead.py"


def test_strategy_overhead_bench_tiny(tmp_path):
    out = tmp_path / "overhead.json"
    cmd = [sys.executable, str(OVERHEAD), "--model", "tiny", "--batches", "2", "--warmup", "1", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    variants = json.loads(out.read_text())["variants"]
    assert set(variants) == {"naive", "ewc", "lwf", "lwf (fraction=1)", "naive (adapter=new)", "olora"}
    for name in ("naive", "naive (adapter=new)"):  # each baseline against itself
        assert variants[name]["step_ratio"] == 1.0 and variants[name]["stage_overhead"] == 1.0
    assert variants["olora"]["baseline"] == "naive (adapter=new)" and variants["ewc"]["baseline"] == "naive"
    assert variants["ewc"]["once_per_stage_seconds"] > 0  # the Fisher pass is timed and counted
    assert variants["ewc"]["stage_overhead"] > variants["ewc"]["step_ratio"]
    assert all(v["step_seconds_median"] > 0 and v["s_per_1k_tokens"] > 0 for v in variants.values())
    assert "stage" in proc.stdout
