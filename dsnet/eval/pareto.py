"""Accuracy-vs-MAdds Pareto fronts and rank correlation, as small pure functions.

Used by the sweep (``pipelines.sweep``) to pick the non-dominated trials and to check that
a larger complexity weight gives a cheaper model. No Ray, no torch: plain Python numbers.

Conventions of :func:`pareto_front`: top-1 is maximised and MAdds minimised; point ``a``
dominates ``b`` when ``a.top1 >= b.top1`` and ``a.madds <= b.madds`` with at least one
strict. Exact duplicates (same top-1 and same MAdds) dominate neither one another: only the
one with the lowest index is kept, so the front never lists the same point twice. Points
with a missing or non-finite value (a failed trial) are never on the front.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence


def _finite(value: float | None) -> bool:
    """A real number (int, float, numpy scalar) that is neither NaN nor infinite."""
    return isinstance(value, numbers.Real) and math.isfinite(value)


def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Whether ``a = (top1, madds)`` dominates ``b`` (better or equal in both, better in one)."""
    return a[0] >= b[0] and a[1] <= b[1] and (a[0] > b[0] or a[1] < b[1])


def pareto_front(top1: Sequence[float | None], madds: Sequence[float | None]) -> list[int]:
    """Indices of the non-dominated points, in ascending MAdds.

    Args:
        top1: accuracy of each point (higher is better).
        madds: cost of each point (lower is better), same length as ``top1``.

    Returns:
        Indices into the inputs; for exact duplicates the lowest index (see the module
        docstring). Empty when no point has finite values.

    Raises:
        ValueError: the sequences differ in length.
    """
    if len(top1) != len(madds):
        raise ValueError(f"top1 has {len(top1)} values but madds has {len(madds)}")
    valid = [i for i in range(len(top1)) if _finite(top1[i]) and _finite(madds[i])]
    # Cheapest first; at equal MAdds the most accurate first, then the lowest index, so a
    # single pass that keeps strict improvements in top-1 leaves exactly the front.
    order = sorted(valid, key=lambda i: (madds[i], -top1[i], i))
    front: list[int] = []
    best = -math.inf
    for i in order:
        if top1[i] > best:
            front.append(i)
            best = top1[i]
    return front


def hypervolume(top1: Sequence[float | None], madds: Sequence[float | None],
                ref: tuple[float, float]) -> float:
    """Area (top-1 points x MAdds) dominated by the points and bounded by ``ref``.

    ``ref = (top1, madds)`` is the worst corner: only what is more accurate than ``ref[0]``
    and cheaper than ``ref[1]`` counts. A fixed ``ref`` makes fronts of different searches
    comparable: the larger the hypervolume, the better the front.
    """
    front = [(top1[i], madds[i]) for i in pareto_front(top1, madds)]
    area, floor = 0.0, ref[0]
    for acc, cost in front:  # ascending MAdds is ascending top-1 along a front
        if acc > floor and cost < ref[1]:
            area += (ref[1] - cost) * (acc - floor)
            floor = acc
    return area


def average_ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks of ``values``; tied values share the mean of their ranks."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            ranks[order[k]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def _pearson(x: Sequence[float], y: Sequence[float]) -> float:
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return math.nan  # a constant series has no defined correlation
    return sxy / math.sqrt(sxx * syy)


def spearman(x: Sequence[float | None], y: Sequence[float | None]) -> float:
    """Spearman rank correlation of paired values (ties get average ranks).

    Pairs where either value is missing or non-finite are dropped.

    Returns:
        A value in [-1, 1], or NaN with fewer than two pairs or a constant series.

    Raises:
        ValueError: the sequences differ in length.
    """
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} values but y has {len(y)}")
    pairs = [(a, b) for a, b in zip(x, y, strict=True) if _finite(a) and _finite(b)]
    if len(pairs) < 2:
        return math.nan
    xs, ys = zip(*pairs, strict=True)
    return _pearson(average_ranks(xs), average_ranks(ys))


__all__ = ["average_ranks", "dominates", "hypervolume", "pareto_front", "spearman"]
