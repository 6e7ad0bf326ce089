"""Initialise a supernet from a plain network's weights (``dsnet.load_pretrained``).

A DS-ResNet uses torchvision's module names, so a torchvision or timm ResNet-50 state dict
(``torch.save(resnet.state_dict(), path)``) maps onto it key by key. The differences are
the per-width BatchNorms (:class:`~dsnet.models.layers.DSBatchNorm2d`): a plain ``bn1.weight``
becomes the shared affine ``bn1.aux_bn.{last}.weight``, and the plain running statistics
become the widest width's; every narrower width starts from their first ``n`` entries
(exact for a BatchNorm after a convolution whose inputs do not slim, a start for the
others, which BN recalibration re-estimates anyway). Keys a plain network does not have
(the gate) are optional. Anything else that does not fit is refused with one error naming
the key.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from dsnet.models.checkpoint import CheckpointError, extract_state_dict, read_checkpoint
from dsnet.models.layers import DSBatchNorm2d

_BN_STATS = ("running_mean", "running_var")


class _Plan:
    """Supernet state built from a plain state dict, with what did not fit."""

    def __init__(self, plain: Mapping[str, torch.Tensor]) -> None:
        self.plain = plain
        self.state: dict[str, torch.Tensor] = {}
        self.used: set[str] = set()
        self.problems: list[str] = []

    def take(self, key: str, shape: torch.Size, optional: bool = False) -> torch.Tensor | None:
        """The plain tensor ``key`` if it has ``shape``; records a problem otherwise."""
        if key not in self.plain:
            if not optional:
                self.problems.append(f"missing key '{key}'")
            return None
        self.used.add(key)
        value = self.plain[key]
        if value.shape != shape:
            self.problems.append(f"key '{key}' has shape {tuple(value.shape)} in the file, "
                                 f"{tuple(shape)} in the model")
            return None
        return value


def _map_batch_norm(plan: _Plan, prefix: str, bn: DSBatchNorm2d) -> None:
    """Plain ``prefix.{weight,bias,running_*}`` -> the per-width ``prefix.aux_bn.{i}``."""
    last = len(bn.widths) - 1
    for name in ("weight", "bias"):
        value = plan.take(f"{prefix}{name}", bn.aux_bn[last].weight.shape)
        if value is not None:
            plan.state[f"{prefix}aux_bn.{last}.{name}"] = value
    for name in _BN_STATS:
        value = plan.take(f"{prefix}{name}", bn.aux_bn[last].running_mean.shape)
        for i, width in enumerate(bn.widths):
            if value is not None:
                plan.state[f"{prefix}aux_bn.{i}.{name}"] = value[:width]
    count = plan.take(f"{prefix}num_batches_tracked", torch.Size([]), optional=True)
    for i in range(len(bn.widths)):
        if count is not None:
            plan.state[f"{prefix}aux_bn.{i}.num_batches_tracked"] = count


def plain_to_supernet_state(model: nn.Module, plain: Mapping[str, torch.Tensor],
                            optional: Sequence[str] = (), source: str = "state dict"
                            ) -> dict[str, torch.Tensor]:
    """Map a plain network's state dict onto ``model``'s names (see the module docstring).

    Args:
        model: the supernet; its non-BatchNorm tensors must have the plain names.
        plain: the plain network's state dict.
        optional: key prefixes the plain network may lack (they keep their values).
        source: what to name in the error.

    Returns:
        The part of ``model``'s state dict the plain network provides.

    Raises:
        CheckpointError: a missing or unexpected key, or a shape mismatch, naming the key.
    """
    plan = _Plan(plain)
    bn_prefixes = []
    for name, module in model.named_modules():
        if isinstance(module, DSBatchNorm2d):
            _map_batch_norm(plan, f"{name}.", module)
            bn_prefixes.append(f"{name}.")
    for key, value in model.state_dict().items():
        if not key.startswith(tuple(bn_prefixes)):
            found = plan.take(key, value.shape, optional=key.startswith(tuple(optional)))
            if found is not None:
                plan.state[key] = found
    plan.problems += [f"unexpected key '{k}'" for k in plain if k not in plan.used]
    if plan.problems:
        more = f" (and {len(plan.problems) - 1} more problems)" if len(plan.problems) > 1 else ""
        name = getattr(model, "model_name", type(model).__name__)
        raise CheckpointError(f"{source} does not fit {name}: {plan.problems[0]}{more}")
    return plan.state


def load_pretrained(model: nn.Module, path: str | os.PathLike) -> dict[str, Any]:
    """Initialise a supernet from a plain network's weights file.

    For a DS-ResNet: a torchvision or timm ResNet of the same layout, saved with
    ``torch.save(resnet.state_dict(), path)`` (a checkpoint dict holding ``state_dict``
    works too; ``module.`` prefixes are stripped). After it the largest network computes
    what the plain network does (``ds_resnet50(attention=False)`` equals torchvision's
    ``resnet50``); the gate keeps its initialisation (see the model's
    ``load_plain_state_dict``).

    Args:
        model: the supernet to fill.
        path: the weights file.

    Returns:
        The file's contents as read.

    Raises:
        CheckpointError: unreadable file, a model without a plain counterpart (DS-MBNet:
            use :func:`dsnet.load_checkpoint`), or weights that do not fit, naming the key.
    """
    model = getattr(model, "module", model)
    loader = getattr(model, "load_plain_state_dict", None)
    if loader is None:
        name = getattr(model, "model_name", type(model).__name__)
        raise CheckpointError(f"model {name} has no plain counterpart to load pretrained "
                              "weights from; load its own checkpoints with load_checkpoint")
    ckpt = read_checkpoint(path)
    loader(extract_state_dict(ckpt, source=str(path)), source=str(path))
    return ckpt
