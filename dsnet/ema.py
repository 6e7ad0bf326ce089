"""Exponential moving average of a model (the in-place bootstrapping teacher)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEma:
    """EMA copy of every floating-point tensor of a model's state (weights and BN stats).

    Args:
        model: the model to track (unwrapped).
        decay: EMA decay per update (the release: 0.997).
        warmup: use ``min(decay, (1 + n) / (10 + n))`` at update ``n`` (TensorFlow's
            ``num_updates`` rule), so the teacher follows the fast-moving early weights
            instead of staying near the random initialisation for ~1/(1-decay) steps.
            Short runs need it; the release (150 epochs) did without.
    """

    def __init__(self, model: nn.Module, decay: float = 0.997, warmup: bool = False) -> None:
        self.module = copy.deepcopy(model).eval()
        self.decay = decay
        self.warmup = warmup
        self.updates = 0
        for p in self.module.parameters():
            p.requires_grad_(False)

    def current_decay(self) -> float:
        """The decay the next update uses."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """``ema = decay * ema + (1 - decay) * model`` for float tensors; copy the rest."""
        decay = self.current_decay()
        self.updates += 1
        ema_state, live = self.module.state_dict(), model.state_dict()
        floats = [(ema_state[k], v) for k, v in live.items() if v.is_floating_point()]
        if floats:
            ema_t, live_t = zip(*floats)
            torch._foreach_lerp_(list(ema_t), list(live_t), 1.0 - decay)
        for k, v in live.items():
            if not v.is_floating_point():
                ema_state[k].copy_(v)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)
