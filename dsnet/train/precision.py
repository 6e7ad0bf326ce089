"""Mixed precision (``amp: true``): ``torch.autocast`` and, for float16, a gradient scaler.

bfloat16 has float32's exponent range, so it needs no loss scaling and is what CPUs run
fast; float16 (CUDA's fast path, the release's apex/native AMP) underflows small gradients
without a :class:`torch.amp.GradScaler`. Weights, optimizer state, EMA and BatchNorm
statistics stay float32 either way: autocast only lowers the precision of the matmuls and
convolutions inside it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """How a stage computes: ``enabled`` autocast to ``dtype`` on ``device_type``."""

    enabled: bool = False
    device_type: str = "cpu"
    dtype: torch.dtype = torch.float32

    @classmethod
    def from_config(cls, amp: bool, amp_dtype: str, device: torch.device) -> Precision:
        """``amp_dtype: auto`` is bfloat16 on CPU and float16 on CUDA."""
        if not amp:
            return cls(False, device.type)
        if amp_dtype == "auto":
            amp_dtype = "float16" if device.type == "cuda" else "bfloat16"
        return cls(True, device.type, _DTYPES[amp_dtype])

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast region of forward passes (a no-op when off)."""
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A scaler that is active only for float16 (a pass-through otherwise)."""
        return torch.amp.GradScaler(self.device_type,
                                    enabled=self.enabled and self.dtype == torch.float16)
