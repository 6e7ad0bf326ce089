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

from dsnet.models.arch import Subnet
from dsnet.train.distributed import DistContext

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


def _touched_stats(model: nn.Module, subnet: Subnet, x: torch.Tensor) -> list[_BatchNorm]:
    """The per-width statistics modules a subnet's forward reads (found by a dry run)."""
    from dsnet.models.layers import DSBatchNorm2d

    touched: list[_BatchNorm] = []
    hooks = [m.register_forward_pre_hook(
        lambda mod, args: touched.append(mod.bn_for_width(args[0].size(1))))
        for m in model.modules() if isinstance(m, DSBatchNorm2d)]
    flags = {m: m.training for m in model.modules()}
    try:
        model.eval()  # eval: the dry run leaves every statistic untouched
        model(x[:1], subnet=subnet)
    finally:
        for h in hooks:
            h.remove()
        for m, flag in flags.items():
            m.training = flag
    return touched


def statistics_owners(model: nn.Module, subnets: Sequence[Subnet],
                      x: torch.Tensor) -> dict[int, Subnet]:
    """Which subnet estimates each per-width statistic: the *last* one in ``subnets`` that
    uses it. In DS-MBNet the largest network and uniform subnet 13 share the widest
    statistics of stages 3-4 although their inputs differ (wide vs narrow trunk); mixing
    both would spoil both, so the later one (the uniform subnets, as in the release) owns
    them and the earlier one only estimates what is its own."""
    owners: dict[int, Subnet] = {}
    for subnet in subnets:
        for stats in _touched_stats(model, subnet, x):
            owners[id(stats)] = subnet
    return owners


@contextlib.contextmanager
def _frozen(stats: Sequence[_BatchNorm]) -> Iterator[None]:
    """Restore these statistics after the block (a forward that must not update them)."""
    saved = [(s.running_mean.clone(), s.running_var.clone(), s.num_batches_tracked.clone())
             for s in stats]
    try:
        yield
    finally:
        for s, (mean, var, n) in zip(stats, saved):
            s.running_mean.copy_(mean)
            s.running_var.copy_(var)
            s.num_batches_tracked.copy_(n)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[torch.Tensor],
                   subnets: Sequence[Subnet], dist: DistContext | None = None) -> int:
    """Reset and re-estimate the BN statistics of ``subnets`` on ``batches``.

    Only the statistics these subnets read are reset; each is estimated by one subnet
    only (see :func:`statistics_owners`); the others keep their values.

    Args:
        model: the supernet.
        batches: input tensors (B, C, H, W) on the model's device.
        subnets: subnets to forward on every batch, in increasing priority.
        dist: with several ranks, statistics are averaged across ranks (``dist_bn: reduce``).

    Returns:
        The number of batches used.
    """
    n, plan, owned = 0, None, []
    with bn_calibration_mode(model):
        for x in batches:
            if plan is None:
                plan, owned = _calibration_plan(model, subnets, x)
                for stats in owned:  # only what is re-estimated is reset
                    stats.reset_running_stats()
            for subnet, not_owned in plan:
                with _frozen(not_owned):
                    model(x, subnet=subnet)
            n += 1
    if dist is not None:
        dist.all_reduce_mean_([t for s in owned for t in (s.running_mean, s.running_var)])
    return n


def _calibration_plan(model: nn.Module, subnets: Sequence[Subnet], x: torch.Tensor
                      ) -> tuple[list[tuple[Subnet, list[_BatchNorm]]], list[_BatchNorm]]:
    """Per subnet, the statistics it reads but does not own; and every owned statistic."""
    owners = statistics_owners(model, subnets, x)
    plan = [(s, [t for t in _touched_stats(model, s, x) if owners[id(t)] != s])
            for s in subnets]
    by_id = {id(t): t for s in subnets for t in _touched_stats(model, s, x)}
    return plan, [by_id[i] for i in owners]
