"""The release's masked batched dynamic execution: inference baseline and gate-training estimator.

In the authors' release a dynamic forward of a batch does not slice per sample: from the
gate block's ``conv_pw`` on, every sample runs at one common width and each sample's
channels beyond its chosen width are zeroed by a per-sample channel mask after every
convolution and BatchNorm. BatchNorm selects each sample's running statistics of its
chosen width with a one-hot matmul over zero-padded per-width statistic tables, then
normalises with explicit element-wise ops. The masked-off channels cost as much as the
kept ones, so a batch costs what its widest width costs whatever the gate decides.

Two entry points share that arithmetic (:func:`_masked_tail`):

- :func:`masked_dynamic_forward` (no grad, eval mode): its logits equal
  ``model(x, subnet="dynamic")`` per sample and its wall-clock time is the baseline
  ``bench/inference.py`` compares the grouped execution against.
- :func:`masked_train_forward` (autograd, ``model.eval(); model.gate_head.train()``): the
  release's straight-through estimator for gate training. The masks and BN statistics are
  built from the straight-through Gumbel one-hot, so the slimming head gets gradients
  through every masked layer; forward values equal the tails estimator's
  (:meth:`dsnet.model.DSNet.forward_dynamic`) for the same Gumbel noise.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from dsnet.layers import DSBatchNorm2d, fresh_swish
from dsnet.model import DepthwiseSeparableBlock, DSNet, DynamicOutput, gumbel_sample


def channel_mask(onehot: torch.Tensor, widths: Sequence[int], width: int) -> torch.Tensor:
    """Per-sample channel mask (B, width, 1, 1): 1 for the first ``widths[choice]`` channels.

    Args:
        onehot: (B, K) one-hot routing choice per sample.
        widths: the K routed widths of this part.
        width: the common width the batch is computed at (>= max(widths)).
    """
    table = onehot.new_zeros(len(widths), width)                 # (K, width)
    for k, w in enumerate(widths):
        table[k, :w] = 1.0
    return (onehot @ table)[:, :, None, None]                    # (B, width, 1, 1)


def masked_batch_norm(bn: DSBatchNorm2d, x: torch.Tensor, onehot: torch.Tensor,
                      widths: Sequence[int]) -> torch.Tensor:
    """Eval-mode BatchNorm of (B, W, H, W') with each sample's own width statistics.

    As the release: per-width running statistics are zero-padded to W, stacked (K, W),
    picked per sample by a one-hot matmul and applied element-wise with the shared affine.
    With a straight-through one-hot the statistics carry gradients to the gate.
    The padded variance is 1 rather than the release's 0 so the masked-off channels stay
    finite before the mask zeroes them (the release needs a NaN clean-up for that).
    """
    width = x.size(1)
    means = x.new_zeros(len(widths), width)                      # (K, W)
    variances = x.new_ones(len(widths), width)                   # (K, W)
    for k, w in enumerate(widths):
        stats = bn.bn_for_width(w)
        means[k, :w] = stats.running_mean
        variances[k, :w] = stats.running_var
    shared = bn.aux_bn[-1]
    mean = (onehot @ means)[:, :, None, None]                     # (B, W, 1, 1)
    inv_std = (onehot @ variances + shared.eps).rsqrt()[:, :, None, None]
    return (x - mean) * inv_std * shared.weight[:width, None, None] + \
        shared.bias[:width, None, None]


class _Routed:
    """Widths and mask of one part (stage) of the routed network for one batch."""

    def __init__(self, onehot: torch.Tensor, widths: Sequence[int], width: int) -> None:
        self.onehot = onehot                    # (B, K)
        self.widths = tuple(widths)             # routed width per choice
        self.width = width                      # common width the batch runs at
        self.mask = channel_mask(onehot, widths, width)  # (B, width, 1, 1)

    def bn(self, bn: DSBatchNorm2d, x: torch.Tensor) -> torch.Tensor:
        """Per-sample BatchNorm, then the mask (the BN shift makes zeros non-zero)."""
        return masked_batch_norm(bn, x, self.onehot, self.widths) * self.mask


def _masked_pre(block: DepthwiseSeparableBlock, x: torch.Tensor, part: _Routed) -> torch.Tensor:
    """conv_dw -> BN -> Swish -> attention head on (B, part.width, H, W), masked."""
    x = block.conv_dw(x) * part.mask            # depthwise: width follows x.size(1)
    x = fresh_swish(part.bn(block.bn1, x))
    # The attention head needs no mask: zeroed channels add nothing to its pool/reduce
    # and stay zero after its multiply.
    return block.gate(x, inplace=True)


def _masked_post(block: DepthwiseSeparableBlock, x: torch.Tensor, part: _Routed) -> torch.Tensor:
    """conv_pw to part.width -> BN -> Swish, masked."""
    x = block.conv_pw(x, part.width) * part.mask
    return fresh_swish(part.bn(block.bn2, x))


def routed_parts(model: DSNet, onehot: torch.Tensor, full_width: bool = False) -> list[_Routed]:
    """One :class:`_Routed` per stage from the gate stage on.

    Args:
        model: the supernet.
        onehot: (B, K) routing one-hot.
        full_width: compute at each stage's widest supernet width as the release's
            unsliced weights do, instead of the widest routed width (the default, a
            faster and therefore more demanding baseline).
    """
    parts = []
    for spec in model.arch.stages[model.arch.gate_stage:]:
        widths = [spec.widths[c] for c in model.routing_space]
        width = spec.widths[-1] if full_width else max(widths)
        parts.append(_Routed(onehot, widths, width))
    return parts


def _masked_tail(model: DSNet, feats: torch.Tensor, onehot: torch.Tensor,
                 full_width: bool = False) -> torch.Tensor:
    """Masked execution from the gate block's ``conv_pw`` to the logits (B, num_classes).

    Args:
        model: the supernet (BatchNorm in eval mode: running statistics).
        feats: (B, C, h, w) the trunk's features entering the gate block's ``conv_pw``.
        onehot: (B, K) routing one-hot (plain, or straight-through to carry gradients).
        full_width: see :func:`routed_parts`.
    """
    parts = routed_parts(model, onehot, full_width)
    g = model.arch.gate_stage
    x = _masked_post(model.blocks[g].first_block, feats, parts[0])
    prev = parts[0]
    for stage, part in zip(model.blocks[g:], parts):
        blocks = [stage.first_block, *stage.residual_blocks]
        if stage is model.blocks[g]:
            blocks = blocks[1:]                 # its first block's pre part is the trunk's
        for block in blocks:
            x = _masked_post(block, _masked_pre(block, x, prev), part)
            prev = part
    return model.forward_head(x)                # zeroed features add nothing to the pool/fc


@torch.no_grad()
def masked_dynamic_forward(model: DSNet, x: torch.Tensor, full_width: bool = False,
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


def masked_train_forward(model: DSNet, x: torch.Tensor, gumbel_tau: float = 1.0
                         ) -> DynamicOutput:
    """Gate training's dynamic forward with the release's masked straight-through estimator.

    The widest routed width runs once for the whole batch; the straight-through Gumbel
    one-hot (hard forward, soft gradient) builds every per-sample channel mask and picks
    every masked BatchNorm's statistics, so the slimming head gets gradients through each
    masked layer. Per sample the logits equal the chosen subnet's, as the tails estimator's
    (:meth:`DSNet.forward_dynamic`) do for the same Gumbel noise; only the gradient differs.

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
