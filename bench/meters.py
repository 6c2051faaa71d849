"""The meters both variants of ``throughput.py`` are measured with, in their own process: memory and step times.

The same hooks time both variants: a forward pre-hook counts real (attention-mask) tokens, and a global
``torch.optim.Optimizer.step`` post-hook timestamps every optimizer step.
"""

from __future__ import annotations

import os
import time


class Memory:
    """Peak memory of this process, and of the training alone where the peak can be reset.

    The run's own meters (``continual_ft.run.runner.peak_memory_mb`` / ``reset_peak_memory``): CPU, peak
    resident set size (VmHWM, reset through ``/proc/self/clear_refs`` on Linux); CUDA, the caching
    allocator's ``max_memory_allocated``. ``train_peak_mb`` is the peak from just before training.
    """

    def __init__(self, device):
        self.device = device
        self.before = 0.0
        self.resettable = device.type == "cuda" or os.access("/proc/self/clear_refs", os.W_OK)

    def start(self) -> None:
        from continual_ft.run.runner import peak_memory_mb, reset_peak_memory

        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
        self.before = peak_memory_mb(self.device)
        reset_peak_memory(self.device)

    def finish(self) -> dict:
        from continual_ft.run.runner import peak_memory_mb

        during = peak_memory_mb(self.device)
        return {
            "peak_memory_mb": max(self.before, during),
            "train_peak_memory_mb": during if self.resettable else None,
            "memory_kind": "cuda max_memory_allocated" if self.device.type == "cuda" else "peak RSS",
        }


class StepTimer:
    """Timestamps every optimizer step and counts real tokens per step, identically for both variants.

    A forward pre-hook on the model adds up the attention mask of every training forward (real tokens), its
    size (padded tokens) and the real tokens whose logits the forward computes (projected tokens: those
    ``logits_to_keep`` keeps, every real token without it); a global post-hook on
    ``torch.optim.Optimizer.step`` closes the step. A packed row has no mask: its real tokens are all but
    the fill that rounds it up to the pad multiple, the last segment (``position_ids`` restart there) when it
    holds nothing but ``pad_id``.
    """

    def __init__(self, model, device, pad_id: int | None = None):
        import torch
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.device = device
        self.pad_id = pad_id
        self.real = self.padded = self.projected = 0
        self.step_real: list[int] = []
        self.step_padded: list[int] = []
        self.step_projected: list[int] = []
        self.stamps: list[float] = []
        self.start_time = 0.0
        self._handles = [
            model.register_forward_pre_hook(self._forward, with_kwargs=True),
            register_optimizer_step_post_hook(self._step),
        ]
        self._torch = torch

    def _forward(self, module, args, kwargs):
        if not (module.training and self._torch.is_grad_enabled()):
            return
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids", args[0] if args else None)
        if mask is None:
            mask = self._torch.ones_like(ids)
            fill = self._fill(ids, kwargs.get("position_ids"))
            if fill:
                mask[:, -fill:] = 0
        self.real += int(mask.sum())
        self.padded += mask.numel()
        keep = kwargs.get("logits_to_keep")
        if isinstance(keep, int):  # transformers: the last ``keep`` positions, 0 for all of them
            keep = slice(-keep, None) if keep else slice(None)
        self.projected += int(mask[:, keep if keep is not None else slice(None)].sum())

    def _fill(self, ids, positions) -> int:
        """Pad tokens that end a packed row (``collate_packed``'s rounding), 0 for anything else."""
        if positions is None or self.pad_id is None or ids.shape[0] != 1:
            return 0
        starts = (positions[0] == 0).nonzero()
        tail = ids[0, int(starts[-1]) :] if len(starts) else ids[0]
        return tail.numel() if bool((tail == self.pad_id).all()) and tail.numel() < ids.numel() else 0

    def _step(self, optimizer, args, kwargs):
        # Only torch's own optimizers: a wrapper (accelerate's AcceleratedOptimizer) must not count twice.
        if not type(optimizer).__module__.startswith("torch.optim"):
            return
        if self.device.type == "cuda":
            self._torch.cuda.synchronize(self.device)
        self.stamps.append(time.perf_counter())
        self.step_real.append(self.real)
        self.step_padded.append(self.padded)
        self.step_projected.append(self.projected)
        self.real = self.padded = self.projected = 0

    def begin(self) -> None:
        self.start_time = time.perf_counter()

    def close(self) -> None:
        for h in self._handles:
            h.remove()

    def summary(self, warmup: int) -> dict:
        steps = len(self.stamps)
        if steps == 0:
            raise RuntimeError("no optimizer step was seen: nothing to time")
        skip = warmup if steps > warmup else 0  # too few steps to leave any out: time them all
        t0 = self.stamps[skip - 1] if skip else self.start_time
        seconds = self.stamps[-1] - t0
        real, padded = sum(self.step_real[skip:]), sum(self.step_padded[skip:])
        projected = sum(self.step_projected[skip:])
        return {
            "steps": steps,
            "timed_steps": steps - skip,
            "warmup_steps_excluded": skip,
            "real_tokens": real,
            "padded_tokens": padded,
            "padding_fraction": 1 - real / padded if padded else 0.0,
            "projected_tokens": projected,  # real tokens whose logits were computed (mfu's p = projected / real)
            "projected_share": projected / real if real else 0.0,
            "seconds": seconds,
            "tokens_per_s": real / seconds if seconds > 0 else 0.0,
            "all_steps_real_tokens": sum(self.step_real),
            # per-step wall times (all steps, the first from the start of training): shows warm-up and noise
            "step_seconds": [b - a for a, b in zip([self.start_time] + self.stamps[:-1], self.stamps)],
        }
