"""The multiple-choice knapsack against brute force, and its edge cases."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from prismq.allocate.knapsack import prepare, solve
from prismq.errors import PrismqError


def _random_case(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """2-7 units x 2-5 options, ~20 % of options not offered (every unit keeps one), small integer sizes so that
    ties and exactly-full budgets happen."""
    units, options = int(rng.integers(2, 8)), int(rng.integers(2, 6))
    size = rng.integers(1, 40, (units, options)).astype(np.int64)
    cost = rng.random((units, options)) * 10
    cost[rng.random((units, options)) < 0.2] = np.inf
    keep = rng.integers(0, options, units)
    cost[np.arange(units), keep] = rng.random(units) * 10
    return cost, size


def _brute(cost: np.ndarray, size: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bytes and cost of every assignment of offered options."""
    offered = [np.flatnonzero(np.isfinite(row)) for row in cost]
    combos = np.array(list(itertools.product(*offered)))
    rows = np.arange(cost.shape[0])
    return size[rows, combos].sum(axis=1), cost[rows, combos].sum(axis=1)


@pytest.mark.parametrize("core_units", [0, 16])
def test_against_brute_force(core_units):
    """400 random cases, budgets from 3 bytes below the smallest assignment to above the largest (so exactly-feasible
    and infeasible budgets occur). Never over budget, never below the optimum, lower bound valid, and within the
    stated tolerance: cost <= optimum + max_u (cost of u's smallest option - u's cheapest cost), also for the LP
    gap. Measured (seed 0): LP greedy + fill alone (core_units=0) is exactly optimal in 361 of 378 feasible cases
    (96 %); with the exact core (the default; all units fit in it here) it is optimal in all of them."""
    rng = np.random.default_rng(0)
    feasible = exact = 0
    for _ in range(400):
        cost, size = _random_case(rng)
        sizes, costs = _brute(cost, size)
        budget = int(rng.integers(sizes.min() - 3, sizes.max() + 3))
        if budget < sizes.min():
            with pytest.raises(PrismqError, match=f"{sizes.min():,} bytes"):
                solve(cost, size, budget, core_units=core_units)
            continue
        a = solve(cost, size, budget, core_units=core_units)
        optimum = costs[sizes <= budget].min()
        rows = np.arange(cost.shape[0])
        assert a.size == size[rows, a.choice].sum() <= budget
        assert a.cost == pytest.approx(cost[rows, a.choice].sum())
        assert a.cost >= optimum - 1e-9
        assert a.lower_bound <= optimum + 1e-9
        offered_size = np.where(np.isfinite(cost), size, np.iinfo(np.int64).max)
        smallest = np.argmin(np.where(offered_size == offered_size.min(1, keepdims=True), cost, np.inf), axis=1)
        tolerance = (cost[rows, smallest] - cost.min(axis=1)).max()
        assert a.gap <= tolerance + 1e-9
        assert a.cost <= optimum + tolerance + 1e-9
        feasible += 1
        exact += a.cost <= optimum + 1e-9
    assert feasible > 300
    if core_units:
        assert exact == feasible
    else:
        assert exact >= 0.85 * feasible


def test_huge_budget_takes_cheapest_option_everywhere():
    """With room for everything each unit takes its minimum-cost option (the smaller one among equal costs)."""
    rng = np.random.default_rng(1)
    cost = rng.random((50, 4))
    cost[:, 3] = cost[:, 2]  # equal cost, option 3 larger: option 2 must win where 2 is the cheapest
    size = np.tile(np.array([10, 20, 30, 40], np.int64), (50, 1))
    a = solve(cost, size, 10**9)
    assert np.array_equal(a.choice, np.argmin(cost, axis=1))
    assert a.gap == 0.0 and a.cost == pytest.approx(cost.min(axis=1).sum())


def test_budget_at_minimum_takes_smallest_options_ties_by_cost():
    """At exactly the smallest feasible size every unit sits at its smallest option, the cheaper one among ties."""
    cost = np.array([[5.0, 3.0, 1.0], [4.0, np.inf, 0.5], [2.0, 1.0, 0.0]])
    size = np.array([[10, 10, 30], [20, 5, 40], [7, 9, 11]], np.int64)  # unit 1's 5-byte option is not offered
    a = solve(cost, size, 10 + 20 + 7)
    assert a.choice.tolist() == [1, 0, 0]
    assert a.size == 37 and a.cost == pytest.approx(3.0 + 4.0 + 2.0)
    with pytest.raises(PrismqError, match=r"36 bytes.*37 bytes = 0\.5000 bits/param"):
        solve(cost, size, 36, params=592)


def test_dominated_option_never_chosen():
    """An option both smaller and cheaper than another wins at every budget."""
    cost = np.array([[1.0, 2.0, 0.1], [1.0, 0.5, 0.2]])
    size = np.array([[10, 20, 40], [10, 20, 40]], np.int64)  # unit 0: option 0 dominates option 1
    for budget in range(20, 81):
        assert solve(cost, size, budget).choice[0] != 1


def test_non_hull_option_found_by_core():
    """An option above the convex hull is still optimal at some budgets: the LP greedy misses it, the core finds it."""
    cost = np.array([[10.0, 9.95, 0.0]])  # option 1 lies above the chord from option 0 to option 2
    size = np.array([[10, 11, 100]], np.int64)
    assert solve(cost, size, 50, core_units=0).choice.tolist() == [0]
    a = solve(cost, size, 50)
    assert a.choice.tolist() == [1] and a.cost == 9.95
    assert a.lower_bound == pytest.approx(10.0 - 10.0 * 40 / 90)  # LP: 40 of the 90 bytes of the hull step


def test_errors():
    """No offered option, bad shapes, non-integer sizes and NaN costs are user errors."""
    with pytest.raises(PrismqError, match="no offered option"):
        solve(np.array([[1.0, 2.0], [np.inf, np.inf]]), np.ones((2, 2), np.int64), 100)
    with pytest.raises(PrismqError, match="same"):
        solve(np.ones((2, 3)), np.ones((2, 2), np.int64), 100)
    with pytest.raises(PrismqError, match="integer"):
        solve(np.ones((2, 2)), np.ones((2, 2)), 100)
    with pytest.raises(PrismqError, match="NaN"):
        solve(np.array([[1.0, np.nan]]), np.ones((1, 2), np.int64), 100)


def test_prepared_reuse_matches_solve():
    """One prepared problem solved at many budgets gives what solve gives, and cost falls as the budget grows."""
    rng = np.random.default_rng(2)
    size = rng.integers(100, 1000, (300, 5)).astype(np.int64)
    cost = rng.random((300, 5)) * 1000.0 / size
    cost[rng.random((300, 5)) < 0.1] = np.inf
    cost[:, 0] = 1.0
    p = prepare(cost, size)
    budgets = np.linspace(p.min_size, size.sum(), 12).astype(np.int64)
    results = [p.solve(int(b)) for b in budgets]
    for b, r in zip(budgets, results):
        assert r.size <= b
        assert np.array_equal(r.choice, solve(cost, size, int(b)).choice)
        assert 0 <= r.gap <= 1e-3 * r.cost + 1e-12  # many units: the LP gap is tiny
    assert all(x.cost >= y.cost - 1e-9 for x, y in zip(results, results[1:]))
