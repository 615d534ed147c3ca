"""Learning-rate schedule: linear warm-up from `warmup_start_lr` to the peak, then cosine down to `min_lr`."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pretrain.config import OptimConfig


@dataclass(frozen=True)
class WarmupCosine:
    """Multiplier of the peak LR after `step` optimizer steps (a picklable callable for LambdaLR)."""

    peak: float
    start: float
    floor: float
    warmup: int
    decay: int

    def lr(self, step: int) -> float:
        if step < self.warmup:
            return self.start + (self.peak - self.start) * step / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.decay))
        return self.floor + 0.5 * (self.peak - self.floor) * (1.0 + math.cos(math.pi * progress))

    def __call__(self, step: int) -> float:
        return self.lr(step) / self.peak


def warmup_cosine(optim: OptimConfig, max_steps: int) -> WarmupCosine:
    decay = optim.decay_steps if optim.decay_steps is not None else max_steps - optim.warmup_steps
    return WarmupCosine(peak=optim.lr, start=optim.warmup_start_lr, floor=optim.min_lr,
                        warmup=optim.warmup_steps, decay=decay)


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig,
                    max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """DeepSpeed steps it once per optimizer step and saves its state in the checkpoint."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(optim, max_steps))


def set_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, optim: OptimConfig, max_steps: int) -> None:
    """Install this run's schedule at the scheduler's current step. A checkpoint's scheduler state holds the
    schedule it was started with (LambdaLR saves its callable's fields), so without this a resumed run with a
    new optim.lr or train.max_steps would silently keep the old one."""
    fn = warmup_cosine(optim, max_steps)
    groups = scheduler.optimizer.param_groups
    scheduler.lr_lambdas = [fn] * len(groups)
    scheduler.base_lrs = [optim.lr] * len(groups)
    for group in groups:
        group["lr"] = optim.lr * fn(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in groups]

