"""Optimizer and learning-rate schedule, both from timm (the release's own recipe).

The release called timm 0.3.2's ``create_optimizer`` and ``create_scheduler``; dsnet calls
their timm 1.0 successors with the same arguments, so:

* 1-D parameters (BatchNorm weights, biases) and every ``.bias`` get no weight decay
  (timm's ``param_groups_weight_decay``), SGD is Nesterov with momentum 0.9;
* the schedule warms up linearly from ``warmup_lr`` over ``warmup_epochs``, follows a cosine
  (or step) curve down to ``min_lr`` at ``epochs`` and then stays at ``min_lr`` for
  ``cooldown_epochs``: a stage runs ``epochs + cooldown_epochs`` epochs;
* the schedule is stepped once per epoch, as the release did, or once per optimizer update
  with ``sched_on_updates`` (short runs, where a few epochs make a coarse staircase).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.scheduler.scheduler import Scheduler
from torch import nn

from dsnet.config import StageConfig


def build_optimizer(model: nn.Module, cfg: StageConfig) -> torch.optim.Optimizer:
    """timm's optimizer over ``model``'s trainable parameters (``requires_grad``).

    Weight decay skips 1-D parameters and biases when ``weight_decay > 0``, as
    ``timm.optim.param_groups_weight_decay`` (the release's ``add_weight_decay``) groups them.
    """
    return create_optimizer_v2(model, cfg.opt, lr=cfg.lr,  # dsnet's names are timm's
                               weight_decay=cfg.weight_decay, momentum=0.9,
                               filter_bias_and_bn=True)


@dataclass
class LRSchedule:
    """A timm scheduler and how the stage steps it.

    Call :meth:`start_epoch` before each epoch and :meth:`before_update` before each
    optimizer step; both are stateless in the epoch/update number, so a resumed run sets the
    same learning rates as the uninterrupted one.
    """

    scheduler: Scheduler
    total_epochs: int  # epochs + cooldown_epochs
    on_updates: bool
    updates_per_epoch: int

    def start_epoch(self, epoch: int) -> None:
        if not self.on_updates:
            self.scheduler.step(epoch)

    def before_update(self, num_updates: int) -> None:
        if self.on_updates:
            self.scheduler.step_update(num_updates)


def build_schedule(optimizer: torch.optim.Optimizer, cfg: StageConfig,
                   updates_per_epoch: int) -> LRSchedule:
    """timm's scheduler for the stage config (``create_scheduler_v2``, the release's args)."""
    sched = "step" if cfg.sched == "constant" else cfg.sched
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=sched, num_epochs=cfg.epochs,
        decay_epochs=cfg.decay_epochs, decay_rate=1.0 if cfg.sched == "constant" else
        cfg.decay_rate, cooldown_epochs=cfg.cooldown_epochs, min_lr=cfg.min_lr,
        warmup_lr=cfg.warmup_lr, warmup_epochs=cfg.warmup_epochs,
        step_on_epochs=not cfg.sched_on_updates, updates_per_epoch=updates_per_epoch)
    return LRSchedule(scheduler, cfg.total_epochs, cfg.sched_on_updates,
                      updates_per_epoch)


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """The learning rate of the optimizer's first parameter group."""
    return float(optimizer.param_groups[0]["lr"])
