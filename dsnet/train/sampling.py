"""Subnet sampling for the sandwich rule, deterministic across ranks without talking."""

from __future__ import annotations

import torch


def sandwich_subnets(seed: int, step: int, num_subnets: int, num_random: int) -> list[int]:
    """The random subnets of one training step.

    As the release, uniform over 1..num_subnets-1: never subnet 0, which every step already
    trains as the smallest. Drawn from a private generator seeded from (seed, step): every
    rank draws the same ones, and the global RNG (dropout, data order) is untouched.
    """
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(step))
    return torch.randint(1, num_subnets, (num_random,), generator=g).tolist()
