"""Export a subnet (or the dynamic network) of a supernet as plain static modules.

The exported module is built from ordinary ``nn.Conv2d`` / ``nn.BatchNorm2d`` / ``nn.Linear``
layers holding *copies* of the sliced weights; the chosen width's BatchNorm statistics become
ordinary running statistics. It gives the supernet's logits for that subnet in eval mode
(bit for bit with the default activation, the release's ``x * sigmoid(x)``; ``silu=True``
uses the fused ``nn.SiLU``, a few per cent faster on a CPU and within 1e-6) and works with
``torch.jit.script`` and ``torch.export``.

:func:`export_dynamic` does the same for the eval-mode dynamic network: a shared trunk, the
slimming head and one static tail per routed subnet, with samples grouped by choice.
"""

from __future__ import annotations

import torch
from torch import nn

from dsnet.arch import Subnet
from dsnet.layers import AttentionHead, DSBatchNorm2d, Swish, fresh_mul
from dsnet.model import DepthwiseSeparableBlock, DSNet


class StaticAttention(nn.Module):
    """Squeeze-excitation: pool -> 1x1 reduce -> ReLU -> 1x1 expand -> sigmoid -> multiply."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, reduced, 1, bias=True)
        self.conv_expand = nn.Conv2d(reduced, channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = nn.functional.adaptive_avg_pool2d(x, 1)
        s = self.conv_expand(torch.relu(self.conv_reduce(s)))
        return fresh_mul(x, s.sigmoid())  # x: the activation's fresh output


def activation(silu: bool = False) -> nn.Module:
    """The exported networks' activation: the release's Swish, or the fused ``nn.SiLU``."""
    return nn.SiLU() if silu else Swish()


class StaticBlock(nn.Module):
    """conv_dw -> BN -> Swish -> attention -> conv_pw -> BN -> Swish, at fixed widths."""

    def __init__(self, c_in: int, c_out: int, stride: int, reduced: int,
                 silu: bool = False) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False)
        self.bn1 = nn.BatchNorm2d(c_in)
        self.gate = StaticAttention(c_in, reduced)
        self.conv_pw = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.act = activation(silu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.gate(self.act(self.bn1(self.conv_dw(x))))
        return self.act(self.bn2(self.conv_pw(x)))


class StaticNet(nn.Module):
    """A plain MobileNetV1-style network: stem, blocks, pool, classifier."""

    def __init__(self, stem: nn.Conv2d, bn: nn.BatchNorm2d, blocks: list[StaticBlock],
                 classifier: nn.Linear, silu: bool = False) -> None:
        super().__init__()
        self.conv_stem = stem
        self.bn1 = bn
        self.act = activation(silu)
        self.blocks = nn.Sequential(*blocks)
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.act(self.bn1(self.conv_stem(x))))
        return self.classifier(nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))


def _copy_bn(src: DSBatchNorm2d, width: int) -> nn.BatchNorm2d:
    stats, shared = src.bn_for_width(width), src.aux_bn[-1]
    bn = nn.BatchNorm2d(width, eps=shared.eps, momentum=shared.momentum)
    bn.weight.data.copy_(shared.weight[:width])
    bn.bias.data.copy_(shared.bias[:width])
    bn.running_mean.copy_(stats.running_mean)
    bn.running_var.copy_(stats.running_var)
    return bn


def _copy_attention(src: AttentionHead, width: int) -> StaticAttention:
    att = StaticAttention(width, src.reduced_channels)
    att.conv_reduce.weight.data.copy_(src.conv_reduce.weight[:, :width])
    att.conv_reduce.bias.data.copy_(src.conv_reduce.bias)
    att.conv_expand.weight.data.copy_(src.conv_expand.weight[:width])
    att.conv_expand.bias.data.copy_(src.conv_expand.bias[:width])
    return att


def _copy_block(src: DepthwiseSeparableBlock, c_in: int, c_out: int,
                silu: bool = False) -> StaticBlock:
    block = StaticBlock(c_in, c_out, src.conv_dw.stride[0], src.gate.reduced_channels, silu)
    block.conv_dw.weight.data.copy_(src.conv_dw.weight[:c_in])
    block.bn1 = _copy_bn(src.bn1, c_in)
    block.gate = _copy_attention(src.gate, c_in)
    block.conv_pw.weight.data.copy_(src.conv_pw.weight[:c_out, :c_in])
    block.bn2 = _copy_bn(src.bn2, c_out)
    return block


@torch.no_grad()
def export_subnet(model: DSNet, subnet: Subnet | None = "largest",
                  silu: bool = False) -> StaticNet:
    """Copy a static subnet of ``model`` into a plain :class:`StaticNet` (eval mode).

    Args:
        model: the supernet.
        subnet: ``"largest"``, ``"smallest"`` or a uniform subnet index.
        silu: use ``nn.SiLU`` instead of the release's ``x * sigmoid(x)`` (faster, not
            bitwise equal).
    """
    model = getattr(model, "module", model)
    widths = model.arch.resolve(subnet)
    stem = nn.Conv2d(model.in_chans, widths[0], 3, model.arch.stem_stride, 1, bias=False)
    stem.weight.data.copy_(model.conv_stem.weight[:widths[0]])
    blocks, c_in = [], widths[0]
    for stage, c_out in zip(model.blocks, widths[1:]):
        blocks += _copy_blocks([stage.first_block, *stage.residual_blocks], c_in, c_out, silu)
        c_in = c_out
    classifier = nn.Linear(c_in, model.num_classes)
    classifier.weight.data.copy_(model.classifier.weight[:, :c_in])
    classifier.bias.data.copy_(model.classifier.bias)
    net = StaticNet(stem, _copy_bn(model.bn1, widths[0]), blocks, classifier, silu)
    return net.to(model.classifier.weight.device).eval()


# ----------------------------------------------------------------------------- dynamic


class StaticTrunk(nn.Module):
    """Stem .. the gate block's attention head, at the narrow widths every routed subnet shares.

    Returns the features entering the gate block's ``conv_pw`` and the attention head's
    reduced features (what the slimming head reads).
    """

    def __init__(self, stem: nn.Conv2d, bn: nn.BatchNorm2d, blocks: list[StaticBlock],
                 conv_dw: nn.Conv2d, bn_dw: nn.BatchNorm2d, attention: StaticAttention,
                 silu: bool = False) -> None:
        super().__init__()
        self.conv_stem = stem
        self.bn1 = bn
        self.act = activation(silu)
        self.blocks = nn.Sequential(*blocks)
        self.conv_dw = conv_dw
        self.bn_dw = bn_dw
        self.gate = attention

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.blocks(self.act(self.bn1(self.conv_stem(x))))
        x = self.act(self.bn_dw(self.conv_dw(x)))                 # (B, C, h, w)
        pooled = nn.functional.adaptive_avg_pool2d(x, 1)          # (B, C, 1, 1)
        reduced = torch.relu(self.gate.conv_reduce(pooled))       # (B, r, 1, 1)
        return fresh_mul(x, self.gate.conv_expand(reduced).sigmoid()), reduced


class StaticTail(nn.Module):
    """One routed subnet after the trunk: gate block's conv_pw/BN/Swish, blocks, classifier."""

    def __init__(self, conv_pw: nn.Conv2d, bn: nn.BatchNorm2d, blocks: list[StaticBlock],
                 classifier: nn.Linear, silu: bool = False) -> None:
        super().__init__()
        self.conv_pw = conv_pw
        self.bn = bn
        self.act = activation(silu)
        self.blocks = nn.Sequential(*blocks)
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.act(self.bn(self.conv_pw(x))))
        return self.classifier(nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))


class DynamicStaticNet(nn.Module):
    """A deployable dynamic DS-Net: shared trunk, slimming head, one static tail per choice.

    ``forward`` routes every sample by the argmax of the slimming head, runs each group of
    samples through its own (narrower or wider) tail and scatters the logits back in input
    order, which is what ``DSNet(x, subnet="dynamic")`` computes in eval mode.

    Attributes:
        subnets: (K,) long buffer, the uniform subnet index of each tail (routing space).
    """

    def __init__(self, trunk: StaticTrunk, slimming_head: nn.Conv2d, tails: list[StaticTail],
                 subnets: list[int], num_classes: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.slimming_head = slimming_head
        self.tails = nn.ModuleList(tails)
        self.num_classes = num_classes
        self.register_buffer("subnets", torch.tensor(subnets, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_choices(x)[0]

    @torch.jit.export
    def forward_with_choices(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (logits (B, num_classes), chosen uniform subnet per sample (B,))."""
        feats, reduced = self.trunk(x)                            # (B, C, h, w), (B, r, 1, 1)
        index = self.slimming_head(reduced).flatten(1).argmax(1)  # (B,)
        logits = torch.empty(x.size(0), self.num_classes, dtype=feats.dtype,
                             device=feats.device)
        for k, tail in enumerate(self.tails):
            rows = (index == k).nonzero().flatten()
            # Empty groups are skipped: a zero-batch conv still costs a kernel launch.
            if rows.numel() > 0:
                # feats[rows] keeps a channels-last layout (index_select would not)
                logits.index_copy_(0, rows, tail(feats[rows]))
        return logits, self.subnets[index]


def _copy_blocks(blocks: list[DepthwiseSeparableBlock], c_in: int,
                 c_out: int, silu: bool = False) -> list[StaticBlock]:
    """Static copies of consecutive blocks, the first from ``c_in``, all to ``c_out``."""
    copies = []
    for block in blocks:
        copies.append(_copy_block(block, c_in, c_out, silu))
        c_in = c_out
    return copies


def _export_trunk(model: DSNet, silu: bool = False) -> StaticTrunk:
    widths = model.arch.uniform_widths(model.routing_space[0])
    g = model.arch.gate_stage
    stem = nn.Conv2d(model.in_chans, widths[0], 3, model.arch.stem_stride, 1, bias=False)
    stem.weight.data.copy_(model.conv_stem.weight[:widths[0]])
    blocks, c_in = [], widths[0]
    for stage, c_out in zip(model.blocks[:g], widths[1:g + 1]):
        blocks += _copy_blocks([stage.first_block, *stage.residual_blocks], c_in, c_out, silu)
        c_in = c_out
    src = model.blocks[g].first_block
    conv_dw = nn.Conv2d(c_in, c_in, 3, src.conv_dw.stride[0], 1, groups=c_in, bias=False)
    conv_dw.weight.data.copy_(src.conv_dw.weight[:c_in])
    return StaticTrunk(stem, _copy_bn(model.bn1, widths[0]), blocks, conv_dw,
                       _copy_bn(src.bn1, c_in), _copy_attention(src.gate, c_in), silu)


def _export_tail(model: DSNet, subnet: int, silu: bool = False) -> StaticTail:
    widths = model.arch.uniform_widths(subnet)
    g = model.arch.gate_stage
    c_in, c_out = widths[g], widths[g + 1]   # trunk width -> this subnet's gate-stage width
    src = model.blocks[g].first_block
    conv_pw = nn.Conv2d(c_in, c_out, 1, bias=False)
    conv_pw.weight.data.copy_(src.conv_pw.weight[:c_out, :c_in])
    blocks = _copy_blocks(list(model.blocks[g].residual_blocks), c_out, c_out, silu)
    c_in = c_out
    for stage, c_out in zip(model.blocks[g + 1:], widths[g + 2:]):
        blocks += _copy_blocks([stage.first_block, *stage.residual_blocks], c_in, c_out, silu)
        c_in = c_out
    classifier = nn.Linear(c_in, model.num_classes)
    classifier.weight.data.copy_(model.classifier.weight[:, :c_in])
    classifier.bias.data.copy_(model.classifier.bias)
    return StaticTail(conv_pw, _copy_bn(src.bn2, widths[g + 1]), blocks, classifier, silu)


@torch.no_grad()
def export_dynamic(model: DSNet, silu: bool = False) -> DynamicStaticNet:
    """Copy the eval-mode dynamic network of ``model`` into a :class:`DynamicStaticNet`.

    The trunk, the slimming head and one tail per subnet of ``model.routing_space`` are
    plain ``nn`` modules holding copies of the sliced weights; the result works with
    ``torch.jit.script`` (its data-dependent grouping rules out ``torch.export``).
    ``silu`` as in :func:`export_subnet`.
    """
    model = getattr(model, "module", model)
    head_src = model.gate_head.gate[0]
    head = nn.Conv2d(head_src.in_channels, head_src.out_channels, 1, bias=False)
    head.weight.data.copy_(head_src.weight)
    tails = [_export_tail(model, c, silu) for c in model.routing_space]
    net = DynamicStaticNet(_export_trunk(model, silu), head, tails, list(model.routing_space),
                           model.num_classes)
    return net.to(model.classifier.weight.device).eval()
