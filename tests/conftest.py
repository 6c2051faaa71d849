"""Shared test helpers: a tiny LoRA model, toy examples and a real ``StageInfo`` for strategy tests.

``make_stage`` builds ``batches``/``loss_fn`` with ``continual_ft.train.protocol``, as the runner does, so a
strategy tested here sees the same batches it sees in a run.
"""

from __future__ import annotations

import pytest
import torch

from continual_ft.config import LoraConfig
from continual_ft.data.tasks import Example
from continual_ft.model.adapters import start_stage
from continual_ft.model.loading import load_model
from continual_ft.strategies import StageInfo
from continual_ft.train.batching import Encoder
from continual_ft.train.protocol import Batches, stage_info

DEFAULT_LABELS = ("yes", "no")


def make_examples(task: str, n: int, labels=DEFAULT_LABELS) -> list[Example]:
    """``n`` distinct toy examples of ``task``, answers cycling through ``labels``."""
    return [
        Example(
            task, f"{task} item {i}: is it {labels[i % len(labels)]}?\n\nAnswer:", labels[i % len(labels)], f"{task}{i}"
        )
        for i in range(n)
    ]


def make_stage(
    model, tokenizer, index: int, examples: list[Example], batch_size: int = 4, max_length: int = 64
) -> StageInfo:
    """A ``StageInfo`` over ``examples`` with the runner's real ``batches`` and ``loss_fn`` (fp32, model's device)."""
    encoder = Encoder(tokenizer, max_length, chat_template=False)
    batches = Batches(encoder, batch_size, next(model.parameters()).device)
    return stage_info(index, list(dict.fromkeys(e.task for e in examples)), examples, batches)


@pytest.fixture
def tiny_model_and_tokenizer():
    """A fresh tiny Llama with one trainable LoRA adapter (``adapter=continue``, stage 0), and its tokenizer.

    Add a stage adapter with ``start_stage(model, "new", 1, LoraConfig())`` to test ``adapter=new``.
    """
    torch.manual_seed(0)
    model, tokenizer = load_model("tiny", seed=0)
    model = start_stage(model, "continue", 0, LoraConfig())
    return model, tokenizer
