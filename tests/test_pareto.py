"""dsnet.eval.pareto: the Pareto front (ties, duplicates, single point, all dominated) and the
Spearman rank correlation."""

from __future__ import annotations

import math

import pytest

from dsnet.eval.pareto import average_ranks, dominates, hypervolume, pareto_front, spearman


def test_dominates() -> None:
    assert dominates((80, 1.0), (70, 2.0))
    assert dominates((80, 1.0), (80, 2.0))  # equal top-1, cheaper
    assert dominates((80, 1.0), (70, 1.0))  # equal MAdds, more accurate
    assert not dominates((80, 1.0), (80, 1.0))  # a duplicate dominates nothing
    assert not dominates((80, 2.0), (70, 1.0))  # a trade-off


def test_front_is_sorted_by_madds_and_drops_dominated() -> None:
    top1 = [90, 70, 80, 60, 85]
    madds = [4.0, 1.0, 2.0, 3.0, 4.5]  # 3 (60 @ 3.0) and 4 (85 @ 4.5) are dominated
    assert pareto_front(top1, madds) == [1, 2, 0]


def test_single_point_and_empty() -> None:
    assert pareto_front([50.0], [1e6]) == [0]
    assert pareto_front([], []) == []


def test_all_dominated_by_one() -> None:
    assert pareto_front([70, 99, 60, 80], [3, 1, 2, 4]) == [1]


def test_ties() -> None:
    # Same MAdds: only the most accurate survives. Same top-1: only the cheapest.
    assert pareto_front([70, 75, 75], [2, 2, 3]) == [1]
    assert pareto_front([75, 75, 80], [3, 2, 4]) == [1, 2]


def test_exact_duplicates_keep_the_lowest_index() -> None:
    assert pareto_front([70, 80, 80, 60], [1, 2, 2, 0.5]) == [3, 0, 1]
    assert pareto_front([80, 80], [2, 2]) == [0]


def test_non_finite_points_never_on_front() -> None:
    assert pareto_front([math.nan, 70, None, 99], [1, 2, 1, math.inf]) == [1]
    assert pareto_front([math.nan], [1.0]) == []


def test_length_mismatch() -> None:
    with pytest.raises(ValueError, match="top1 has 2 values but madds has 1"):
        pareto_front([1, 2], [1])


def test_numpy_values() -> None:
    np = pytest.importorskip("numpy")
    assert pareto_front(np.array([70.0, 80.0]), np.array([1.0, 2.0])) == [0, 1]
    assert spearman(np.array([1, 2, 3]), np.array([3.0, 2.0, 1.0])) == pytest.approx(-1)


def test_average_ranks_with_ties() -> None:
    assert average_ranks([10, 30, 20, 20]) == [1.0, 4.0, 2.5, 2.5]
    assert average_ranks([]) == []


def test_spearman() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4e6, 3e6, 2e6, 1e6]) == pytest.approx(-1.0)
    # monotone but not linear: still +1
    assert spearman([0.001, 0.01, 0.1, 1.0], [1, 4, 9, 1000]) == pytest.approx(1.0)
    # with ties: the textbook value (Pearson on average ranks), as scipy.stats.spearmanr
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(0.9486832980505138)
    assert math.isnan(spearman([1], [2]))
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))  # constant: undefined
    assert spearman([1, 2, None, 3], [1, 2, 5, math.nan]) == pytest.approx(1.0)


def test_hypervolume_is_the_dominated_area_above_the_reference():
    # Front (top1, madds): (90, 1), (92, 2), (95, 4); (89, 3) is dominated; ref (88, 5).
    top1, madds = [90.0, 92.0, 89.0, 95.0], [1.0, 2.0, 3.0, 4.0]
    # Slabs: (5-1)*(90-88) + (5-2)*(92-90) + (5-4)*(95-92) = 8 + 6 + 3.
    assert hypervolume(top1, madds, (88.0, 5.0)) == pytest.approx(17.0)
    assert hypervolume([87.0, 99.0], [1.0, 6.0], (88.0, 5.0)) == 0.0  # outside the box
    assert hypervolume(top1 + [96.0], madds + [4.5], (88.0, 5.0)) > 17.0
