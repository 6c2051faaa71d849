"""The losses every loop shares: summed answer-token cross-entropy, and its per-token mean.

The model computes logits only for the last ``logits_to_keep`` positions of a left-padded
batch (see :mod:`continual_ft.batching`), so the vocabulary projection never runs for prompt
tokens, the part of the forward pass we never score.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["model_inputs", "token_loss", "mean_token_loss"]


def model_inputs(batch: dict) -> dict:
    """What the model's forward takes from a :func:`~continual_ft.batching.collate` batch."""
    return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "logits_to_keep")}


def token_loss(model, batch: dict) -> tuple[torch.Tensor, int, object]:
    """Summed cross-entropy over answer tokens, the answer-token count, and the model outputs.

    Summing (not averaging) lets the caller normalise by the token count of a whole
    optimizer step, so batch 8 × accumulation 1 equals batch 1 × accumulation 8.
    """
    outputs = model(**model_inputs(batch))
    logits = outputs.logits[:, :-1].float()
    labels = batch["labels"].to(logits.device)
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100, reduction="sum")
    return loss, int((labels != -100).sum()), outputs


def mean_token_loss(model, batch: dict) -> torch.Tensor:
    """Mean cross-entropy per answer token of one batch (the loss strategies see)."""
    loss, n, _ = token_loss(model, batch)
    return loss / max(n, 1)
