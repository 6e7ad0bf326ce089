"""The release's masked batched dynamic execution, re-implemented for comparison only.

In the authors' release a dynamic forward of a batch does not slice per sample: from the
gate block's ``conv_pw`` on, every sample runs at one common width and each sample's
channels beyond its chosen width are zeroed by a per-sample channel mask after every
convolution and BatchNorm. BatchNorm selects each sample's running statistics of its
chosen width with a one-hot matmul over zero-padded per-width statistic tables, then
normalises with explicit element-wise ops. The masked-off channels cost as much as the
kept ones, so a batch costs what its widest width costs whatever the gate decides.

:func:`masked_dynamic_forward` reproduces that arithmetic with this project's modules, so
its logits equal ``model(x, subnet="dynamic")`` (eval mode) per sample and its wall-clock
time is the baseline ``bench/inference.py`` compares the grouped execution against. It is
not used for training or serving.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from dsnet.layers import DSBatchNorm2d, fresh_swish
from dsnet.model import DepthwiseSeparableBlock, DSNet


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
    logits = model.forward_head(x)              # zeroed features add nothing to the pool/fc
    if return_choices:
        space = torch.tensor(model.routing_space, device=x.device)
        return logits, space[index]
    return logits
