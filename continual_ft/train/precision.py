"""``precision=auto``: the compute precision a run trains in, bf16 or fp32, and why.

On a GPU, bf16 where CUDA supports it. On a CPU the instruction flags cannot decide (issue 27): with
AVX512-BF16 and no AMX, a 2-core Intel Xeon ran bf16 matmuls at 0.58x its fp32 speed (training 1.42x slower
in bf16), while an AMD EPYC with the same flags ran them at 2.1x. So ``auto`` measures, once per machine:

    r = median bf16 matmul throughput / median fp32 matmul throughput        (same shapes, same threads)
    auto = bf16 if r >= 1.1 else fp32

fp32 is the more exact of the two, so bf16 has to be clearly faster (``BF16_MIN_SPEEDUP``). The probe
times, alternating the two precisions, the products one linear layer of the default model does on the
CPU micro-batch: the forward ``x @ Wᵀ`` and the input gradient ``g @ W`` (``PROBE_SHAPE``), in the thread
count the run trains with (0.4 s on a 2-core AMD EPYC). Its figures are cached in ``precision.json`` under
:func:`~continual_ft.model.loading.cache_dir`, keyed by CPU model, thread count, torch version and probe shape,
so later runs pay nothing; delete the file to measure again.

Nothing here stops a run: a probe that raises falls back to fp32 with the reason in one line, an
unreadable or corrupt cache is measured again and rewritten, and an unwritable cache folder leaves the
measurement used but not kept. An explicit ``bf16`` or ``fp32`` is kept as it is, without a probe.
Several processes: the first decides and the others take its choice (:meth:`Dist.broadcast`).
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import torch

from continual_ft.files import write_json
from continual_ft.model.loading import cache_dir

__all__ = ["PrecisionChoice", "choose_precision", "pick", "measure", "probe_key", "BF16_MIN_SPEEDUP", "PROBE_SHAPE"]

#: bf16 must run the probe's matmuls at least this many times faster than fp32 to be chosen.
BF16_MIN_SPEEDUP = 1.1
#: (tokens, in, out): trainer.CPU_MICRO_TOKENS padded tokens through SmolLM2-135M's MLP up-projection (576 -> 1536).
PROBE_SHAPE = (768, 576, 1536)
CACHE_FILE = "precision.json"


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision a run computes in (``bf16`` or ``fp32``), the reason, and the CPU probe's figures if one ran."""

    precision: str
    reason: str
    probe: dict | None = None  # bf16_tflops, fp32_tflops, ratio, cpu, threads, torch, shape, cached

    @property
    def line(self) -> str:
        return f"precision: {self.precision} ({self.reason})"


def pick(bf16_tflops: float, fp32_tflops: float) -> str:
    """The rule: bf16 only where its matmuls run at least ``BF16_MIN_SPEEDUP`` times as fast as fp32's."""
    return "bf16" if bf16_tflops >= BF16_MIN_SPEEDUP * fp32_tflops else "fp32"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _machine() -> dict:
    """What the probe's figures hold for: CPU model, thread count, torch version and the probe's shape."""
    return {
        "cpu": _cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "shape": list(PROBE_SHAPE),
    }


def probe_key(machine: dict) -> str:
    """The cache key of ``machine`` (:func:`_machine`)."""
    shape = "x".join(map(str, machine["shape"]))
    return f"{machine['cpu']} | threads={machine['threads']} | torch={machine['torch']} | shape={shape}"


def measure(repeat: int = 3, warmup: int = 2) -> tuple[float, float]:
    """(bf16, fp32) TFLOP/s of the forward and input-gradient products at ``PROBE_SHAPE`` on the CPU.

    The medians of ``repeat`` timings each, the two precisions alternating so that load from elsewhere
    falls on both alike; the first ``warmup`` rounds build oneDNN's kernels and are not counted.
    """
    m, k, n = PROBE_SHAPE
    gen = torch.Generator().manual_seed(0)
    fp32 = [torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen), torch.randn(m, n, generator=gen)]
    tensors = {"bf16": [t.bfloat16() for t in fp32], "fp32": fp32}
    times = {"bf16": [], "fp32": []}
    for i in range(warmup + repeat):
        for name, (x, w, g) in tensors.items():
            start = time.perf_counter()
            torch.mm(x, w.t())  # forward of a Linear(k, n)
            torch.mm(g, w)  # the gradient reaching its input
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    flops = 2 * 2 * m * k * n
    return flops / statistics.median(times["bf16"]) / 1e12, flops / statistics.median(times["fp32"]) / 1e12


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _short(e: BaseException) -> str:
    text = (str(e).splitlines() or [""])[0][:120]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _read_cache(path) -> tuple[dict, str | None]:
    """The cache's entries, and why it could not be read (None when it could, or when there is none)."""
    if not path.exists():
        return {}, None
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return {}, f"unreadable cache ({_short(e)})"
    if not isinstance(entries, dict):
        return {}, "unreadable cache (not a JSON object)"
    return entries, None


def _cpu_choice() -> PrecisionChoice:
    try:
        return _measured_choice()
    except Exception as e:  # the probe must never stop a run: fp32 is always correct
        return PrecisionChoice("fp32", f"the bf16/fp32 matmul probe failed, fp32 chosen ({_short(e)})")


def _measured_choice() -> PrecisionChoice:
    """From the cache, or probed now and cached."""
    path = cache_dir() / CACHE_FILE
    machine = _machine()
    key = probe_key(machine)
    entries, problem = _read_cache(path)
    entry = entries.get(key)
    cached = isinstance(entry, dict) and _positive(entry.get("bf16_tflops")) and _positive(entry.get("fp32_tflops"))
    notes = []
    if cached:
        bf16, fp32 = entry["bf16_tflops"], entry["fp32_tflops"]
        notes.append("cached")
    else:
        if problem or entry is not None:
            notes.append(f"measured again: {problem or 'bad cache entry'}")
        bf16, fp32 = measure()
        if not (_positive(bf16) and _positive(fp32)):
            raise ValueError(f"probe gave bf16 {bf16} and fp32 {fp32} TFLOP/s")
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        entries[key] = {"bf16_tflops": bf16, "fp32_tflops": fp32, "measured": stamp}
        try:
            write_json(path, entries)
        except OSError as e:
            notes.append(f"not cached: {e.strerror or type(e).__name__}")
    probe = {"bf16_tflops": bf16, "fp32_tflops": fp32, "ratio": bf16 / fp32, **machine, "cached": cached}
    reason = ", ".join([f"bf16 matmul {bf16 / fp32:.2f}x fp32 on this CPU", *notes])
    return PrecisionChoice(pick(bf16, fp32), reason, probe)


def _choice(precision: str, device: torch.device) -> PrecisionChoice:
    if precision != "auto":
        return PrecisionChoice(precision, "set explicitly")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return PrecisionChoice("bf16", "this GPU computes bf16")
        return PrecisionChoice("fp32", "this GPU has no bf16")
    if device.type != "cpu":
        return PrecisionChoice("fp32", f"no bf16 rule for {device.type} devices")
    return _cpu_choice()


def choose_precision(precision: str, device: torch.device, dist=None) -> PrecisionChoice:
    """``precision`` (``auto``, ``bf16`` or ``fp32``) resolved for ``device``; ``dist``: the run's processes,
    which all get the first one's choice (the others never probe)."""
    if dist is None or dist.world == 1 or precision != "auto" or device.type != "cpu":
        return _choice(precision, device)
    return dist.broadcast(_choice(precision, device) if dist.is_main else None)
