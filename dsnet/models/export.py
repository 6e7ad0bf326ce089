"""Export a subnet (or the dynamic network) of a supernet as plain static modules.

The exported module is built from ordinary ``nn.Conv2d`` / ``nn.BatchNorm2d`` / ``nn.Linear``
layers holding *copies* of the sliced weights; the chosen width's BatchNorm statistics become
ordinary running statistics. It gives the supernet's logits for that subnet in eval mode
(bit for bit with the default activation, the release's ``x * sigmoid(x)``; ``silu=True``
uses the fused ``nn.SiLU``, a few per cent faster on a CPU and within 1e-6) and works with
``torch.jit.script`` and ``torch.export``.

:func:`export_dynamic` does the same for the eval-mode dynamic network: a shared trunk, the
slimming head and one static tail per routed subnet, with samples grouped by choice.

This module holds the static building blocks of every supernet family (MobileNet blocks,
ResNet bottlenecks) and the copy helpers; each family fills them itself (its
``export_static`` / ``export_trunk`` / ``export_tail``, Once-for-All style), so this module
never imports a supernet and the two public functions work for every registered model.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from dsnet.models.arch import Subnet
from dsnet.models.layers import (
    AttentionHead,
    DSBatchNorm2d,
    DSConv2d,
    DSLinear,
    Swish,
    fresh_mul,
    gate_input,
)

if TYPE_CHECKING:  # type hints only: the supernets import this module
    from dsnet.models.supernet import DSSupernet


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


def copy_bn(src: DSBatchNorm2d, width: int) -> nn.BatchNorm2d:
    """A plain BatchNorm of ``width`` channels: that width's statistics, the shared affine."""
    stats, shared = src.bn_for_width(width), src.aux_bn[-1]
    bn = nn.BatchNorm2d(width, eps=shared.eps, momentum=shared.momentum)
    bn.weight.data.copy_(shared.weight[:width])
    bn.bias.data.copy_(shared.bias[:width])
    bn.running_mean.copy_(stats.running_mean)
    bn.running_var.copy_(stats.running_var)
    return bn


def copy_conv(src: DSConv2d, c_out: int, c_in: int) -> nn.Conv2d:
    """A plain convolution holding ``src``'s first ``c_out`` filters over ``c_in`` inputs."""
    conv = nn.Conv2d(c_in, c_out, src.kernel_size, src.stride, src.padding,
                     bias=src.bias is not None)
    conv.weight.data.copy_(src.weight[:c_out, :c_in])
    if src.bias is not None:
        conv.bias.data.copy_(src.bias[:c_out])
    return conv


def copy_linear(src: DSLinear, c_in: int) -> nn.Linear:
    """A plain classifier reading the first ``c_in`` features."""
    fc = nn.Linear(c_in, src.out_features)
    fc.weight.data.copy_(src.weight[:, :c_in])
    fc.bias.data.copy_(src.bias)
    return fc


def copy_attention(src: AttentionHead, width: int) -> StaticAttention:
    """The attention head of a ``width``-channel input (``src.attends`` must hold)."""
    att = StaticAttention(width, src.reduced_channels)
    att.conv_reduce.weight.data.copy_(src.conv_reduce.weight[:, :width])
    att.conv_reduce.bias.data.copy_(src.conv_reduce.bias)
    att.conv_expand.weight.data.copy_(src.conv_expand.weight[:width])
    att.conv_expand.bias.data.copy_(src.conv_expand.bias[:width])
    return att


# ----------------------------------------------------------------------------- dynamic


class StaticTrunk(nn.Module):
    """DS-MBNet's stem .. the gate block's attention head, at the narrow widths every routed
    subnet shares.

    Returns the features entering the gate block's ``conv_pw`` and what the slimming head
    reads: the attention head's reduced features, or (``gate_grid`` > 0) the attention
    head's input pooled to a grid (:func:`~dsnet.models.layers.gate_input`).
    """

    def __init__(self, stem: nn.Conv2d, bn: nn.BatchNorm2d, blocks: list[StaticBlock],
                 conv_dw: nn.Conv2d, bn_dw: nn.BatchNorm2d, attention: StaticAttention,
                 silu: bool = False, gate_grid: int = 0) -> None:
        super().__init__()
        self.conv_stem = stem
        self.bn1 = bn
        self.act = activation(silu)
        self.blocks = nn.Sequential(*blocks)
        self.conv_dw = conv_dw
        self.bn_dw = bn_dw
        self.gate = attention
        self.gate_grid = gate_grid

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.blocks(self.act(self.bn1(self.conv_stem(x))))
        x = self.act(self.bn_dw(self.conv_dw(x)))                 # (B, C, h, w)
        pooled = nn.functional.adaptive_avg_pool2d(x, 1)          # (B, C, 1, 1)
        reduced = torch.relu(self.gate.conv_reduce(pooled))       # (B, r, 1, 1)
        features = gate_input(x, reduced, self.gate_grid)         # (B, F, 1, 1)
        return fresh_mul(x, self.gate.conv_expand(reduced).sigmoid()), features


class StaticTail(nn.Module):
    """One routed DS-MBNet subnet after the trunk: gate block's conv_pw/BN/Swish, blocks,
    classifier."""

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
    order, which is what ``model(x, subnet="dynamic")`` computes in eval mode.

    Attributes:
        subnets: (K,) long buffer, the uniform subnet index of each tail (routing space).
    """

    def __init__(self, trunk: nn.Module, slimming_head: nn.Module, tails: list[nn.Module],
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
        feats, gate_features = self.trunk(x)                      # (B, C, h, w), (B, F, 1, 1)
        index = self.slimming_head(gate_features).flatten(1).argmax(1)  # (B,)
        logits = torch.empty(x.size(0), self.num_classes, dtype=feats.dtype,
                             device=feats.device)
        for k, tail in enumerate(self.tails):
            rows = (index == k).nonzero().flatten()
            # Empty groups are skipped: a zero-batch conv still costs a kernel launch.
            if rows.numel() > 0:
                # feats[rows] keeps a channels-last layout (index_select would not)
                logits.index_copy_(0, rows, tail(feats[rows]))
        return logits, self.subnets[index]


# ----------------------------------------------------------------------------- ResNet


class StaticBottleneck(nn.Module):
    """torchvision's ``Bottleneck`` (stride on the 3x3, as ResNet V1.5) at fixed widths, with
    its module names: a ResNet export's state dict reads like torchvision's."""

    def __init__(self, conv1: nn.Conv2d, bn1: nn.BatchNorm2d, conv2: nn.Conv2d,
                 bn2: nn.BatchNorm2d, conv3: nn.Conv2d, bn3: nn.BatchNorm2d,
                 downsample: nn.Sequential | None) -> None:
        super().__init__()
        self.conv1, self.bn1, self.conv2, self.bn2 = conv1, bn1, conv2, bn2
        self.conv3, self.bn3 = conv3, bn3
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity  # in place, as torchvision: out is this block's fresh tensor
        return self.relu(out)


class StaticGate(nn.Module):
    """A ResNet supernet's gate at fixed width: pool -> reduce -> ReLU (what the slimming
    head reads), then, with an attention head, expand -> sigmoid -> multiply.

    ``forward`` returns (features, what the slimming head reads (B, F, 1, 1): the reduced
    features, or with ``gate_grid`` > 0 the input pooled to a grid); a static subnet, which
    needs neither, applies the attention with a :class:`StaticAttention`.
    """

    def __init__(self, channels: int, reduced: int, attention: bool,
                 gate_grid: int = 0) -> None:
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, reduced, 1, bias=True)
        self.conv_expand = nn.Conv2d(reduced, channels, 1, bias=True) if attention else None
        self.gate_grid = gate_grid

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = nn.functional.adaptive_avg_pool2d(x, 1)          # (B, C, 1, 1)
        reduced = torch.relu(self.conv_reduce(pooled))            # (B, r, 1, 1)
        features = gate_input(x, reduced, self.gate_grid)         # (B, F, 1, 1)
        if self.conv_expand is not None:
            x = fresh_mul(x, self.conv_expand(reduced).sigmoid())
        return x, features


def resnet_sequence(parts: Sequence[tuple[str, nn.Module]]) -> nn.Sequential:
    """A static ResNet (or a piece of one) as an ``nn.Sequential`` of named parts, so its
    state dict keys are torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1``, ``fc``)."""
    seq = nn.Sequential()
    for name, module in parts:
        seq.add_module(name, module)
    return seq


def classifier_parts(fc: nn.Linear) -> list[tuple[str, nn.Module]]:
    """Global average pool, flatten, classifier (torchvision's ``avgpool`` and ``fc``)."""
    return [("avgpool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten(1)), ("fc", fc)]


class StaticResTrunk(nn.Module):
    """A ResNet supernet's trunk: stem and the stages before the gate, then the gate.

    Returns (features entering the gate stage (B, C, h, w), gate features (B, F, 1, 1)).
    """

    def __init__(self, body: nn.Sequential, gate: StaticGate) -> None:
        super().__init__()
        self.body = body
        self.gate = gate

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gate(self.body(x))


# ----------------------------------------------------------------------------- public API


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def export_subnet(model: DSSupernet, subnet: Subnet | None = "largest",
                  silu: bool = False) -> nn.Module:
    """Copy a static subnet of ``model`` into plain ``nn`` modules (eval mode).

    DS-MBNet gives a :class:`StaticNet`; a DS-ResNet an ``nn.Sequential`` named like
    torchvision's ResNet (its state dict loads back with :func:`dsnet.load_pretrained`).

    Args:
        model: the supernet.
        subnet: ``"largest"``, ``"smallest"`` or a uniform subnet index.
        silu: use ``nn.SiLU`` instead of the release's ``x * sigmoid(x)`` (faster, not
            bitwise equal; a ReLU network ignores it).
    """
    model = getattr(model, "module", model)
    net = model.export_static(model.arch.resolve(subnet), silu)
    return net.to(_device(model)).eval()


@torch.no_grad()
def export_dynamic(model: DSSupernet, silu: bool = False) -> DynamicStaticNet:
    """Copy the eval-mode dynamic network of ``model`` into a :class:`DynamicStaticNet`.

    The trunk, the slimming head and one tail per subnet of ``model.routing_space`` are
    plain ``nn`` modules holding copies of the sliced weights; the result works with
    ``torch.jit.script`` (its data-dependent grouping rules out ``torch.export``).
    ``silu`` as in :func:`export_subnet`.
    """
    model = getattr(model, "module", model)
    head = copy.deepcopy(model.gate_head.gate)   # plain nn modules already (convs, ReLU)
    tails = [model.export_tail(c, silu) for c in model.routing_space]
    net = DynamicStaticNet(model.export_trunk(silu), head, tails, list(model.routing_space),
                           model.num_classes)
    return net.to(_device(model)).eval()
