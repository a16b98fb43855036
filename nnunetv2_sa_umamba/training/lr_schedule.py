"""Learning-rate schedule of the SA-UMamba trainers: linear warm-up, then cosine or poly decay.

Stepped once per epoch with the epoch number, like nnU-Net's PolyLRScheduler, so the value depends only on the
epoch and a resumed run (--c) continues exactly where it stopped.
"""
from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import _LRScheduler

# The released code trains AdamW at 1e-3 with batch 32; smaller batches (nnU-Net plans 2-3 for small datasets) were
# unstable at that rate.
REFERENCE_BATCH_SIZE = 32
WARMUP_FRACTION = 0.05  # of the run's epochs
MAX_WARMUP_EPOCHS = 10


def batch_scaled_lr(base_lr: float, batch_size: int, reference_batch_size: int = REFERENCE_BATCH_SIZE) -> float:
    """``base_lr * sqrt(batch_size / reference_batch_size)``, never above ``base_lr``.

    Square-root scaling keeps the update's noise roughly constant for adaptive optimizers; it gives 3.1e-4 at batch
    3, the rate that trained stably where 1e-3 oscillated (docs/RESULTS.md)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    return base_lr * min(1.0, math.sqrt(batch_size / reference_batch_size))


def warmup_epochs_for(num_epochs: int) -> int:
    """5 % of the run (at least one epoch, at most 10), and always at least one epoch of decay after it."""
    return max(0, min(MAX_WARMUP_EPOCHS, math.ceil(WARMUP_FRACTION * num_epochs), num_epochs - 1))


class WarmupDecayLRScheduler(_LRScheduler):
    """Epoch e < warmup: ``initial_lr * (e + 1) / (warmup + 1)``; then cosine from ``initial_lr`` to ``min_lr``
    ("cosine", the paper's AdamW recipe) or ``initial_lr * (1 - progress) ** 0.9`` ("poly", nnU-Net's SGD recipe)
    over the remaining epochs up to ``max_steps``."""

    def __init__(self, optimizer: torch.optim.Optimizer, initial_lr: float, max_steps: int, warmup_steps: int = 0,
                 decay: str = "cosine", min_lr: float = 0.0):
        if decay not in ("cosine", "poly"):
            raise ValueError(f"decay must be 'cosine' or 'poly', not {decay!r}")
        if not 0 <= warmup_steps < max_steps:
            raise ValueError(f"warmup_steps must be in [0, max_steps={max_steps}), got {warmup_steps}")
        self.initial_lr, self.max_steps, self.warmup_steps = initial_lr, max_steps, warmup_steps
        self.decay, self.min_lr = decay, min_lr
        self.ctr = 0
        super().__init__(optimizer, -1)

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.initial_lr * (step + 1) / (self.warmup_steps + 1)
        decay_steps = self.max_steps - self.warmup_steps
        progress = min(step - self.warmup_steps, decay_steps) / decay_steps
        if self.decay == "poly":
            return self.initial_lr * (1 - progress) ** 0.9
        return self.min_lr + (self.initial_lr - self.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))

    def step(self, current_step: int | None = None) -> None:
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(current_step)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def get_last_lr(self) -> list[float]:
        return self._last_lr
