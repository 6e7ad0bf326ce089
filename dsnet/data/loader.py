"""Per-rank data loaders and timm's batch mixup/cutmix.

Training shuffles with ``DistributedSampler`` (seeded, a new order per epoch through
:func:`set_loader_epoch`); evaluation shards without padding (:class:`ShardSampler`), so
every sample counts exactly once across ranks. Mixup is timm's ``Mixup``
(:func:`build_mixup`), applied by the training loop to each batch.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from timm.data import Mixup
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler

from dsnet.data.datasets import DataError


class ShardSampler(Sampler[int]):
    """Sequential eval sampler giving rank ``r`` indices ``r, r + W, r + 2W, ...``.

    No padding: every sample is seen exactly once across ranks, so metrics are
    exact, but per-rank lengths may differ by one. Reduce sums and counts after
    the loop rather than running a collective per batch.

    Args:
        length: Dataset length.
        rank: This rank, ``0 <= rank < world_size``.
        world_size: Number of ranks.
    """

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.length, self.rank, self.world_size = length, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))


def build_loader(dataset: Dataset, batch_size: int, *, train: bool, rank: int = 0,
                 world_size: int = 1, seed: int = 0, workers: int = 0,
                 drop_last: bool | None = None, pin_memory: bool = False,
                 persistent_workers: bool = False) -> DataLoader:
    """A DataLoader over this rank's share of ``dataset`` (``batch_size`` per rank).

    Training (``train=True``) uses ``DistributedSampler`` with explicit ranks (no process
    group needed): shuffled by ``seed`` (shared by all ranks, so their partitions are
    disjoint), equal counts per rank by wrap-around padding, a new deterministic order
    per epoch via :func:`set_loader_epoch` (``seed + epoch``), last partial batch dropped
    unless ``drop_last`` says otherwise. Evaluation is unshuffled; with ``world_size > 1``
    :class:`ShardSampler` shards it without padding, so each sample counts exactly once.

    ``persistent_workers`` (ignored with ``workers=0``, which PyTorch rejects) keeps the
    worker processes and their dataset copies across epochs; the per-epoch reshuffle
    still works, since the sampler runs in the main process and each pass draws a fresh
    order from it.
    """
    if not 0 <= rank < world_size:
        raise DataError(f"rank must be in [0, {world_size}), got {rank}")
    if batch_size < 1:
        raise DataError(f"batch_size must be positive, got {batch_size}")
    sampler: Sampler[int] | None
    if train:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank,
                                     shuffle=True, seed=seed)
    elif world_size > 1:
        sampler = ShardSampler(len(dataset), rank, world_size)
    else:
        sampler = None  # plain sequential order
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, shuffle=False,
        num_workers=workers, drop_last=train if drop_last is None else drop_last,
        pin_memory=pin_memory, persistent_workers=persistent_workers and workers > 0,
        # Seeds the workers' augmentation RNG: reproducible, and different per rank.
        generator=torch.Generator().manual_seed(seed * 1000 + rank),
    )


def set_loader_epoch(loader: DataLoader, epoch: int) -> None:
    """Reshuffle ``loader`` for ``epoch`` if its sampler supports ``set_epoch``.

    Args:
        loader: A loader from :func:`build_loader` (any DataLoader works).
        epoch: The epoch about to start.
    """
    set_epoch = getattr(getattr(loader, "sampler", None), "set_epoch", None)
    if callable(set_epoch):
        set_epoch(epoch)


# --------------------------------------------------------------------------- mixup


class EvenBatchMixup(Mixup):
    """timm's :class:`~timm.data.Mixup` that names the batch size when it is odd.

    timm mixes each sample with its mirror in the batch (``x.flip(0)``, or pairs), so it
    needs an even batch and otherwise fails with a bare assertion (or silently
    misbehaves under ``python -O``). The training loader drops its last batch
    (``build_loader(train=True)``), so only an odd ``batch_size`` triggers this.
    """

    def __call__(self, x: torch.Tensor, target: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        if len(x) % 2:
            raise ValueError(f"mixup/cutmix needs an even batch, got batch size {len(x)}; "
                             "use an even batch_size (the training loader drops the last, "
                             "partial batch)")
        return super().__call__(x, target)


def build_mixup(mixup: float, cutmix: float, cutmix_minmax: list[float] | None,
                prob: float, switch_prob: float, mode: str, smoothing: float,
                num_classes: int) -> Mixup | None:
    """timm's batch mixup/cutmix as the release's train.py sets it up, or None when off.

    On by the release's rule: ``mixup > 0`` or ``cutmix > 0`` or ``cutmix_minmax`` given.
    Call it as ``images, soft = mix(images, labels)`` on each training batch (on the
    device); ``soft`` is (B, num_classes) with rows summing to 1 and label smoothing
    already folded in, so the loss must be timm's ``SoftTargetCrossEntropy`` (a
    hard-label loss cannot take them, and a label-smoothing one would smooth twice).
    Every ``mode`` (``'batch'``, ``'pair'``, ``'elem'``) needs an even batch: the
    training loader of :func:`build_loader` drops its last partial batch, and an odd
    batch size raises ValueError naming it (:class:`EvenBatchMixup`).

    Args:
        mixup: mixup alpha (Beta distribution); 0 = no mixup.
        cutmix: cutmix alpha; 0 = no cutmix.
        cutmix_minmax: cutmix box size bounds [min, max] as fractions (overrides alpha).
        prob: probability of mixing a batch (or element) at all.
        switch_prob: probability of cutmix instead of mixup when both are on.
        mode: ``'batch'``, ``'pair'`` or ``'elem'``: how mixing parameters are drawn.
        smoothing: label smoothing of the targets.
        num_classes: classes of the one-hot targets.
    """
    if not (mixup > 0 or cutmix > 0 or cutmix_minmax is not None):
        return None
    return EvenBatchMixup(mixup_alpha=mixup, cutmix_alpha=cutmix, cutmix_minmax=cutmix_minmax,
                          prob=prob, switch_prob=switch_prob, mode=mode,
                          label_smoothing=smoothing, num_classes=num_classes)
