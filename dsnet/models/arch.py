"""Architecture specifications of the DS-Net supernets and how subnets map to widths.

A supernet has *parts*: part 0 is the stem, part ``i + 1`` is stage ``i``. A subnet is one
width per part. The release names three kinds of subnet:

- *largest*: every part at its widest;
- *uniform c*: parts before the gate stage at their narrowest, the gate stage and every
  later stage at their c-th width (these are the ``num_subnets`` subnets of the table);
- *dynamic*: the slimming head picks, per sample, one uniform subnet of the routing space.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: this module does not need torch
    import torch

Subnet = int | str  # an index 0..num_subnets-1, "largest", "smallest" or "dynamic"
SUBNET_NAMES = ("largest", "smallest", "dynamic")


@dataclass(frozen=True)
class StageSpec:
    """One stage of depthwise-separable blocks.

    Attributes:
        widths: output width choices, ascending and distinct.
        num_blocks: number of blocks (first block + ``num_blocks - 1`` more).
        stride: stride of the first block.
    """

    widths: tuple[int, ...]
    num_blocks: int
    stride: int


@dataclass(frozen=True)
class ArchSpec:
    """A DS-Net supernet: stem, stages, where the gate sits, default input size.

    Attributes:
        stem_widths: stem output width choices.
        stem_stride: stride of the 3x3 stem convolution.
        stages: the stages, in order.
        gate_stage: index of the stage whose first block holds the slimming head; it and
            every later stage must have ``num_subnets`` widths.
        img_size: default input resolution.
        se_ratio: attention-head reduction ratio.
        gate_grid: 0 = the slimming head reads the gate block's r reduced features (the
            release); g > 0 = its input average-pooled to g x g.
        gate_hidden: hidden width of the slimming head (0 = one 1x1 conv, the release).
    """

    stem_widths: tuple[int, ...]
    stem_stride: int
    stages: tuple[StageSpec, ...]
    gate_stage: int
    img_size: int
    se_ratio: float = 0.25
    gate_grid: int = 0
    gate_hidden: int = 0

    def __post_init__(self) -> None:
        slim = [len(s.widths) for s in self.stages[self.gate_stage:]]
        if len(set(slim)) != 1:
            raise ValueError(f"stages from the gate stage on need equal width counts, got {slim}")
        if self.gate_grid < 0 or self.gate_hidden < 0:
            raise ValueError(f"gate_grid and gate_hidden must be >= 0, got {self.gate_grid}, "
                             f"{self.gate_hidden}")
        for widths in [self.stem_widths] + [s.widths for s in self.stages]:
            if list(widths) != sorted(set(widths)):
                raise ValueError(f"widths must be ascending and distinct: {widths}")

    @property
    def part_widths(self) -> tuple[tuple[int, ...], ...]:
        """Width choices of every part (stem first)."""
        return (self.stem_widths,) + tuple(s.widths for s in self.stages)

    @property
    def num_subnets(self) -> int:
        """Number of uniform subnets (width choices of the gate stage)."""
        return len(self.stages[self.gate_stage].widths)

    def largest_widths(self) -> tuple[int, ...]:
        """Widths of the largest network."""
        return tuple(w[-1] for w in self.part_widths)

    def uniform_widths(self, c: int) -> tuple[int, ...]:
        """Widths of uniform subnet ``c``."""
        first_slim_part = self.gate_stage + 1
        return tuple(w[0] if p < first_slim_part else w[c]
                     for p, w in enumerate(self.part_widths))

    def resolve(self, subnet: Subnet | None) -> tuple[int, ...]:
        """Widths of a static subnet; ``ValueError`` naming the valid values otherwise."""
        if subnet is None or subnet == "largest":
            return self.largest_widths()
        if subnet == "smallest":
            return self.uniform_widths(0)
        if isinstance(subnet, int) and not isinstance(subnet, bool):
            if 0 <= subnet < self.num_subnets:
                return self.uniform_widths(subnet)
        raise ValueError(
            f"subnet must be 'largest', 'smallest', 'dynamic' or an int in "
            f"[0, {self.num_subnets - 1}], got {subnet!r}")


DS_MBNET_V1 = ArchSpec(
    stem_widths=(16, 24),
    stem_stride=2,
    stages=(
        StageSpec((32, 88), 1, 1),
        StageSpec((48, 168), 2, 2),
        StageSpec((96, 264), 2, 2),
        StageSpec(tuple(range(224, 640 + 1, 32)), 6, 2),
        StageSpec(tuple(range(736, 1152 + 1, 32)), 2, 2),
    ),
    gate_stage=3,
    img_size=224,
)

# The embedded default's model: the same structure for 28-32 px inputs. Stage 3 keeps the
# 7x7 map (stride 1) so that the slimmable stages dominate the cost and the 14 subnets
# really differ (about 5x in MAdds from subnet 0 to 13).
DS_MBNET_SMALL = ArchSpec(
    stem_widths=(8, 16),
    stem_stride=1,
    stages=(
        StageSpec((16, 32), 1, 1),
        StageSpec((24, 48), 2, 2),
        StageSpec((32, 64), 2, 2),
        StageSpec(tuple(range(32, 136 + 1, 8)), 3, 1),
        StageSpec(tuple(range(64, 272 + 1, 16)), 2, 2),
    ),
    gate_stage=3,
    img_size=28,
)

# The embedded Fashion-MNIST default's model. Unlike DS_MBNET_SMALL, the parts before the gate
# have one width, shared by every subnet (16-24-32-48, downsampled to 7x7 by stage 1 so it
# stays cheap): the largest network *is* uniform subnet 13, and only stages 3-4 slim, from a
# capacity-limited 4/8 channels to 108/216: 0.61M to 3.31M MAdds (5.4x). Measured on the
# embedded data with dsnet/configs/default.yml: a slim end of 8/16 channels left every subnet within
# 1.1 points of the widest (85.2-86.3 % top-1); 4/8 widens that to 1.6 points (85.0-86.6 %),
# the difference being on T-shirts, shirts and bags, which is what the gate exploits.
DS_MBNET_TINY = ArchSpec(
    stem_widths=(16,),
    stem_stride=1,
    stages=(
        StageSpec((24,), 1, 2),
        StageSpec((32,), 2, 2),
        StageSpec((48,), 2, 1),
        StageSpec(tuple(range(4, 108 + 1, 8)), 3, 1),  # 4, 12, ..., 108
        StageSpec(tuple(range(8, 216 + 1, 16)), 2, 2),  # 8, 24, ..., 216
    ),
    gate_stage=3,
    img_size=28,
    # The slimming head reads the gate block's 48 trunk channels pooled to 2x2 and
    # standardised, through a 32-wide hidden layer (8.6k MAdds, 1.4 % of subnet 0), rather
    # than the release's 12 reduced features. Measured on one supernet's cached features
    # (heads fitted to the exact expected loss): the 12 reduced features gained at most
    # +0.28 points over the static curve, the 2x2 grid +0.7..+1.0 (where on the image a
    # T-shirt's or a shirt's features are, not only how much of each channel). Without the
    # standardisation, the head sent 97 % of the images to one choice.
    gate_grid=2,
    gate_hidden=32,
)


# ----------------------------------------------------------------------------- DS-ResNet


def ratio_ladder(width: int, first: int = 3, steps: int = 16) -> tuple[int, ...]:
    """The widths ``width * k / steps`` for k = first .. steps (a uniform slimming ladder).

    The default, 3/16 .. 16/16 in steps of 1/16, gives 14 widths, as DS-MBNet has, and keeps
    every width a multiple of ``width / 16`` (16 channels in ResNet-50's third stage, 32 in
    its fourth): vector-friendly sizes for the convolution kernels.
    """
    if width % steps:
        raise ValueError(f"width {width} is not a multiple of {steps}")
    return tuple(width * k // steps for k in range(first, steps + 1))


@dataclass(frozen=True)
class ResNetSpec(ArchSpec):
    """A DS-ResNet supernet: stages of torchvision-style bottleneck blocks.

    A stage's ``widths`` are its bottlenecks' *inner* widths (the 1x1 -> 3x3 -> 1x1 middle
    channels), one choice each before the gate stage, a slimming ladder from it on. The
    block output (residual) width of a stage is ``expansion`` times its widest inner width;
    with ``slice_residual`` it slims too, ``expansion`` times the running inner width.

    Attributes (besides :class:`ArchSpec`'s; ``stem_widths`` is the stem conv's width):
        expansion: residual width / inner width (4 in ResNet-50).
        slice_residual: slim the residual stream with the inner width from the gate on.
        stem_kernel: stem convolution kernel (7 in ResNet-50, 3 for small inputs).
        stem_pool: a 3x3 stride-2 max pool after the stem (ResNet-50's).
    """

    expansion: int = 4
    slice_residual: bool = False
    stem_kernel: int = 7
    stem_pool: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        fixed = [s.widths for s in self.stages[:self.gate_stage]] + [self.stem_widths]
        if any(len(w) != 1 for w in fixed):
            raise ValueError("a DS-ResNet's stem and stages before the gate have one width each")

    def out_widths(self, stage: int) -> tuple[int, ...]:
        """Residual width choices of a stage (BatchNorm widths of its block outputs)."""
        widths = self.stages[stage].widths
        if self.slice_residual:
            return tuple(w * self.expansion for w in widths)
        return (widths[-1] * self.expansion,)

    def out_width(self, stage: int, width: int | torch.Tensor) -> int | torch.Tensor:
        """Residual width of a stage running inner width ``width`` (an int or a tensor)."""
        if self.slice_residual:
            return width * self.expansion
        return self.stages[stage].widths[-1] * self.expansion


# ResNet-50 (torchvision's layout: 7x7 stem, max pool, 3-4-6-3 bottlenecks, V1.5 strides) with
# the gate at the start of the third stage: the 14x14 stage of six blocks, where DS-MBNet's
# gate sits too. Its inner widths (256) and the fourth stage's (512) slim 3/16 .. 16/16, and
# with them the residual widths (1024, 2048): 14 subnets of 1.93-4.09 GMAdds.
DS_RESNET50 = ResNetSpec(
    stem_widths=(64,),
    stem_stride=2,
    stages=(
        StageSpec((64,), 3, 1),
        StageSpec((128,), 4, 2),
        StageSpec(ratio_ladder(256), 6, 2),
        StageSpec(ratio_ladder(512), 3, 2),
    ),
    gate_stage=2,
    img_size=224,
    slice_residual=True,
)

# The embedded Fashion-MNIST default's ResNet: 3x3 stem at 28 px (no pool), a one-block
# first stage down to 14x14, then two slimming stages of two bottlenecks (7x7, 4x4) whose
# inner widths run 6..32 and 12..64 (residual 24..128, 48..256): 1.74-6.64M MAdds.
DS_RESNET_SMALL = ResNetSpec(
    stem_widths=(24,),
    stem_stride=1,
    stages=(
        StageSpec((16,), 1, 2),
        StageSpec(ratio_ladder(32), 2, 2),
        StageSpec(ratio_ladder(64), 2, 2),
    ),
    gate_stage=1,
    img_size=28,
    stem_kernel=3,
    stem_pool=False,
    slice_residual=True,
)
