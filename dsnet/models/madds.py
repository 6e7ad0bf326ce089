"""Multiply-adds (MAdds) with the release's counting rule.

Counted for the running widths: every convolution ``in * out * k * k * H_out * W_out /
groups``, the attention heads' 1x1 convolutions (on a 1x1 map), every average pool as
``channels * H_in * W_in`` and the classifier ``in * out``. BatchNorm, activations, max
pooling, residual sums and the attention multiply are free. The count is analytic (no
forward pass), so it is exact and cheap for any input size. Each supernet family counts
its own topology (``model.widths_madds``; DS-MBNet's is :func:`widths_madds` here, the
DS-ResNets' in :mod:`dsnet.models.resnet`); the functions below work for every model.

Widths may also be tensors (one width per sample): every layer's count multiplies its
running input and output widths, which is how the release's gate-training complexity term
(:func:`masked_expected_madds`) makes the count quadratic in the gate's one-hot.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dsnet.models.arch import ArchSpec, Subnet
from dsnet.models.layers import make_divisible

Width = int | torch.Tensor  # an exact int, or a float tensor (B,) of per-sample widths


def conv_out_size(size: int, stride: int, kernel: int = 3) -> int:
    """Output size of a convolution (or pool) with the release's "same" padding."""
    pad = ((stride - 1) + (kernel - 1)) // 2
    return (size + 2 * pad - kernel) // stride + 1


_conv_out = conv_out_size


def _block_madds(c_in: Width, c_out: Width, c_max: int, size: int, se_ratio: float) -> Width:
    """One depthwise-separable block at output map ``size`` x ``size``."""
    r = make_divisible(c_max * se_ratio, 1)
    hw = size * size
    depthwise = c_in * 9 * hw
    attention = c_in * hw + c_in * r + r * c_in   # pool + reduce + expand
    pointwise = c_in * c_out * hw
    return depthwise + attention + pointwise


def widths_madds(arch: ArchSpec, widths: Sequence[Width], in_chans: int, num_classes: int,
                 input_size: int) -> Width:
    """MAdds of the DS-MBNet static subnet with the given per-part widths.

    With int widths an exact int; a part's width may instead be a tensor (B,) of running
    widths, and the count (B,) then broadcasts the same rule (exact in float64 for
    integer-valued widths).
    """
    size = _conv_out(input_size, arch.stem_stride)
    total = in_chans * widths[0] * 9 * size * size
    c_in, in_choices = widths[0], arch.stem_widths
    for spec, c_out in zip(arch.stages, widths[1:]):
        for b in range(spec.num_blocks):
            size = _conv_out(size, spec.stride if b == 0 else 1)
            c_max = in_choices[-1] if b == 0 else spec.widths[-1]
            total += _block_madds(c_in, c_out, c_max, size, arch.se_ratio)
            c_in = c_out
        in_choices = spec.widths
    return total + c_in * size * size + c_in * num_classes   # global pool + classifier


def count_madds(model: torch.nn.Module, subnet: Subnet | None = "largest",
                input_size: int | None = None) -> int:
    """MAdds of one image through a static subnet of ``model``.

    Args:
        model: a DS-Net supernet (``dsnet.create_model``), any family.
        subnet: ``"largest"``, ``"smallest"`` or a uniform subnet index. For the dynamic
            mode use :func:`routing_madds` (per choice) and average over the samples.
        input_size: square input resolution (default: the architecture's).

    Returns:
        The count as an exact integer (ds_mbnet_v1 at 224: subnet 0 -> 132,890,144).
    """
    model = getattr(model, "module", model)
    widths = model.arch.resolve(subnet)
    return int(model.widths_madds(widths, input_size or model.arch.img_size))


def routing_madds(model: torch.nn.Module, input_size: int | None = None) -> torch.Tensor:
    """MAdds of each routing choice (float64 tensor (K,)), gate head included.

    The expected MAdds of a dynamic forward is ``(gate_weights * routing_madds).sum(1)``;
    with the straight-through one-hot it is differentiable w.r.t. the slimming head.
    """
    model = getattr(model, "module", model)
    gate_cost = model.gate_madds(input_size or model.arch.img_size)
    return torch.tensor([count_madds(model, c, input_size) + gate_cost
                         for c in model.routing_space], dtype=torch.float64)


def expected_madds(gate_weights: torch.Tensor, per_choice: torch.Tensor) -> torch.Tensor:
    """Per-sample MAdds (B,) of a dynamic forward from its (B, K) gate weights."""
    return gate_weights @ per_choice.to(gate_weights.dtype).to(gate_weights.device)


def masked_expected_madds(model: torch.nn.Module, gate_weights: torch.Tensor,
                          input_size: int | None = None) -> torch.Tensor:
    """Per-sample MAdds (B,) of a dynamic forward, counted the release's way.

    Each part from the gate stage on runs at the one-hot-weighted width
    ``gate_weights @ routed_widths`` (B,), and every layer's count multiplies its running
    input and output widths (:func:`widths_madds`), so the count is quadratic in the
    one-hot and its gradient reaches the head through every layer, as the masked
    straight-through estimator's does. The trunk before the gate is constant. For a hard
    one-hot the value equals ``expected_madds(gate_weights, routing_madds(model,
    input_size))``; :func:`expected_madds` is the linear counterpart.

    Args:
        model: a DS-Net supernet.
        gate_weights: (B, K) routing one-hot (straight-through or soft).
        input_size: square input resolution (default: the architecture's).
    """
    model = getattr(model, "module", model)
    arch: ArchSpec = model.arch
    space = model.routing_space
    size = input_size or arch.img_size
    weights = gate_weights.to(torch.float64)                     # exact integer widths
    widths: list[Width] = list(arch.uniform_widths(space[0]))[:arch.gate_stage + 1]
    for spec in arch.stages[arch.gate_stage:]:
        routed = torch.tensor([spec.widths[c] for c in space], dtype=torch.float64,
                              device=weights.device)             # (K,)
        widths.append(weights @ routed)                          # (B,) running width
    total = model.widths_madds(widths, size)
    return (total + model.gate_madds(size)).to(gate_weights.dtype)  # + the slimming head
