"""Exponential moving average of a model (the in-place bootstrapping teacher), on timm's EMA.

timm's ``ModelEmaV3`` averages every floating-point tensor of the state dict, so the
per-width BatchNorm statistics (each width's own ``running_mean`` / ``running_var``
buffers) are averaged like the weights, as the release's timm ``ModelEma`` did. dsnet adds
one thing: an optional warm-up of the decay (TensorFlow's ``num_updates`` rule).
"""

from __future__ import annotations

from timm.utils import ModelEmaV3
from torch import nn


class ModelEma(ModelEmaV3):
    """EMA copy of a model's weights and buffers.

    Args:
        model: the model to track (unwrapped).
        decay: EMA decay per update (the release: 0.997).
        warmup: use ``min(decay, (1 + n) / (10 + n))`` at update ``n`` (TensorFlow's
            ``num_updates`` rule), so the teacher follows the fast-moving early weights
            instead of staying near the random initialisation for ~1/(1-decay) steps.
            Short runs need it; the release (150 epochs) did without (``model_ema_warmup:
            false``). timm's own warm-up (``use_warmup``) is a different curve.
    """

    def __init__(self, model: nn.Module, decay: float = 0.997, warmup: bool = False) -> None:
        super().__init__(model, decay=decay, stochastic_rounding=False)
        self.warmup = warmup
        self.updates = 0
        for p in self.module.parameters():
            p.requires_grad_(False)

    def current_decay(self) -> float:
        """The decay the next update uses."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    def update(self, model: nn.Module, step: int | None = None) -> None:
        """``ema = decay * ema + (1 - decay) * model`` for float tensors; copy the rest."""
        self.apply_update_(model, self.current_decay())
        self.updates += 1

    def state_dict(self, *args, **kwargs) -> dict:  # the tracked model's keys, no "module."
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state: dict, strict: bool = True):
        return self.module.load_state_dict(state, strict=strict)
