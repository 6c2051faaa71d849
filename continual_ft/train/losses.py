"""The losses every loop shares: summed answer-token cross-entropy, and its per-token mean.

The model computes logits only for the last ``logits_to_keep`` positions of a left-padded
batch (see :mod:`continual_ft.train.batching`), so the vocabulary projection never runs for prompt
tokens, the part of the forward pass we never score.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

__all__ = [
    "model_inputs",
    "cache_kwarg",
    "cache_of",
    "last_positions",
    "answer_logits",
    "token_loss",
    "mean_token_loss",
]


def cache_kwarg(model) -> str:
    """transformers 5.x renames ``past_key_values`` to ``cache``; use whichever the model takes."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def cache_of(outputs):
    """The KV cache a forward with ``use_cache=True`` returned, under either name."""
    return outputs.cache if hasattr(outputs, "cache") else outputs.past_key_values


def last_positions(n: int, width: int, device=None) -> torch.Tensor:
    """``logits_to_keep`` for the last ``n`` of ``width`` positions, as a tensor of indices.

    transformers slices the hidden states with an int (``hidden[:, -n:]``), a strided view that
    ``matmul`` cannot fold into one matrix product: it runs a batched product over a copy of the
    whole vocabulary matrix per row (seen on CPU: a third of an evaluation's time in that copy).
    Indices gather the rows into a contiguous tensor instead: one plain product, the same logits.
    """
    return torch.arange(width - n, width, device=device)


def model_inputs(batch: dict) -> dict:
    """What the model's forward takes from a batch (a packed one has no attention mask).

    ``use_cache=False``: a training forward needs no KV cache, and with one transformers would not
    read restarting ``position_ids`` as packed sequences (``masking_utils.find_packed_sequence_indices``).
    """
    keys = ("input_ids", "attention_mask", "position_ids", "logits_to_keep")
    inputs = {**{k: batch[k] for k in keys if k in batch}, "use_cache": False}
    if isinstance(inputs.get("logits_to_keep"), int):
        ids = inputs["input_ids"]
        inputs["logits_to_keep"] = last_positions(inputs["logits_to_keep"], ids.shape[1], ids.device)
    return inputs


def answer_logits(outputs, batch: dict) -> torch.Tensor:
    """The logits that predict ``batch["labels"]``, position for position (padded or packed batches alike).

    ``outputs``: the model's outputs, or their logits.
    """
    logits = outputs if isinstance(outputs, torch.Tensor) else outputs.logits
    return logits[:, -(batch["labels"].shape[1] + 1) : -1]


def token_loss(model, batch: dict) -> tuple[torch.Tensor, int, object]:
    """Summed cross-entropy over answer tokens, the answer-token count, and the model outputs.

    Summing (not averaging) lets the caller normalise by the token count of a whole
    optimizer step, so batch 8 × accumulation 1 equals batch 1 × accumulation 8.
    """
    outputs = model(**model_inputs(batch))
    logits = answer_logits(outputs, batch).float()
    labels = batch["labels"].to(logits.device)
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100, reduction="sum")
    return loss, int((labels != -100).sum()), outputs


def mean_token_loss(model, batch: dict) -> torch.Tensor:
    """Mean cross-entropy per answer token of one batch (the loss strategies see)."""
    loss, n, _ = token_loss(model, batch)
    return loss / max(n, 1)
