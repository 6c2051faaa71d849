"""Model FLOPs per trained token for LoRA fine-tuning, the achieved TFLOP/s, and the fraction of the device's peak.

The standard dense-transformer estimate (full training: 6·N per token, Kaplan et al. 2020; PaLM's MFU),
with LoRA's frozen base weights, counting only the products a variant actually computes:

    F = 2·(N − N_vocab)  forward: one multiply-add per weight of every matrix product below the vocabulary
      + 2·(N − N_vocab)  backward: gradients of the activations through the frozen weights
                         (their weight gradients, the other 2·N of full training's 6·N, are never computed)
      + 4·N_vocab·p      the vocabulary projection, forward and backward, for the share p of real tokens
                         whose logits the variant computes
      + 6·N_lora         LoRA's A and B matrices: forward, activation gradients and weight gradients
      + 12·L·d_attn·c    attention (QKᵀ and AV): 4·L·d_attn·c forward, twice that backward

N: weights of every linear layer a forward runs (each layer's attention and MLP projections, and the vocabulary
projection, counted once when tied to the embedding; the embedding lookup and the norms are no matrix products).
N_vocab: the vocabulary projection's weights (vocabulary × hidden). N_lora: the LoRA weights. L: layers; d_attn:
heads × head dim. c: the mean causal context of a real token, Σ T(T+1)/2 / Σ T over the training examples'
lengths T. p: measured per variant on the timed steps (``meters.StepTimer``): a plain forward projects every
token (p = 1, the HF ``Trainer``'s); ours projects only the positions that predict an answer token
(``logits_to_keep``), p ≈ 0.2 on the legal examples. With p = 1, F is the usual 4·N + 6·N_lora + attention
(``model_flops_per_token``, the same for both variants): crediting ours with it would count the projection it
skips as work done.

Padding is counted in neither variant: both compute on it, neither learns from it; it shows in the real tokens/s
and in the padding share, not in F.
"""

from __future__ import annotations

from collections.abc import Sequence

FORMULA = "F = 4·(N − N_vocab) + 4·N_vocab·p + 6·N_lora + 12·L·d_attn·c"

#: Dense bf16 tensor-core peak in TFLOP/s (vendor data sheets, without sparsity), by a part of the device name.
#: Order matters: the first match wins ("H100 PCIe" before "H100").
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H200", 989.0),
    ("A100", 312.0),
)


def flops_per_token(model, lengths: Sequence[int], projected: float = 1.0) -> dict:
    """F (see the module docstring) of ``model`` (LoRA attached) trained on examples of these token ``lengths``,
    computing logits for the share ``projected`` of real tokens (p); ``model_flops_per_token`` is F at p = 1."""
    import torch

    head = model.get_output_embeddings()
    n = n_lora = n_vocab = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            if module.weight.requires_grad:
                n_lora += module.weight.numel()
            else:
                n += module.weight.numel()
                if module is head:
                    n_vocab = module.weight.numel()
    config = model.config
    layers = config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    d_attn = config.num_attention_heads * head_dim
    context = sum(t * (t + 1) / 2 for t in lengths) / max(sum(lengths), 1)
    attention = 12 * layers * d_attn * context
    rest = 6 * n_lora + attention
    return {
        "flops_per_token": 4 * (n - n_vocab) + 4 * n_vocab * projected + rest,
        "model_flops_per_token": 4 * n + rest,  # every token projected: the usual count, the same for any variant
        "flops_formula": FORMULA,
        "matmul_params": n,
        "vocab_params": n_vocab,
        "projected_share": projected,
        "lora_params": n_lora,
        "attention_flops_per_token": attention,
        "mean_causal_context": context,
    }


def device_name(device) -> str:
    """``torch.cuda.get_device_name`` on GPU; the CPU's model name from /proc/cpuinfo elsewhere."""
    import platform

    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def known_peak_tflops(name: str) -> float | None:
    """The dense bf16 peak of a known GPU, from its name; None for anything else (CPUs included)."""
    for part, peak in PEAK_BF16_TFLOPS:
        if part.lower() in name.lower():
            return peak
    return None


def measure_matmul_tflops(device, dtype, size: int | None = None, repeat: int = 5) -> float:
    """Dense matmul TFLOP/s this device reaches in ``dtype``: the median of ``repeat`` timed square products.

    A CPU has no data-sheet figure that torch reaches (AMX, AVX-512 BF16 or neither, and as many cores as the
    process is given), so the benchmark measures one in the variant's thread count: the fraction of it that a
    training step reaches is the share of the step that is matrix products at full speed.
    """
    import statistics
    import time

    import torch

    size = size or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    times = []
    for k in range(repeat + 2):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if k >= 2:  # the first two warm the kernels up
            times.append((time.perf_counter() - start) / 4)
    return 2 * size**3 / statistics.median(times) / 1e12


def achieved(flops_per_token: float, tokens_per_s: float, peak_tflops: float | None) -> dict:
    """TFLOP/s at ``tokens_per_s`` real tokens a second, and the fraction of ``peak_tflops`` (None without a peak)."""
    tflops = flops_per_token * tokens_per_s / 1e12
    return {
        "tflops": tflops,
        "peak_tflops": peak_tflops,
        "fraction_of_peak": tflops / peak_tflops if peak_tflops else None,
    }
