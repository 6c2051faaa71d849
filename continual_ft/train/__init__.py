"""Training a stage: the hook protocol every loop follows, and our own loop.

- :mod:`~continual_ft.train.protocol`: the one order of strategy hooks (``run_stage``, ``after_backward``, ...)
- :mod:`~continual_ft.train.loop`: our trainer, one stage in named steps
- :mod:`~continual_ft.train.checkpoint`: the latest checkpoint inside a stage, its progress as one dataclass
- :mod:`~continual_ft.train.batching`: examples to token batches (prompt format, answer-only labels, length grouping)
- :mod:`~continual_ft.train.losses`: the answer-token losses every loop shares
- :mod:`~continual_ft.train.generation`: batched sampling with a KV cache (strategies that write text)
- :mod:`~continual_ft.train.precision`: ``precision=auto``, bf16 or fp32 by measurement
- :mod:`~continual_ft.train.distributed`: several processes (DDP, FSDP) through accelerate
"""
