"""Dynamic-weight-slicing layers.

Every layer stores the tensors of its *widest* configuration. A narrower width uses the
first ``n`` filters (a contiguous slice: a view, no copy, no mask), so a slim subnet is an
ordinary dense network with smaller tensors and runs truly faster.

Widths travel with the call: the input width is read from ``x.size(1)`` and the output
width (where a layer has a choice) is an argument of ``forward``. No layer keeps a
"current width" attribute that would need resetting between calls.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def make_divisible(value: float, divisor: int = 1, min_value: int | None = None) -> int:
    """Round ``value`` to a multiple of ``divisor`` as the release does (ties round up)."""
    min_value = min_value or divisor
    new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:  # never round down by more than 10 %
        new_value += divisor
    return new_value


def swish(x: torch.Tensor) -> torch.Tensor:
    """Swish / SiLU written as the release (``x * sigmoid(x)``) so results match bit for bit."""
    return x.mul(x.sigmoid())


def fresh_swish(x: torch.Tensor) -> torch.Tensor:
    """:func:`swish` of an intermediate nobody else holds (a fresh BatchNorm output).

    Without autograd (inference, frozen parts) ``x`` is overwritten in place: bitwise the
    same result, one full-size allocation and memory pass less per activation, which is
    what dominates the wide high-resolution early layers on a CPU.
    """
    if x.requires_grad:
        return swish(x)
    return x.mul_(x.sigmoid())


def fresh_mul(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x * scale`` (broadcast), in place in ``x`` when neither needs autograd."""
    if x.requires_grad or scale.requires_grad:
        return x * scale
    return x.mul_(scale)


def fresh_relu(x: torch.Tensor) -> torch.Tensor:
    """ReLU of an intermediate nobody else holds, in place without autograd (as
    :func:`fresh_swish`; the values are the same either way)."""
    if x.requires_grad:
        return F.relu(x)
    return x.relu_()


def fresh_add(x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``x + other`` (a residual sum), in place in the fresh ``x`` without autograd."""
    if x.requires_grad or other.requires_grad:
        return x + other
    return x.add_(other)


class Swish(nn.Module):
    """Module form of the release's Swish (:func:`fresh_swish`: its input must be an
    intermediate nobody else holds, as in every network of this package)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fresh_swish(x)


def _dense(whole: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
    """``view`` itself if dense, else a dense copy in ``whole``'s memory format (a
    channels-last model keeps channels-last weights)."""
    if view.dim() != 4:
        return view if view.is_contiguous() else view.contiguous()
    # A 1x1 kernel is dense in both layouts; keep the standard one then: oneDNN picks its
    # algorithm by the strides, and equal strides keep exports bitwise equal.
    fmt = (torch.channels_last if not whole.is_contiguous()
           and whole.is_contiguous(memory_format=torch.channels_last)
           else torch.contiguous_format)
    return view if view.is_contiguous(memory_format=fmt) else view.contiguous(memory_format=fmt)


class SliceCache:
    """Leading slices of one parameter (``w[:out, :in]``), reused across inference calls.

    A slice of the first ``n`` output filters is a contiguous view, but cutting the *input*
    channels too is strided, and the convolution kernels copy a strided weight on every call
    (~1.5 ms of a 20 ms DS-MBNet batch-1 forward); even a view costs a few microseconds of
    Python and dispatch per layer and call. Outside autograd (no_grad / inference_mode) the
    slice (a contiguous copy where the view is strided) is kept per size and reused while
    the tensor is unchanged: an entry is stamped with the tensor's version counter (bumped
    by every in-place write: optimizer steps, ``load_state_dict``, EMA updates) and its
    storage, device and dtype (``.to()``/``.half()``). Writes through ``.data`` bypass the
    version counter: call :func:`clear_slice_caches` after them. At most one copy per size
    is held (DS-MBNet, all 14 subnets used: ~0.1 GB). With autograd, plain views. Entries
    are keyed by the sizes alone, so a layer keeps one cache per sliced tensor.
    """

    def __init__(self) -> None:
        self._entries: dict[tuple[int, ...], tuple[tuple, torch.Tensor]] = {}

    def get(self, tensor: torch.Tensor, *sizes: int) -> torch.Tensor:
        """``tensor[:sizes[0], :sizes[1], ...]``, contiguous without autograd."""
        if torch.is_grad_enabled():
            return tensor[tuple(slice(None, n) for n in sizes)]
        stamp = (tensor._version, tensor.data_ptr(), tensor.device, tensor.dtype)
        hit = self._entries.get(sizes)
        if hit is None or hit[0] != stamp:
            hit = (stamp, _dense(tensor, tensor[tuple(slice(None, n) for n in sizes)]))
            self._entries[sizes] = hit
        return hit[1]

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


def clear_slice_caches(model: nn.Module) -> None:
    """Drop every cached slice of ``model`` (after writing weights via ``.data``)."""
    for m in model.modules():
        for cache in vars(m).values():
            if isinstance(cache, SliceCache):
                cache.clear()


def _same_padding(kernel_size: int, stride: int, dilation: int = 1) -> int:
    # The release's symmetric padding: keeps the size at stride 1, halves it at stride 2.
    return ((stride - 1) + dilation * (kernel_size - 1)) // 2


class DSConv2d(nn.Conv2d):
    """Regular convolution (groups=1) whose in/out channels are sliced per call.

    Args:
        in_channels: widest input width (the stored tensor's).
        out_channels: widest output width.
        kernel_size: square kernel size.
        stride: stride.
        bias: whether a bias is stored (sliced like the output channels).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int,
                 stride: int = 1, bias: bool = False) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride,
                         padding=_same_padding(kernel_size, stride), bias=bias)
        self.weight_slices, self.bias_slices = SliceCache(), SliceCache()

    def forward(self, x: torch.Tensor, out_channels: int | None = None) -> torch.Tensor:
        """Convolve ``x`` (B, C_in_active, H, W) to ``out_channels`` (default: widest)."""
        out_c = self.out_channels if out_channels is None else out_channels
        weight = self.weight_slices.get(self.weight, out_c, x.size(1))  # (C_out_a, C_in_a, k, k)
        bias = self.bias_slices.get(self.bias, out_c) if self.bias is not None else None
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, 1)


class DSPointwiseConv2d(DSConv2d):
    """1x1 convolution with sliced in/out channels."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = False) -> None:
        super().__init__(in_channels, out_channels, 1, 1, bias=bias)


class DSDepthwiseConv2d(nn.Conv2d):
    """Depthwise convolution: the active width is the input's, ``x.size(1)``."""

    def __init__(self, channels: int, kernel_size: int = 3, stride: int = 1,
                 bias: bool = False) -> None:
        super().__init__(channels, channels, kernel_size, stride=stride,
                         padding=_same_padding(kernel_size, stride), groups=channels, bias=bias)
        self.weight_slices, self.bias_slices = SliceCache(), SliceCache()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.size(1)
        bias = self.bias_slices.get(self.bias, c) if self.bias is not None else None
        weight = self.weight_slices.get(self.weight, c)               # (C_a, 1, k, k)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, c)


class DSBatchNorm2d(nn.Module):
    """BatchNorm with running statistics per width and one shared affine (release layout).

    ``aux_bn.{i}`` holds the running statistics of width ``widths[i]``; only the last one
    is affine, and every width uses the first ``n`` entries of its weight and bias. The
    width index is found from ``x.size(1)``, so widths must be distinct.

    Args:
        widths: the width choices, ascending.
        eps: numerical epsilon (shared, the last BN's).
        momentum: running-statistics momentum (shared, the last BN's).
    """

    def __init__(self, widths: Sequence[int], eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.widths = tuple(int(w) for w in widths)
        if len(set(self.widths)) != len(self.widths):
            raise ValueError(f"BatchNorm widths must be distinct, got {self.widths}")
        self.aux_bn = nn.ModuleList([nn.BatchNorm2d(w, affine=False) for w in self.widths[:-1]])
        self.aux_bn.append(nn.BatchNorm2d(self.widths[-1], eps=eps, momentum=momentum))
        self._index = {w: i for i, w in enumerate(self.widths)}
        # The same modules as a plain tuple (not registered twice): ModuleList indexing costs
        # microseconds per call, which add up to ~10 % of a small model's batch-1 forward.
        self._bns: tuple[nn.BatchNorm2d, ...] = tuple(self.aux_bn)
        self.weight_slices, self.bias_slices = SliceCache(), SliceCache()

    def bn_for_width(self, width: int) -> nn.BatchNorm2d:
        """The BatchNorm holding the running statistics of ``width``."""
        try:
            return self._bns[self._index[width]]
        except KeyError:
            raise ValueError(f"width {width} is not one of this BatchNorm's widths "
                             f"{self.widths}") from None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.size(1)
        stats = self.bn_for_width(c)
        shared = self._bns[-1]
        # As the release: every width (the widest too) normalises with its own running
        # statistics, the shared affine's first c entries and the shared momentum/eps.
        momentum = shared.momentum
        if momentum is None:  # cumulative average (BN recalibration), like nn.BatchNorm
            momentum = 0.0
            if self.training:  # counted per width
                stats.num_batches_tracked.add_(1)
                momentum = 1.0 / float(stats.num_batches_tracked)
        return F.batch_norm(x, stats.running_mean, stats.running_var,
                            self.weight_slices.get(shared.weight, c),
                            self.bias_slices.get(shared.bias, c), self.training, momentum,
                            shared.eps)


class DSLinear(nn.Linear):
    """Linear layer whose input features are sliced to ``x.size(1)``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias)
        self.weight_slices = SliceCache()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_slices.get(self.weight, self.out_features, x.size(1))
        return F.linear(x, weight, self.bias)                 # (B, num_classes)


class AttentionHead(nn.Module):
    """Squeeze-excitation attention with an optional slimming head (the release's gate).

    pool -> ``conv_reduce`` (to a fixed ``r`` channels) -> ReLU -> ``conv_expand`` (back to
    the running width) -> sigmoid -> multiply. The slimming head ``gate`` maps the reduced
    features (after the ReLU) to one logit per routing choice with one 1x1 conv ``gate.0``
    (the release's), or, for a small model whose r features say too little about an input,
    reads the head's input pooled to a grid (``gate_grid``), standardised by a BatchNorm
    without affine, through a hidden layer of its own (``gate_hidden``):
    ``gate.0`` (BN) -> ``gate.1`` -> ReLU -> ``gate.3``.

    Args:
        channels: widest input width.
        se_ratio: reduction ratio (r = round(channels * se_ratio)).
        num_gate_choices: number of slimming-head logits; 0 for a plain attention head.
        attention: False drops ``conv_expand`` and the multiply: the features pass
            unchanged and only the slimming head reads the reduced features (a supernet
            that must equal a plain network, e.g. ``ds_resnet50(attention=False)``).
        gate_grid: 0 = the slimming head reads the r reduced features; g > 0 = it reads
            the input average-pooled to g x g (``gate_channels * g * g`` features).
        gate_hidden: width of the slimming head's hidden layer (0 = none, the release).
        gate_channels: input width in a dynamic forward (the routed subnets' trunk width;
            default ``channels``).
    """

    def __init__(self, channels: int, se_ratio: float = 0.25, num_gate_choices: int = 0,
                 attention: bool = True, gate_grid: int = 0, gate_hidden: int = 0,
                 gate_channels: int | None = None) -> None:
        super().__init__()
        self.reduced_channels = make_divisible(channels * se_ratio, 1)
        self.conv_reduce = DSPointwiseConv2d(channels, self.reduced_channels, bias=True)
        self.conv_expand = (DSPointwiseConv2d(self.reduced_channels, channels, bias=True)
                            if attention else None)
        self.gate_grid = gate_grid
        self.gate_hidden = gate_hidden
        # What the slimming head reads: the r reduced features (the release), or the
        # routed input width (gate_channels, the trunk's) pooled to a grid x grid map.
        self.gate_channels = gate_channels or channels
        self.gate_in_features = (self.reduced_channels if gate_grid == 0
                                 else self.gate_channels * gate_grid * gate_grid)
        self.gate: nn.Sequential | None = None
        if num_gate_choices > 0:
            self.set_num_gate_choices(num_gate_choices)

    def set_num_gate_choices(self, n: int) -> None:
        """(Re)build the slimming head with ``n`` outputs (fresh, initialised weights)."""
        layers: list[nn.Module] = []
        width = self.gate_in_features
        if self.gate_grid > 0:
            # Pooled activations of unequal scales: standardise them (statistics learnt in
            # Stage II, no affine) or the head's optimiser follows the largest channels and
            # routes every input alike (measured: one choice for 97 % of the images).
            layers.append(nn.BatchNorm2d(width, affine=False))
        if self.gate_hidden > 0:   # a hidden layer of the head's own (trained in Stage II)
            hidden = nn.Conv2d(width, self.gate_hidden, 1, bias=True)
            nn.init.normal_(hidden.weight, 0.0, (2.0 / self.gate_hidden) ** 0.5)
            nn.init.zeros_(hidden.bias)
            layers += [hidden, nn.ReLU()]
            width = self.gate_hidden
        conv = nn.Conv2d(width, n, 1, bias=False)
        nn.init.normal_(conv.weight, 0.0, (2.0 / n) ** 0.5)  # release init: fan_out = n
        self.gate = nn.Sequential(*layers, conv)

    @property
    def num_gate_choices(self) -> int:
        """Slimming-head outputs (0 without a slimming head)."""
        return 0 if self.gate is None else self.gate[-1].out_channels

    def slimming_madds(self, size: int) -> int:
        """MAdds of the slimming head on a ``size`` x ``size`` input map: its own grid pool
        (when it reads one) and its 1x1 convolutions (on a 1x1 map)."""
        pool = self.gate_channels * size * size if self.gate_grid else 0
        widths = [self.gate_in_features] + ([self.gate_hidden] if self.gate_hidden else [])
        widths.append(self.num_gate_choices)
        return pool + sum(a * b for a, b in zip(widths, widths[1:]))

    def forward_with_reduced(self, x: torch.Tensor, inplace: bool = False
                             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (attended features (B, C, H, W), gate features (B, F, 1, 1)).

        The gate features are what the slimming head reads (:func:`gate_input`): the
        reduced features (F = r), or x pooled to a grid. With ``inplace`` (``x`` is an
        intermediate nobody else holds) the attention multiply overwrites ``x`` where
        autograd allows (:func:`fresh_mul`).
        """
        pooled = F.adaptive_avg_pool2d(x, 1)                    # (B, C, 1, 1)
        reduced = F.relu(self.conv_reduce(pooled))              # (B, r, 1, 1)
        features = gate_input(x, reduced, self.gate_grid)       # before x is overwritten
        if self.conv_expand is None:                            # no attention head
            return x, features
        attn = self.conv_expand(reduced, out_channels=x.size(1)).sigmoid()
        return (fresh_mul(x, attn) if inplace else x * attn), features

    @property
    def attends(self) -> bool:
        """Whether the head multiplies the features (False: slimming head only)."""
        return self.conv_expand is not None

    def forward(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        return self.forward_with_reduced(x, inplace)[0]

    def gate_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Slimming-head logits (B, num_choices) from the gate features (B, F, 1, 1)."""
        if self.gate is None:
            raise RuntimeError("this attention head has no slimming head")
        return self.gate(features).flatten(1)


def gate_input(x: torch.Tensor, reduced: torch.Tensor, grid: int) -> torch.Tensor:
    """What a slimming head reads: ``reduced`` (B, r, 1, 1), the release's, for ``grid`` 0;
    otherwise ``x`` (B, C, H, W) average-pooled to grid x grid, as (B, C * grid^2, 1, 1),
    channel-major so that a narrower x gives a prefix of the features."""
    if grid == 0:
        return reduced
    return F.adaptive_avg_pool2d(x, grid).flatten(1)[:, :, None, None]


# ----------------------------------------------------------------------------- masked execution
# The release's batched dynamic arithmetic (see dsnet.models.masked): one common width per part and
# a per-sample channel mask after every sliced layer. The supernet families build their masked
# forwards from these primitives.


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


class RoutedPart:
    """Widths and mask of one routed part (a stage, or a residual stream) for one batch."""

    def __init__(self, onehot: torch.Tensor, widths: Sequence[int], width: int) -> None:
        self.onehot = onehot                    # (B, K)
        self.widths = tuple(widths)             # routed width per choice
        self.width = width                      # common width the batch runs at
        self.mask = channel_mask(onehot, widths, width)  # (B, width, 1, 1)

    def bn(self, bn: DSBatchNorm2d, x: torch.Tensor) -> torch.Tensor:
        """Per-sample BatchNorm, then the mask (the BN shift makes zeros non-zero)."""
        return masked_batch_norm(bn, x, self.onehot, self.widths) * self.mask
