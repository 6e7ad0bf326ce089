"""Optimizers and the learning-rate schedule (linear warm-up, then cosine/step/constant)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def build_optimizer(params: Iterable[torch.nn.Parameter], opt: str, lr: float,
                    weight_decay: float) -> torch.optim.Optimizer:
    """SGD (momentum 0.9, Nesterov, the release's), AdamW or RMSprop."""
    params = [p for p in params if p.requires_grad]
    if opt == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True,
                               weight_decay=weight_decay)
    if opt == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if opt == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, alpha=0.9, momentum=0.9,
                                   weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {opt!r} (sgd | adamw | rmsprop)")


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float,
          warmup_lr: float = 1e-5, sched: str = "cosine") -> float:
    """Learning rate at optimizer step ``step`` (0-based), updated every step."""
    if step < warmup_steps:
        return warmup_lr + (base_lr - warmup_lr) * step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if sched == "cosine":
        return 0.5 * base_lr * (1.0 + math.cos(math.pi * min(1.0, progress)))
    if sched == "step":  # divide by 10 at 1/3 and 2/3 of training
        return base_lr * 0.1 ** int(min(progress, 0.999) * 3)
    return base_lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
