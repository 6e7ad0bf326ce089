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
    """

    def __init__(self, model: nn.Module, decay: float = 0.997) -> None:
        self.module = copy.deepcopy(model).eval()
        self.decay = decay
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """``ema = decay * ema + (1 - decay) * model`` for float tensors; copy the rest."""
        ema_state, live = self.module.state_dict(), model.state_dict()
        floats = [(ema_state[k], v) for k, v in live.items() if v.is_floating_point()]
        if floats:
            ema_t, live_t = zip(*floats)
            torch._foreach_lerp_(list(ema_t), list(live_t), 1.0 - self.decay)
        for k, v in live.items():
            if not v.is_floating_point():
                ema_state[k].copy_(v)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)
