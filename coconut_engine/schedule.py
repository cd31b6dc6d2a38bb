"""Learning-rate schedules: constant (the official Coconut run.py) or linear warmup + cosine decay.

The rate is a pure function of the optimizer step, so it survives `reset_optimizer` (a fresh
optimizer per epoch or stage) and resuming from a checkpoint without any scheduler state.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class LRSchedule:
    """`constant`: `lr` at every step (after an optional linear warmup). `cosine`: linear warmup over
    `warmup_steps`, then cosine decay from `lr` to `min_lr_ratio * lr` at `total_steps`."""

    kind: str
    lr: float
    total_steps: int
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0

    def __post_init__(self):
        if self.kind not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule {self.kind!r} is not one of {LR_SCHEDULES}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")

    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step `step` (0 = the first)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return self.lr
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        floor = self.min_lr_ratio * self.lr
        return floor + (self.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
