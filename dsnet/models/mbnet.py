"""DS-MBNet (:class:`DSNet`), a :class:`~dsnet.models.supernet.DSSupernet` family.

DS-MBNet (MobileNetV1-style, the release's ``slimmable_mbnet_v1_bn_uniform``): module names
and tensor shapes follow the release exactly, so its checkpoint loads as is: ``conv_stem``,
``bn1``, ``blocks.{stage}.first_block`` / ``blocks.{stage}.residual_blocks.{j}`` (each
``conv_dw``, ``bn1``, ``gate``, ``conv_pw``, ``bn2``), ``classifier``. The DS-ResNets are in
:mod:`dsnet.models.resnet`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dsnet.models.arch import DS_MBNET_SMALL, DS_MBNET_TINY, DS_MBNET_V1, ArchSpec
from dsnet.models.export import (
    StaticBlock,
    StaticNet,
    StaticTail,
    StaticTrunk,
    copy_attention,
    copy_bn,
)
from dsnet.models.layers import (
    AttentionHead,
    DSBatchNorm2d,
    DSConv2d,
    DSDepthwiseConv2d,
    DSLinear,
    DSPointwiseConv2d,
    RoutedPart,
    fresh_swish,
)
from dsnet.models.madds import Width, conv_out_size, widths_madds
from dsnet.models.registry import register_model
from dsnet.models.supernet import DSSupernet, init_weights


class DepthwiseSeparableBlock(nn.Module):
    """conv_dw -> bn1 -> Swish -> attention head (``gate``) -> conv_pw -> bn2 -> Swish.

    The block is split at the attention head because the slimming head decides the output
    width of ``conv_pw`` from the attention head's reduced features.
    """

    def __init__(self, in_widths: Sequence[int], out_widths: Sequence[int], stride: int,
                 se_ratio: float, gate: dict | None = None) -> None:
        super().__init__()
        self.conv_dw = DSDepthwiseConv2d(in_widths[-1], 3, stride)
        self.bn1 = DSBatchNorm2d(in_widths)
        self.gate = AttentionHead(in_widths[-1], se_ratio, **(gate or {}))
        self.conv_pw = DSPointwiseConv2d(in_widths[-1], out_widths[-1])
        self.bn2 = DSBatchNorm2d(out_widths)

    def forward_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Up to the attention head: (features (B, C_in, H', W'), gate features (B, F, 1, 1))."""
        x = fresh_swish(self.bn1(self.conv_dw(x)))
        return self.gate.forward_with_reduced(x, inplace=True)

    def forward_post(self, x: torch.Tensor, out_width: int) -> torch.Tensor:
        """From ``conv_pw`` on: (B, C_in, H, W) -> (B, out_width, H, W)."""
        return fresh_swish(self.bn2(self.conv_pw(x, out_width)))

    def forward(self, x: torch.Tensor, out_width: int) -> torch.Tensor:
        return self.forward_post(self.forward_pre(x)[0], out_width)

    def export(self, c_in: int, c_out: int, silu: bool = False) -> StaticBlock:
        """A plain :class:`~dsnet.models.export.StaticBlock` holding copies of this block's
        weights at widths ``c_in`` -> ``c_out``."""
        block = StaticBlock(c_in, c_out, self.conv_dw.stride[0], self.gate.reduced_channels,
                            silu)
        block.conv_dw.weight.data.copy_(self.conv_dw.weight[:c_in])
        block.bn1 = copy_bn(self.bn1, c_in)
        block.gate = copy_attention(self.gate, c_in)
        block.conv_pw.weight.data.copy_(self.conv_pw.weight[:c_out, :c_in])
        block.bn2 = copy_bn(self.bn2, c_out)
        return block

    def masked_pre(self, x: torch.Tensor, part: RoutedPart) -> torch.Tensor:
        """conv_dw -> BN -> Swish -> attention head on (B, part.width, H, W), masked."""
        x = self.conv_dw(x) * part.mask            # depthwise: width follows x.size(1)
        x = fresh_swish(part.bn(self.bn1, x))
        # The attention head needs no mask: zeroed channels add nothing to its pool/reduce
        # and stay zero after its multiply.
        return self.gate(x, inplace=True)

    def masked_post(self, x: torch.Tensor, part: RoutedPart) -> torch.Tensor:
        """conv_pw to part.width -> BN -> Swish, masked."""
        x = self.conv_pw(x, part.width) * part.mask
        return fresh_swish(part.bn(self.bn2, x))


def _export_blocks(blocks: Sequence[DepthwiseSeparableBlock], c_in: int, c_out: int,
                   silu: bool = False) -> list[StaticBlock]:
    """Static copies of consecutive blocks, the first from ``c_in``, all to ``c_out``."""
    copies = []
    for block in blocks:
        copies.append(block.export(c_in, c_out, silu))
        c_in = c_out
    return copies


class DSStage(nn.Module):
    """A stage: ``first_block`` (stride, width change) then ``residual_blocks`` (no skip)."""

    def __init__(self, in_widths: Sequence[int], out_widths: Sequence[int], num_blocks: int,
                 stride: int, se_ratio: float, gate: dict | None = None) -> None:
        super().__init__()
        self.first_block = DepthwiseSeparableBlock(in_widths, out_widths, stride, se_ratio,
                                                   gate)
        self.residual_blocks = nn.ModuleList(
            DepthwiseSeparableBlock(out_widths, out_widths, 1, se_ratio)
            for _ in range(num_blocks - 1))

    def forward_rest(self, x: torch.Tensor, out_width: int) -> torch.Tensor:
        """The blocks after the first one."""
        for block in self.residual_blocks:
            x = block(x, out_width)
        return x

    def forward(self, x: torch.Tensor, out_width: int) -> torch.Tensor:
        return self.forward_rest(self.first_block(x, out_width), out_width)

    @property
    def all_blocks(self) -> list[DepthwiseSeparableBlock]:
        """``first_block`` then the others."""
        return [self.first_block, *self.residual_blocks]


class DSNet(DSSupernet):
    """DS-MBNet: the release's MobileNetV1-style dynamic slimmable supernet.

    See :class:`DSSupernet` for how to call it.

    Args:
        arch: the architecture.
        num_classes: classifier outputs.
        in_chans: input channels.
        drop_rate: dropout before the classifier, applied to the largest network only.
        routing_space: uniform subnets the slimming head chooses among (ascending).
    """

    def __init__(self, arch: ArchSpec, num_classes: int = 1000, in_chans: int = 3,
                 drop_rate: float = 0.0, routing_space: Sequence[int] = (0, 1, 2, 3)) -> None:
        super().__init__(arch, num_classes, in_chans, drop_rate)
        self.conv_stem = DSConv2d(in_chans, arch.stem_widths[-1], 3, arch.stem_stride)
        self.bn1 = DSBatchNorm2d(arch.stem_widths)
        in_widths = arch.stem_widths
        stages = []
        for i, spec in enumerate(arch.stages):
            # the gate block's attention head holds the slimming head; in a dynamic forward
            # its input runs at the narrowest width of the stage before it
            gate = (dict(gate_grid=arch.gate_grid, gate_hidden=arch.gate_hidden,
                         gate_channels=in_widths[0]) if i == arch.gate_stage else None)
            stages.append(DSStage(in_widths, spec.widths, spec.num_blocks, spec.stride,
                                  arch.se_ratio, gate))
            in_widths = spec.widths
        self.blocks = nn.ModuleList(stages)
        self.classifier = DSLinear(in_widths[-1], num_classes)
        init_weights(self)
        self.routing_space = routing_space  # builds the slimming head (gate.gate.0)

    @property
    def gate_head(self) -> AttentionHead:
        """The attention head holding the slimming head (``blocks.{g}.first_block.gate``)."""
        return self.blocks[self.arch.gate_stage].first_block.gate

    @property
    def classifier_layer(self) -> DSLinear:
        return self.classifier

    # ------------------------------------------------------------------ forward
    def forward_widths(self, x: torch.Tensor, widths: Sequence[int]) -> torch.Tensor:
        """Run the static subnet with one output width per part (stem first)."""
        x = fresh_swish(self.bn1(self.conv_stem(x, widths[0])))    # (B, stem, H/s, W/s)
        for stage, width in zip(self.blocks, widths[1:]):
            x = stage(x, width)                               # (B, width, h, w)
        largest = tuple(widths) == self.arch.largest_widths()
        return self.forward_head(x, dropout=largest)

    def forward_trunk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Shared part of every routed subnet: stem .. gate block's attention head.

        Returns (features (B, C, h, w) entering the gate block's ``conv_pw``,
        slimming-head logits (B, K)).
        """
        widths = self.arch.uniform_widths(self.routing_space[0])
        g = self.arch.gate_stage
        x = fresh_swish(self.bn1(self.conv_stem(x, widths[0])))
        for stage, width in zip(self.blocks[:g], widths[1:g + 1]):
            x = stage(x, width)
        feats, gate_features = self.blocks[g].first_block.forward_pre(x)
        return feats, self.gate_head.gate_logits(gate_features)

    def forward_tail(self, feats: torch.Tensor, subnet: int) -> torch.Tensor:
        """Rest of uniform subnet ``subnet`` from the trunk's features to the logits."""
        widths = self.arch.uniform_widths(subnet)
        g = self.arch.gate_stage
        x = self.blocks[g].first_block.forward_post(feats, widths[g + 1])
        x = self.blocks[g].forward_rest(x, widths[g + 1])
        for stage, width in zip(self.blocks[g + 1:], widths[g + 2:]):
            x = stage(x, width)
        return self.forward_head(x)

    # ------------------------------------------------------------------ MAdds
    def widths_madds(self, widths: Sequence[Width], input_size: int) -> Width:
        return widths_madds(self.arch, widths, self.in_chans, self.num_classes, input_size)

    def gate_map_size(self, input_size: int) -> int:
        # after the gate block's depthwise conv: only a stage's first block strides
        size = conv_out_size(input_size, self.arch.stem_stride)
        for spec in self.arch.stages[:self.arch.gate_stage + 1]:
            size = conv_out_size(size, spec.stride)
        return size

    def trunk_madds(self, input_size: int) -> int:
        # Width 0 from the gate stage's output on counts exactly the trunk: the gate block's
        # depthwise conv and attention head depend on its input width only, and every later
        # term has a zero factor.
        g = self.arch.gate_stage
        narrow = self.arch.uniform_widths(self.routing_space[0])
        return int(self.widths_madds(narrow[:g + 1] + (0,) * (len(narrow) - g - 1),
                                     input_size))

    # ------------------------------------------------------------------ export
    def _export_stem(self, width: int) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
        stem = nn.Conv2d(self.in_chans, width, 3, self.arch.stem_stride, 1, bias=False)
        stem.weight.data.copy_(self.conv_stem.weight[:width])
        return stem, copy_bn(self.bn1, width)

    def _export_classifier(self, c_in: int) -> nn.Linear:
        classifier = nn.Linear(c_in, self.num_classes)
        classifier.weight.data.copy_(self.classifier.weight[:, :c_in])
        classifier.bias.data.copy_(self.classifier.bias)
        return classifier

    def export_static(self, widths: Sequence[int], silu: bool = False) -> StaticNet:
        stem, bn = self._export_stem(widths[0])
        blocks, c_in = [], widths[0]
        for stage, c_out in zip(self.blocks, widths[1:]):
            blocks += _export_blocks(stage.all_blocks, c_in, c_out, silu)
            c_in = c_out
        return StaticNet(stem, bn, blocks, self._export_classifier(c_in), silu)

    def export_trunk(self, silu: bool = False) -> StaticTrunk:
        widths = self.arch.uniform_widths(self.routing_space[0])
        g = self.arch.gate_stage
        stem, bn = self._export_stem(widths[0])
        blocks, c_in = [], widths[0]
        for stage, c_out in zip(self.blocks[:g], widths[1:g + 1]):
            blocks += _export_blocks(stage.all_blocks, c_in, c_out, silu)
            c_in = c_out
        src = self.blocks[g].first_block
        conv_dw = nn.Conv2d(c_in, c_in, 3, src.conv_dw.stride[0], 1, groups=c_in, bias=False)
        conv_dw.weight.data.copy_(src.conv_dw.weight[:c_in])
        return StaticTrunk(stem, bn, blocks, conv_dw, copy_bn(src.bn1, c_in),
                           copy_attention(src.gate, c_in), silu, src.gate.gate_grid)

    def export_tail(self, subnet: int, silu: bool = False) -> StaticTail:
        widths = self.arch.uniform_widths(subnet)
        g = self.arch.gate_stage
        c_in, c_out = widths[g], widths[g + 1]  # trunk width -> this subnet's gate-stage width
        src = self.blocks[g].first_block
        conv_pw = nn.Conv2d(c_in, c_out, 1, bias=False)
        conv_pw.weight.data.copy_(src.conv_pw.weight[:c_out, :c_in])
        blocks = _export_blocks(list(self.blocks[g].residual_blocks), c_out, c_out, silu)
        c_in = c_out
        for stage, c_out in zip(self.blocks[g + 1:], widths[g + 2:]):
            blocks += _export_blocks(stage.all_blocks, c_in, c_out, silu)
            c_in = c_out
        return StaticTail(conv_pw, copy_bn(src.bn2, widths[g + 1]), blocks,
                          self._export_classifier(c_in), silu)

    # ------------------------------------------------------------------ masked
    def masked_tail(self, feats: torch.Tensor, onehot: torch.Tensor,
                    full_width: bool = False) -> torch.Tensor:
        parts = self.routed_parts(onehot, full_width)
        g = self.arch.gate_stage
        x = self.blocks[g].first_block.masked_post(feats, parts[0])
        prev = parts[0]
        for stage, part in zip(self.blocks[g:], parts):
            blocks = stage.all_blocks
            if stage is self.blocks[g]:
                blocks = blocks[1:]                 # its first block's pre part is the trunk's
            for block in blocks:
                x = block.masked_post(block.masked_pre(x, prev), part)
                prev = part
        return self.forward_head(x)             # zeroed features add nothing to the pool/fc



@register_model("ds_mbnet_v1", aliases=("slimmable_mbnet_v1_bn_uniform",))
def ds_mbnet_v1(num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0,
                routing_space: Sequence[int] = (0, 1, 2, 3)) -> DSNet:
    """DS-MBNet, the release's supernet (ImageNet, 224 px, 14 subnets 133M-565M MAdds)."""
    return DSNet(DS_MBNET_V1, num_classes, in_chans, drop_rate, routing_space)


@register_model("ds_mbnet_small")
def ds_mbnet_small(num_classes: int = 10, in_chans: int = 1, drop_rate: float = 0.0,
                   routing_space: Sequence[int] = (0, 1, 2, 3)) -> DSNet:
    """A small DS-MBNet for 28-32 px inputs (the embedded MNIST default's model)."""
    return DSNet(DS_MBNET_SMALL, num_classes, in_chans, drop_rate, routing_space)


@register_model("ds_mbnet_tiny")
def ds_mbnet_tiny(num_classes: int = 10, in_chans: int = 1, drop_rate: float = 0.0,
                  routing_space: Sequence[int] = (0, 1, 2, 3)) -> DSNet:
    """DS-MBNet for 28 px grey images with a shared full-width trunk, slimming only after the
    gate (the embedded Fashion-MNIST default's model; 14 subnets 0.61M-3.31M MAdds)."""
    return DSNet(DS_MBNET_TINY, num_classes, in_chans, drop_rate, routing_space)
