"""BatchNorm recalibration: re-estimate every width's running statistics.

After Stage I the per-width running statistics are stale (they were updated while the
weights moved). They are reset and re-estimated with cumulative averaging (momentum None,
so after N batches they are the plain mean over those batches) with the model in train mode
and no gradient. Whatever is touched (train/eval flags, momentum) is restored afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import nn

from dsnet.arch import Subnet
from dsnet.distributed import DistContext

_BatchNorm = nn.modules.batchnorm._BatchNorm


@contextlib.contextmanager
def bn_calibration_mode(model: nn.Module) -> Iterator[list[_BatchNorm]]:
    """Every module in train mode and every BN in cumulative-average mode; restored on exit.

    Yields:
        The model's BatchNorm modules.
    """
    flags = {m: m.training for m in model.modules()}
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    try:
        model.train()
        for bn in bns:
            bn.momentum = None
        yield bns
    finally:
        for m, flag in flags.items():
            m.training = flag
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[torch.Tensor],
                   subnets: Sequence[Subnet], dist: DistContext | None = None) -> int:
    """Reset and re-estimate the BN statistics of ``subnets`` on ``batches``.

    Args:
        model: the supernet.
        batches: input tensors (B, C, H, W) on the model's device.
        subnets: subnets to forward on every batch (each updates its widths' statistics).
        dist: with several ranks, statistics are averaged across ranks (``dist_bn: reduce``).

    Returns:
        The number of batches used.
    """
    n = 0
    with bn_calibration_mode(model) as bns:
        for bn in bns:
            bn.reset_running_stats()
        for x in batches:
            for subnet in subnets:
                model(x, subnet=subnet)
            n += 1
    if dist is not None:
        dist.all_reduce_mean_([t for bn in bns for t in (bn.running_mean, bn.running_var)])
    return n
