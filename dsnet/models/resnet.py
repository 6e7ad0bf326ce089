"""DS-ResNet: dynamic slimmable ResNets (the paper's DS-ResNet-50, never released).

torchvision's ResNet layout and module names (``conv1``, ``bn1``, ``layer{i}.{j}.conv1`` ..
``conv3``/``bn3``/``downsample``, ``fc``), so a torchvision or timm ResNet-50 state dict
loads key by key (:func:`dsnet.load_pretrained`), plus the DS-Net gate ``gate`` (attention
head ``conv_reduce``/``conv_expand`` and slimming head ``gate.0``) at the start of the gate
stage. From the gate stage on, each bottleneck's inner width (the 1x1 -> 3x3 -> 1x1 middle
channels) is sliced to the subnet's width, and so is the block output (residual) width,
``expansion`` times the inner one (``slice_residual``, the default of the registered
models). Every BatchNorm keeps running statistics per width
(:class:`~dsnet.models.layers.DSBatchNorm2d`); with the residual sliced, each per-width statistic
sees one subnet's inputs only. Without it (``slice_residual=False``) the residual stream's
BatchNorms (``bn3``, the projections) have one width and therefore one set of statistics
for every subnet, whose inputs differ: measured, that costs the slim subnets 16 points
after BN recalibration (docs/differences.md).

The gate reads the features entering the gate stage: its attention head (pool -> reduce ->
ReLU -> expand -> sigmoid -> multiply) acts in every mode, like DS-MBNet's; its slimming
head picks, per sample, the uniform subnet of the routing space that runs the gate stage
and the rest. ``attention=False`` drops the attention head (the slimming head stays), so
the largest network is exactly torchvision's ResNet-50.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dsnet.models.arch import DS_RESNET50, DS_RESNET_SMALL, ResNetSpec
from dsnet.models.export import (
    StaticBottleneck,
    StaticGate,
    StaticResTrunk,
    classifier_parts,
    copy_attention,
    copy_bn,
    copy_conv,
    copy_linear,
    resnet_sequence,
)
from dsnet.models.layers import (
    AttentionHead,
    DSBatchNorm2d,
    DSConv2d,
    DSLinear,
    RoutedPart,
    fresh_add,
    fresh_relu,
)
from dsnet.models.madds import Width, conv_out_size
from dsnet.models.pretrained import plain_to_supernet_state
from dsnet.models.registry import register_model
from dsnet.models.supernet import DSSupernet, init_weights


def _masked_bn(bn: DSBatchNorm2d, x: torch.Tensor, part: RoutedPart | None) -> torch.Tensor:
    """BatchNorm of a fixed-width part (``part`` None), or masked per sample."""
    return bn(x) if part is None else part.bn(bn, x * part.mask)


class DSDownsample(nn.Sequential):
    """torchvision's projection shortcut (1x1 conv, BN) with a sliceable output width."""

    def __init__(self, in_channels: int, out_widths: Sequence[int], stride: int) -> None:
        super().__init__(DSConv2d(in_channels, out_widths[-1], 1, stride),
                         DSBatchNorm2d(out_widths))

    def forward(self, x: torch.Tensor, out_width: int) -> torch.Tensor:
        return self[1](self[0](x, out_width))                  # (B, out_width, H/s, W/s)


class DSBottleneck(nn.Module):
    """torchvision's ``Bottleneck`` (stride on the 3x3: ResNet V1.5) with a sliced inner width.

    conv1 (1x1) -> bn1 -> ReLU -> conv2 (3x3, stride) -> bn2 -> ReLU -> conv3 (1x1) -> bn3,
    plus the shortcut (identity or ``downsample``), -> ReLU. ``width`` is the running inner
    width, ``out_width`` the residual width.

    Args:
        in_widths: input width choices (the previous block's residual widths).
        widths: inner width choices.
        out_widths: residual width choices.
        stride: stride of the 3x3 and of the shortcut's projection.
    """

    def __init__(self, in_widths: Sequence[int], widths: Sequence[int],
                 out_widths: Sequence[int], stride: int) -> None:
        super().__init__()
        self.conv1 = DSConv2d(in_widths[-1], widths[-1], 1)
        self.bn1 = DSBatchNorm2d(widths)
        self.conv2 = DSConv2d(widths[-1], widths[-1], 3, stride)
        self.bn2 = DSBatchNorm2d(widths)
        self.conv3 = DSConv2d(widths[-1], out_widths[-1], 1)
        self.bn3 = DSBatchNorm2d(out_widths)
        # torchvision's rule: a projection where the stride or the width changes
        self.downsample = (DSDownsample(in_widths[-1], out_widths, stride)
                           if stride != 1 or in_widths[-1] != out_widths[-1] else None)

    def forward(self, x: torch.Tensor, width: int, out_width: int) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, out_width, H/s, W/s)."""
        identity = x if self.downsample is None else self.downsample(x, out_width)
        out = fresh_relu(self.bn1(self.conv1(x, width)))       # (B, width, H, W)
        out = fresh_relu(self.bn2(self.conv2(out, width)))     # (B, width, H/s, W/s)
        out = self.bn3(self.conv3(out, out_width))             # (B, out_width, H/s, W/s)
        return fresh_relu(fresh_add(out, identity))

    def masked_forward(self, x: torch.Tensor, inner: RoutedPart,
                       out: RoutedPart | None) -> torch.Tensor:
        """The release's masked execution: every sample at the common widths, channels
        beyond its own width zeroed after each sliced conv and BN (per-sample statistics).

        Args:
            x: (B, C, H, W) input (zero beyond each sample's residual width when sliced).
            inner: the stage's routed inner widths.
            out: the routed residual widths, None where the residual is not sliced.
        """
        out_width = out.width if out is not None else self.bn3.widths[-1]
        identity = x
        if self.downsample is not None:
            identity = _masked_bn(self.downsample[1], self.downsample[0](x, out_width), out)
        y = fresh_relu(inner.bn(self.bn1, self.conv1(x, inner.width) * inner.mask))
        y = fresh_relu(inner.bn(self.bn2, self.conv2(y, inner.width) * inner.mask))
        y = _masked_bn(self.bn3, self.conv3(y, out_width), out)
        return fresh_relu(fresh_add(y, identity))

    def export(self, c_in: int, width: int, c_out: int) -> StaticBottleneck:
        """A plain :class:`~dsnet.models.export.StaticBottleneck` holding copies at these widths."""
        downsample = None
        if self.downsample is not None:
            downsample = nn.Sequential(copy_conv(self.downsample[0], c_out, c_in),
                                       copy_bn(self.downsample[1], c_out))
        return StaticBottleneck(copy_conv(self.conv1, width, c_in), copy_bn(self.bn1, width),
                                copy_conv(self.conv2, width, width), copy_bn(self.bn2, width),
                                copy_conv(self.conv3, c_out, width), copy_bn(self.bn3, c_out),
                                downsample)

    def madds(self, c_in: Width, width: Width, c_out: Width, size: int) -> tuple[Width, int]:
        """(MAdds, output size) of the block on a ``size`` x ``size`` input."""
        out_size = conv_out_size(size, self.conv2.stride[0])
        total = c_in * width * size * size + 9 * width * width * out_size * out_size \
            + width * c_out * out_size * out_size
        if self.downsample is not None:
            total = total + c_in * c_out * out_size * out_size
        return total, out_size


class DSResStage(nn.ModuleList):
    """A stage of bottlenecks (torchvision's ``layer{i}``: ``0``, ``1``, ...)."""

    def __init__(self, in_widths: Sequence[int], widths: Sequence[int],
                 out_widths: Sequence[int], num_blocks: int, stride: int) -> None:
        super().__init__([DSBottleneck(in_widths, widths, out_widths, stride)] + [
            DSBottleneck(out_widths, widths, out_widths, 1) for _ in range(num_blocks - 1)])

    def forward(self, x: torch.Tensor, width: int, out_width: int) -> torch.Tensor:
        for block in self:
            x = block(x, width, out_width)
        return x

    def export(self, c_in: int, width: int, c_out: int) -> nn.Sequential:
        blocks = []
        for block in self:
            blocks.append(block.export(c_in, width, c_out))
            c_in = c_out
        return nn.Sequential(*blocks)


class DSResNet(DSSupernet):
    """A dynamic slimmable ResNet (see the module docstring); call it as any
    :class:`~dsnet.models.supernet.DSSupernet`.

    Args:
        arch: the architecture.
        num_classes: classifier outputs.
        in_chans: input channels.
        drop_rate: dropout before the classifier, applied to the largest network only.
        routing_space: uniform subnets the slimming head chooses among (ascending).
        attention: keep the gate's attention head (False: slimming head only, and the
            largest network is the plain ResNet).
    """

    def __init__(self, arch: ResNetSpec, num_classes: int = 1000, in_chans: int = 3,
                 drop_rate: float = 0.0, routing_space: Sequence[int] = (0, 1, 2, 3),
                 attention: bool = True) -> None:
        super().__init__(arch, num_classes, in_chans, drop_rate)
        self.conv1 = DSConv2d(in_chans, arch.stem_widths[-1], arch.stem_kernel, arch.stem_stride)
        self.bn1 = DSBatchNorm2d(arch.stem_widths)
        in_widths = arch.stem_widths
        for i, spec in enumerate(arch.stages):
            self.add_module(f"layer{i + 1}", DSResStage(in_widths, spec.widths,
                                                        arch.out_widths(i), spec.num_blocks,
                                                        spec.stride))
            in_widths = arch.out_widths(i)
        g = arch.gate_stage   # the gate reads the features entering stage g
        gate_width = arch.out_widths(g - 1)[-1] if g > 0 else arch.stem_widths[-1]
        self.gate = AttentionHead(gate_width, arch.se_ratio, attention=attention,
                                  gate_grid=arch.gate_grid, gate_hidden=arch.gate_hidden)
        self.fc = DSLinear(in_widths[-1], num_classes)
        init_weights(self)
        zero_init_residual(self)
        self.routing_space = routing_space  # builds the slimming head (gate.gate.0)

    @property
    def stages(self) -> list[DSResStage]:
        """``layer1``, ``layer2``, ... in order."""
        return [getattr(self, f"layer{i + 1}") for i in range(len(self.arch.stages))]

    @property
    def gate_head(self) -> AttentionHead:
        """The gate (``gate``): attention head and slimming head ``gate.gate``."""
        return self.gate

    @property
    def classifier_layer(self) -> DSLinear:
        return self.fc

    # ------------------------------------------------------------------ forward
    def forward_stem(self, x: torch.Tensor, width: int) -> torch.Tensor:
        """conv1 -> bn1 -> ReLU (-> max pool): (B, C, H, W) -> (B, width, H/4, W/4)."""
        x = fresh_relu(self.bn1(self.conv1(x, width)))
        return F.max_pool2d(x, 3, 2, 1) if self.arch.stem_pool else x

    def _run_stages(self, x: torch.Tensor, widths: Sequence[int], first: int,
                    last: int) -> torch.Tensor:
        """Stages ``first`` .. ``last - 1`` at the subnet's per-part ``widths``."""
        for i in range(first, last):
            width = widths[i + 1]
            x = self.stages[i](x, width, self.arch.out_width(i, width))  # (B, C_out, h, w)
        return x

    def forward_widths(self, x: torch.Tensor, widths: Sequence[int]) -> torch.Tensor:
        """Run the static subnet with one inner width per part (stem first)."""
        g = self.arch.gate_stage
        x = self._run_stages(self.forward_stem(x, widths[0]), widths, 0, g)
        if self.gate.attends:                 # the attention head acts in every mode
            x = self.gate(x, inplace=True)
        x = self._run_stages(x, widths, g, len(self.arch.stages))
        return self.forward_head(x, dropout=tuple(widths) == self.arch.largest_widths())

    def forward_trunk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stem, the stages before the gate and the gate.

        Returns (features (B, C, h, w) entering the gate stage, attention applied;
        slimming-head logits (B, K)).
        """
        widths = self.arch.uniform_widths(self.routing_space[0])
        x = self._run_stages(self.forward_stem(x, widths[0]), widths, 0, self.arch.gate_stage)
        feats, gate_features = self.gate.forward_with_reduced(x, inplace=True)
        return feats, self.gate.gate_logits(gate_features)

    def forward_tail(self, feats: torch.Tensor, subnet: int) -> torch.Tensor:
        """The gate stage and the rest of uniform subnet ``subnet``, to the logits."""
        widths = self.arch.uniform_widths(subnet)
        x = self._run_stages(feats, widths, self.arch.gate_stage, len(self.arch.stages))
        return self.forward_head(x)

    # ------------------------------------------------------------------ MAdds
    def _gate_features_madds(self, channels: int, size: int) -> int:
        """The gate's pool and reduce, and its expand with an attention head."""
        r = self.gate.reduced_channels
        return channels * size * size + channels * r + (r * channels if self.gate.attends else 0)

    def _part_madds(self, widths: Sequence[Width], input_size: int
                    ) -> tuple[list[Width], int, int]:
        """MAdds per part (stem, each stage, then the global pool and classifier), and the
        channels and map size entering the gate stage (where the gate reads)."""
        a = self.arch
        size = conv_out_size(input_size, a.stem_stride, a.stem_kernel)
        parts = [self.in_chans * widths[0] * a.stem_kernel ** 2 * size * size]
        if a.stem_pool:
            size = conv_out_size(size, 2, 3)
        c_in, gate_in = widths[0], (widths[0], size)
        for i, (stage, width) in enumerate(zip(self.stages, widths[1:])):
            if i == a.gate_stage:
                gate_in = (c_in, size)
            c_out, total = a.out_width(i, width), 0
            for block in stage:
                cost, size = block.madds(c_in, width, c_out, size)
                total, c_in = total + cost, c_out
            parts.append(total)
        return parts + [c_in * size * size + c_in * self.num_classes], *gate_in

    def widths_madds(self, widths: Sequence[Width], input_size: int) -> Width:
        parts, gate_channels, gate_size = self._part_madds(widths, input_size)
        total = sum(parts[1:], parts[0])       # stem, stages, then pool + classifier
        if self.gate.attends:
            total = total + self._gate_features_madds(gate_channels, gate_size)
        return total

    def trunk_madds(self, input_size: int) -> int:
        widths = self.arch.uniform_widths(self.routing_space[0])
        parts, gate_channels, gate_size = self._part_madds(widths, input_size)
        g = self.arch.gate_stage
        return int(sum(parts[:g + 1]) + self._gate_features_madds(gate_channels, gate_size))

    def gate_madds(self, input_size: int) -> int:
        _, channels, size = self._part_madds(self.arch.largest_widths(), input_size)
        head = self.gate.slimming_madds(size)
        # Without an attention head the static count has no gate: add its pool and reduce.
        return head + (0 if self.gate.attends else self._gate_features_madds(channels, size))

    def gate_map_size(self, input_size: int) -> int:
        return self._part_madds(self.arch.largest_widths(), input_size)[2]

    # ------------------------------------------------------------------ export
    def _export_stem(self, width: int) -> list[tuple[str, nn.Module]]:
        parts = [("conv1", copy_conv(self.conv1, width, self.in_chans)),
                 ("bn1", copy_bn(self.bn1, width)), ("relu", nn.ReLU(inplace=True))]
        return parts + ([("maxpool", nn.MaxPool2d(3, 2, 1))] if self.arch.stem_pool else [])

    def _export_stages(self, widths: Sequence[int], c_in: int, first: int, last: int
                       ) -> tuple[list[tuple[str, nn.Module]], int]:
        parts = []
        for i in range(first, last):
            c_out = self.arch.out_width(i, widths[i + 1])
            parts.append((f"layer{i + 1}", self.stages[i].export(c_in, widths[i + 1], c_out)))
            c_in = c_out
        return parts, c_in

    def _export_gate(self, channels: int) -> StaticGate:
        gate = StaticGate(channels, self.gate.reduced_channels, self.gate.attends,
                          self.gate.gate_grid)
        gate.conv_reduce.weight.data.copy_(self.gate.conv_reduce.weight[:, :channels])
        gate.conv_reduce.bias.data.copy_(self.gate.conv_reduce.bias)
        if gate.conv_expand is not None:
            gate.conv_expand.weight.data.copy_(self.gate.conv_expand.weight[:channels])
            gate.conv_expand.bias.data.copy_(self.gate.conv_expand.bias[:channels])
        return gate

    def export_static(self, widths: Sequence[int], silu: bool = False) -> nn.Sequential:
        """torchvision-named ``nn.Sequential``; ``silu`` is ignored (a ReLU network)."""
        g, n = self.arch.gate_stage, len(self.arch.stages)
        trunk, c_in = self._export_stages(widths, widths[0], 0, g)
        gate = [("gate", copy_attention(self.gate, c_in))] if self.gate.attends else []
        tail, c_in = self._export_stages(widths, c_in, g, n)
        return resnet_sequence(self._export_stem(widths[0]) + trunk + gate + tail
                               + classifier_parts(copy_linear(self.fc, c_in)))

    def export_trunk(self, silu: bool = False) -> StaticResTrunk:
        widths = self.arch.uniform_widths(self.routing_space[0])
        stages, c_in = self._export_stages(widths, widths[0], 0, self.arch.gate_stage)
        return StaticResTrunk(resnet_sequence(self._export_stem(widths[0]) + stages),
                              self._export_gate(c_in))

    def export_tail(self, subnet: int, silu: bool = False) -> nn.Sequential:
        widths = self.arch.uniform_widths(subnet)
        g = self.arch.gate_stage
        c_in = self.arch.out_width(g - 1, widths[g]) if g > 0 else widths[0]
        stages, c_in = self._export_stages(widths, c_in, g, len(self.arch.stages))
        return resnet_sequence(stages + classifier_parts(copy_linear(self.fc, c_in)))

    # ------------------------------------------------------------------ masked
    def _residual_parts(self, onehot: torch.Tensor, full_width: bool
                        ) -> list[RoutedPart | None]:
        """Routed residual widths per stage from the gate on (None: not sliced)."""
        g, space = self.arch.gate_stage, self.routing_space
        if not self.arch.slice_residual:
            return [None] * (len(self.arch.stages) - g)
        parts = []
        for i in range(g, len(self.arch.stages)):
            choices = self.arch.out_widths(i)
            widths = [choices[c] for c in space]
            parts.append(RoutedPart(onehot, widths, choices[-1] if full_width else max(widths)))
        return parts

    def masked_tail(self, feats: torch.Tensor, onehot: torch.Tensor,
                    full_width: bool = False) -> torch.Tensor:
        x = feats                                 # (B, C, h, w), the gate applied
        inner = self.routed_parts(onehot, full_width)
        residual = self._residual_parts(onehot, full_width)
        for stage, part, out in zip(self.stages[self.arch.gate_stage:], inner, residual):
            for block in stage:
                x = block.masked_forward(x, part, out)
        return self.forward_head(x)               # zeroed features add nothing to pool/fc

    # ------------------------------------------------------------------ pretrained
    def load_plain_state_dict(self, state: Mapping[str, torch.Tensor],
                              source: str = "state dict") -> None:
        """Load a plain ResNet's weights (torchvision/timm names); see
        :func:`dsnet.load_pretrained`.

        The gate, which a plain ResNet lacks, keeps its initialisation, except that an
        attention head starts neutral: ``conv_expand`` zero, so it scales the features by a
        uniform 0.5, which the BatchNorms right after it cancel (train mode: batch
        statistics; eval mode: their running statistics are rescaled here). The supernet
        then computes the plain network's function in both modes.
        """
        mapped = plain_to_supernet_state(self, state, optional=("gate.",), source=source)
        self.load_state_dict(mapped, strict=False)   # what the file lacks keeps its value
        if self.gate.attends and "gate.conv_expand.weight" not in state:
            self._neutral_attention()

    @torch.no_grad()
    def _neutral_attention(self) -> None:
        self.gate.conv_expand.weight.zero_()
        self.gate.conv_expand.bias.zero_()       # sigmoid(0) = 0.5 on every channel
        first = self.stages[self.arch.gate_stage][0]
        if first.downsample is None:             # an identity shortcut would carry the 0.5
            return
        for bn in (first.bn1, first.downsample[1]):   # linear convs of the 0.5-scaled input
            for stats in bn.aux_bn:
                stats.running_mean.mul_(0.5)
                stats.running_var.mul_(0.25)


@torch.no_grad()
def zero_init_residual(model: nn.Module) -> None:
    """Every bottleneck's last BatchNorm scale (the shared affine of ``bn3``) starts at zero,
    so each residual branch starts as nothing and the network as its shortcuts (torchvision's
    ``zero_init_residual``, Goyal et al. 2017). From scratch it is what makes the sandwich
    train: 150 steps of the largest ds_resnet_small on Fashion-MNIST reach 78 % top-1 with it,
    52-61 % without (the residual sums grow block by block and the first logits are large)."""
    for module in model.modules():
        if isinstance(module, DSBottleneck):
            module.bn3.aux_bn[-1].weight.zero_()


def _arch(base: ResNetSpec, slice_residual: bool) -> ResNetSpec:
    return dataclasses.replace(base, slice_residual=slice_residual)


@register_model("ds_resnet50")
def ds_resnet50(num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0,
                routing_space: Sequence[int] = (0, 1, 2, 3), attention: bool = True,
                slice_residual: bool = True) -> DSResNet:
    """DS-ResNet-50: torchvision's ResNet-50 as a supernet (224 px, the gate at the third
    stage, 14 subnets of 1.93-4.09 GMAdds: inner and residual widths 3/16 .. 16/16 of the
    third and fourth stages). ``slice_residual=False`` slims the inner widths only (2.25 G
    at the slim end; measured worse, see docs/differences.md)."""
    return DSResNet(_arch(DS_RESNET50, slice_residual), num_classes, in_chans, drop_rate,
                    routing_space, attention)


@register_model("ds_resnet_small")
def ds_resnet_small(num_classes: int = 10, in_chans: int = 1, drop_rate: float = 0.0,
                    routing_space: Sequence[int] = (0, 1, 2, 3), attention: bool = True,
                    slice_residual: bool = True) -> DSResNet:
    """A small DS-ResNet for 28 px grey images, 14 subnets of 1.74-6.64M MAdds (the embedded
    Fashion-MNIST default's other family: ``--set model=ds_resnet_small``)."""
    return DSResNet(_arch(DS_RESNET_SMALL, slice_residual), num_classes, in_chans, drop_rate,
                    routing_space, attention)
