"""The release's masked batched dynamic execution: inference baseline and gate-training estimator.

In the authors' release a dynamic forward of a batch does not slice per sample: from the
gate block's ``conv_pw`` on, every sample runs at one common width and each sample's
channels beyond its chosen width are zeroed by a per-sample channel mask after every
convolution and BatchNorm. BatchNorm selects each sample's running statistics of its
chosen width with a one-hot matmul over zero-padded per-width statistic tables, then
normalises with explicit element-wise ops. The masked-off channels cost as much as the
kept ones, so a batch costs what its widest width costs whatever the gate decides.

Each supernet family runs its own masked tail (``model.masked_tail``, built from the
primitives :func:`~dsnet.models.layers.channel_mask`,
:func:`~dsnet.models.layers.masked_batch_norm` and
:class:`~dsnet.models.layers.RoutedPart`). Two entry points share that arithmetic
(:func:`_masked_tail`):

- :func:`masked_dynamic_forward` (no grad, eval mode): its logits equal
  ``model(x, subnet="dynamic")`` per sample and its wall-clock time is the baseline
  ``bench/inference.py`` compares the grouped execution against.
- :func:`masked_train_forward` (autograd, ``model.eval(); model.gate_head.train()``): the
  release's straight-through estimator for gate training. The masks and BN statistics are
  built from the straight-through Gumbel one-hot, so the slimming head gets gradients
  through every masked layer; forward values equal the tails estimator's
  (:meth:`dsnet.models.supernet.DSSupernet.forward_dynamic`) for the same Gumbel noise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsnet.models.layers import RoutedPart, channel_mask, masked_batch_norm
from dsnet.models.supernet import DSSupernet, DynamicOutput, gumbel_sample

_Routed = RoutedPart  # the earlier private name

__all__ = ["channel_mask", "masked_batch_norm", "masked_dynamic_forward", "masked_train_forward",
           "routed_parts"]


def routed_parts(model: DSSupernet, onehot: torch.Tensor,
                 full_width: bool = False) -> list[RoutedPart]:
    """One :class:`~dsnet.models.layers.RoutedPart` per stage from the gate stage on
    (:meth:`~dsnet.models.supernet.DSSupernet.routed_parts`)."""
    return model.routed_parts(onehot, full_width)


def _masked_tail(model: DSSupernet, feats: torch.Tensor, onehot: torch.Tensor,
                 full_width: bool = False) -> torch.Tensor:
    """Masked execution from the trunk's features to the logits (B, num_classes).

    Args:
        model: the supernet (BatchNorm in eval mode: running statistics).
        feats: (B, C, h, w) the trunk's features (:meth:`forward_trunk`).
        onehot: (B, K) routing one-hot (plain, or straight-through to carry gradients).
        full_width: see :func:`routed_parts`.
    """
    return getattr(model, "module", model).masked_tail(feats, onehot, full_width)


@torch.no_grad()
def masked_dynamic_forward(model: DSSupernet, x: torch.Tensor, full_width: bool = False,
                           return_choices: bool = False):
    """Dynamic forward of a batch the release's way: one common width, per-sample masks.

    Args:
        model: the supernet, in eval mode (running BatchNorm statistics, argmax gate).
        x: (B, in_chans, H, W) input batch.
        full_width: see :func:`routed_parts`.
        return_choices: also return the chosen uniform subnet per sample (B,).

    Returns:
        Logits (B, num_classes), equal per sample to ``model(x, subnet="dynamic")``;
        ``(logits, choices)`` with ``return_choices``.
    """
    model = getattr(model, "module", model)
    if any(m.training for m in model.modules()):
        raise RuntimeError("masked_dynamic_forward reproduces eval-mode inference; "
                           "call model.eval() first")
    feats, gate_logits = model.forward_trunk(x)                  # (B, C, h, w), (B, K)
    index = gate_logits.argmax(1)                                # (B,)
    onehot = F.one_hot(index, len(model.routing_space)).to(feats.dtype)
    logits = _masked_tail(model, feats, onehot, full_width)
    if return_choices:
        space = torch.tensor(model.routing_space, device=x.device)
        return logits, space[index]
    return logits


def masked_train_forward(model: DSSupernet, x: torch.Tensor, gumbel_tau: float = 1.0
                         ) -> DynamicOutput:
    """Gate training's dynamic forward with the release's masked straight-through estimator.

    The widest routed width runs once for the whole batch; the straight-through Gumbel
    one-hot (hard forward, soft gradient) builds every per-sample channel mask and picks
    every masked BatchNorm's statistics, so the slimming head gets gradients through each
    masked layer. Per sample the logits equal the chosen subnet's, as the tails estimator's
    (:meth:`DSSupernet.forward_dynamic`) do for the same Gumbel noise; only the gradient differs.

    Args:
        model: the supernet with every BatchNorm in eval mode (``model.eval();
            model.gate_head.train()`` to sample; an eval-mode head takes the argmax).
        x: (B, in_chans, H, W) input batch.
        gumbel_tau: Gumbel-softmax temperature.

    Returns:
        A :class:`DynamicOutput` whose ``tail_logits`` is (B, 1, num_classes), the slimmest
        routed subnet's logits without gradients: the SGS targets need no other tail, and
        running all K would add back the tails estimator's forward cost. ``tail_logits``
        and ``gate_soft`` are None when the head is in eval mode.
    """
    model = getattr(model, "module", model)
    head = set(model.gate_head.modules())
    if any(m.training for m in model.modules() if m not in head):
        raise RuntimeError("masked_train_forward needs frozen BatchNorm (running statistics):"
                           " call model.eval(), then model.gate_head.train()")
    feats, gate_logits = model.forward_trunk(x)                  # (B, C, h, w), (B, K)
    space = torch.tensor(model.routing_space, device=x.device)
    if not model.gate_head.training:
        onehot = F.one_hot(gate_logits.argmax(1), len(space)).to(gate_logits.dtype)
        logits = _masked_tail(model, feats, onehot)
        return DynamicOutput(logits, gate_logits, onehot, space[onehot.argmax(1)])
    onehot, soft = gumbel_sample(gate_logits, gumbel_tau)        # (B, K) each
    with torch.no_grad():                       # only read for targets (argmax)
        slimmest = model.forward_tail(feats, model.routing_space[0]).unsqueeze(1)
    logits = _masked_tail(model, feats, onehot.to(feats.dtype))  # (B, classes)
    return DynamicOutput(logits, gate_logits, onehot, space[onehot.argmax(1)], slimmest, soft)
