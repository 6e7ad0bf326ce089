"""Export a subnet of a supernet as a plain static network.

The exported module is built from ordinary ``nn.Conv2d`` / ``nn.BatchNorm2d`` / ``nn.Linear``
layers holding *copies* of the sliced weights; the chosen width's BatchNorm statistics become
ordinary running statistics. It gives the supernet's logits for that subnet in eval mode and
works with ``torch.jit.script`` and ``torch.export``.
"""

from __future__ import annotations

import torch
from torch import nn

from dsnet.arch import Subnet
from dsnet.layers import AttentionHead, DSBatchNorm2d
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
        return x * s.sigmoid()


class StaticBlock(nn.Module):
    """conv_dw -> BN -> SiLU -> attention -> conv_pw -> BN -> SiLU, at fixed widths."""

    def __init__(self, c_in: int, c_out: int, stride: int, reduced: int) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False)
        self.bn1 = nn.BatchNorm2d(c_in)
        self.gate = StaticAttention(c_in, reduced)
        self.conv_pw = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.gate(self.act(self.bn1(self.conv_dw(x))))
        return self.act(self.bn2(self.conv_pw(x)))


class StaticNet(nn.Module):
    """A plain MobileNetV1-style network: stem, blocks, pool, classifier."""

    def __init__(self, stem: nn.Conv2d, bn: nn.BatchNorm2d, blocks: list[StaticBlock],
                 classifier: nn.Linear) -> None:
        super().__init__()
        self.conv_stem = stem
        self.bn1 = bn
        self.act = nn.SiLU()
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


def _copy_block(src: DepthwiseSeparableBlock, c_in: int, c_out: int) -> StaticBlock:
    block = StaticBlock(c_in, c_out, src.conv_dw.stride[0], src.gate.reduced_channels)
    block.conv_dw.weight.data.copy_(src.conv_dw.weight[:c_in])
    block.bn1 = _copy_bn(src.bn1, c_in)
    block.gate = _copy_attention(src.gate, c_in)
    block.conv_pw.weight.data.copy_(src.conv_pw.weight[:c_out, :c_in])
    block.bn2 = _copy_bn(src.bn2, c_out)
    return block


@torch.no_grad()
def export_subnet(model: DSNet, subnet: Subnet | None = "largest") -> StaticNet:
    """Copy a static subnet of ``model`` into a plain :class:`StaticNet` (eval mode).

    Args:
        model: the supernet.
        subnet: ``"largest"``, ``"smallest"`` or a uniform subnet index.
    """
    model = getattr(model, "module", model)
    widths = model.arch.resolve(subnet)
    stem = nn.Conv2d(model.in_chans, widths[0], 3, model.arch.stem_stride, 1, bias=False)
    stem.weight.data.copy_(model.conv_stem.weight[:widths[0]])
    blocks, c_in = [], widths[0]
    for stage, c_out in zip(model.blocks, widths[1:]):
        for block in [stage.first_block, *stage.residual_blocks]:
            blocks.append(_copy_block(block, c_in, c_out))
            c_in = c_out
    classifier = nn.Linear(c_in, model.num_classes)
    classifier.weight.data.copy_(model.classifier.weight[:, :c_in])
    classifier.bias.data.copy_(model.classifier.bias)
    net = StaticNet(stem, _copy_bn(model.bn1, widths[0]), blocks, classifier)
    return net.to(model.classifier.weight.device).eval()
