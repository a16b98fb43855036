"""Bookkeeping of training steps skipped because their loss or gradient was not finite.

A step whose loss or gradient norm is NaN/inf leaves the weights untouched (GradScaler skips it under fp16
autocast; the trainer skips it otherwise). One such step is harmless; many in a row mean the run has diverged, and
training stops with a message instead of producing a network that predicts background everywhere.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

MAX_CONSECUTIVE_SKIPPED_STEPS = 50


class NonFiniteTrainingError(RuntimeError):
    """Training diverged: too many consecutive steps had a non-finite loss or gradient."""


@dataclass
class SkippedStepCounter:
    """Counts skipped steps per epoch and in total; raises once ``max_consecutive`` steps in a row were skipped."""
    max_consecutive: int = MAX_CONSECUTIVE_SKIPPED_STEPS
    epoch_loss: int = 0
    epoch_gradient: int = 0
    total_loss: int = 0
    total_gradient: int = 0
    consecutive: int = 0
    last_values: tuple[float, float] = field(default=(0.0, 0.0))

    def record(self, loss: float, grad_norm: float) -> bool:
        """Account one step; True if it was skipped. ``grad_norm`` is the norm before clipping."""
        self.last_values = (loss, grad_norm)
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.consecutive = 0
            return False
        if not math.isfinite(loss):
            self.epoch_loss += 1
            self.total_loss += 1
        else:
            self.epoch_gradient += 1
            self.total_gradient += 1
        self.consecutive += 1
        return True

    @property
    def diverged(self) -> bool:
        return self.consecutive >= self.max_consecutive

    def divergence_message(self, epoch: int) -> str:
        loss, grad_norm = self.last_values
        return (f"Training stopped at epoch {epoch}: the last {self.consecutive} steps had a non-finite loss or "
                f"gradient (last loss {loss}, gradient norm {grad_norm}) and were skipped, so the weights are those of "
                f"the last finite step. The run has diverged: lower the learning rate (a trainer variant with a "
                f"smaller initial_lr) or check the training data, then start again or resume from an earlier "
                f"checkpoint with --c.")

    def epoch_summary(self, steps: int) -> str | None:
        """A log line for an epoch with skipped steps (None for a clean epoch); resets the epoch's counts."""
        skipped = self.epoch_loss + self.epoch_gradient
        line = None
        if skipped:
            line = (f"Skipped {skipped} of {steps} training steps: {self.epoch_loss} with a non-finite loss, "
                    f"{self.epoch_gradient} with a non-finite gradient (under fp16 a few gradient overflows are "
                    f"normal: GradScaler lowers its scale). Total so far: {self.total_loss} loss, "
                    f"{self.total_gradient} gradient.")
        self.epoch_loss = self.epoch_gradient = 0
        return line
