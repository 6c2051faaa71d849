"""SmolLM2's real architectures with seeded random weights: benchmarks at 1.7B scale that need no downloaded weights.

Each entry of :data:`ARCHS` holds the shapes of the Hugging Face checkpoint's ``config.json``
(``HuggingFaceTB/SmolLM2-{135M,360M,1.7B}``; the ``-Instruct`` models share them). With the SmolLM2
tokenizer (the one shipped with ``model=smollm2-135m``: the whole family uses it), every example has the
real model's token count, so a step does the real model's work; only the weights are random, which
changes the loss values, not the speed.

The model is built where it will run and in the dtype it runs in (a ``torch.device`` context and
``from_config(dtype=...)``): 1.7B in bf16 takes 3.4 GB there, and never exists as an fp32 copy in CPU memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

#: Shared by the whole SmolLM2 family.
_FAMILY = {
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "tie_word_embeddings": True,
}

#: ``--arch`` name -> the shapes of that checkpoint's config.json (head_dim 64 throughout).
ARCHS = {
    "smollm2-135m": {
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "rope_theta": 100000.0,
    },
    "smollm2-360m": {
        "hidden_size": 960,
        "intermediate_size": 2560,
        "num_hidden_layers": 32,
        "num_attention_heads": 15,
        "num_key_value_heads": 5,
        "rope_theta": 100000.0,
    },
    "smollm2-1.7b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 24,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "rope_theta": 130000.0,
    },
}

#: Written beside the weights, so a random checkpoint is never mistaken for a trained one.
NOTE_FILE = "random_arch.json"


def arch_config(name: str, tokenizer=None, layers: int = 0) -> LlamaConfig:
    """The ``LlamaConfig`` of ``name``; ``layers`` > 0 keeps only that many decoder layers (smoke tests)."""
    shapes = {**_FAMILY, **ARCHS[name]}
    if layers:
        shapes["num_hidden_layers"] = layers
    if tokenizer is not None:
        if len(tokenizer) > shapes["vocab_size"]:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, more than {name}'s {shapes['vocab_size']}")
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            shapes[key] = getattr(tokenizer, key)
    return LlamaConfig(**shapes)


def build_random(
    name: str, tokenizer, device: torch.device, dtype: torch.dtype = torch.bfloat16, seed: int = 0, layers: int = 0
):
    """A ``LlamaForCausalLM`` with ``name``'s shapes and seeded random weights, allocated on ``device`` in ``dtype``.

    The same seed, device and dtype give the same weights, in every process.
    """
    config = arch_config(name, tokenizer, layers)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def save_random(model, tokenizer, out_dir: str | Path, note: dict) -> Path:
    """Write a loadable checkpoint (config, safetensors weights, tokenizer) and :data:`NOTE_FILE` to ``out_dir``.

    ``model=<out_dir>`` then loads it like any local checkpoint, in the benchmark and in ``continual-ft run``.
    Refuses a folder that already holds a checkpoint rather than overwrite it.
    """
    from continual_ft.files import follow_umask

    out = Path(out_dir)
    if (out / "config.json").exists():
        raise FileExistsError(f"{out} already holds a checkpoint: run on it with --model {out}, or remove it")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / NOTE_FILE).write_text(json.dumps({**note, "weights": "random (seeded), not trained"}, indent=2) + "\n")
    follow_umask(out)  # safetensors writes its files 0600; the folder may be carried to and read on another machine
    return out
