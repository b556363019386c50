"""The frontier: byte budgets from bits, the sweep, the knee, frontier.json and the plot."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from prismq.allocate.knapsack import solve
from prismq.allocate.pareto import (DEFAULT_BITS, FrontierPoint, budgets_from_bits, frontier_json, knee,
                                    plot_frontier, sweep)
from prismq.errors import PrismqError

BPP = np.array([4.25, 4.5, 6.25, 8.25, 8.0, 16.0])


def _problem(units: int = 120, seed: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
    """Linears of a few shapes in six formats, cost falling ~4x per bit with per-unit sensitivity and noise."""
    rng = np.random.default_rng(seed)
    params = rng.choice([576 * 576, 576 * 192, 576 * 1536], units)
    size = np.ceil(params[:, None] * BPP[None] / 8).astype(np.int64)
    sensitivity = 1e-7 * rng.lognormal(0, 2, (units, 1)) * params[:, None]
    cost = sensitivity * 2.0 ** (-2 * BPP) * rng.lognormal(0, 0.3, (units, 6))
    cost[rng.random((units, 6)) < 0.05] = np.inf
    cost[:, 5] = 0.0  # BF16: exact, offered everywhere
    cost[:, 0] = np.where(np.isinf(cost[:, 0]), cost[:, 1], cost[:, 0])  # everyone can take the smallest format
    return cost, size, int(params.sum())


def _points(xs, ys) -> list[FrontierPoint]:
    return [FrontierPoint(0, x, x, 0, y, y, 0.0, np.zeros(1, np.int64)) for x, y in zip(xs, ys)]


def test_default_bits_and_budgets_never_exceed_target():
    """The default range is 4.25 ... 8.5 in steps of 0.25; budgets round down to whole bytes."""
    assert DEFAULT_BITS[0] == 4.25 and DEFAULT_BITS[-1] == 8.5 and len(DEFAULT_BITS) == 18
    params = 1_000_003
    budgets = budgets_from_bits([4.25, 4.75, 8.5], params)
    assert budgets == [531251, 593751, 1062503]
    assert all(8 * b <= bits * params < 8 * (b + 1) for b, bits in zip(budgets, [4.25, 4.75, 8.5]))
    with pytest.raises(PrismqError):
        budgets_from_bits([5.0], 0)


def test_sweep_monotone_and_skips_infeasible():
    """Budgets below the smallest assignment are skipped, the rest come sorted with cost non-increasing, each within
    its budget, each as good as a direct solve."""
    cost, size, params = _problem()
    bits = [3.0, 4.0] + list(DEFAULT_BITS)[::-1]  # below MXFP4's 4.25: skipped; unsorted input
    points = sweep(cost, size, budgets_from_bits(bits, params), params)
    assert len(points) == len(DEFAULT_BITS)
    assert [p.budget_bits for p in points] == pytest.approx(sorted(DEFAULT_BITS), abs=1e-4)
    for a, b in zip(points, points[1:]):
        assert b.cost <= a.cost
    for p in points:
        assert p.size <= p.budget and p.bits_per_param <= p.budget_bits
        assert p.cost <= solve(cost, size, p.budget).cost + 1e-12
        assert 0 <= p.gap and p.lower_bound <= p.cost
    assert points[0].cost > 10 * points[-1].cost


def test_sweep_all_budgets_infeasible_is_empty():
    """Nothing fits: no point, no error (the caller reports the minimum)."""
    cost, size, params = _problem()
    assert sweep(cost, size, budgets_from_bits([2.0, 3.0], params), params) == []


def test_knee_of_hyperbola_and_elbow():
    """y = 1/x on 1..10: the point farthest below the normalised chord is x = 3 (d = 0.52 vs 0.50 at x = 4, 0.44 at
    x = 2). A hand-made elbow (steep, then flat from x = 5) has its knee at the corner."""
    xs = np.arange(1.0, 11.0)
    assert knee(_points(xs, 1.0 / xs)) == 2
    elbow = [10.0, 7.5, 5.0, 2.5, 0.4, 0.3, 0.2, 0.1, 0.0]
    assert knee(_points(np.arange(9.0), elbow)) == 4


def test_knee_fallbacks():
    """No bend to find: fewer than three points or a straight line give the lowest-cost point; a flat curve the
    first."""
    assert knee(_points([4.5], [1.0])) == 0
    assert knee(_points([4.5, 5.0], [1.0, 0.5])) == 1
    assert knee(_points([4, 5, 6, 7], [3.0, 2.0, 1.0, 0.0])) == 3
    assert knee(_points([4, 5, 6], [1.0, 1.0, 1.0])) == 0
    with pytest.raises(PrismqError):
        knee([])


def test_frontier_json_round_trips():
    """frontier.json carries the knee, every point's numbers and choice, and per-format unit counts."""
    cost, size, params = _problem(units=30)
    points = sweep(cost, size, budgets_from_bits(DEFAULT_BITS, params), params)
    k = knee(points)
    names = ["MXFP4", "NVFP4", "MXFP6", "MXFP8", "FP8", "BF16"]
    data = json.loads(json.dumps(frontier_json(points, k, names)))
    assert data["knee_index"] == k and data["knee_bits_per_param"] == points[k].bits_per_param
    assert len(data["points"]) == len(points)
    row = data["points"][k]
    assert row["choice"] == points[k].choice.tolist() and row["size_bytes"] == points[k].size
    assert sum(row["units_per_format"].values()) == 30
    assert "formats" not in frontier_json(points, k)


def test_plot_written(tmp_path):
    """A PNG of sane pixel size is written, also with a zero-cost uniform point (BF16) and a wide y range."""
    cost, size, params = _problem()
    points = sweep(cost, size, budgets_from_bits(DEFAULT_BITS, params), params)
    names = ["MXFP4", "NVFP4", "MXFP6", "MXFP8", "FP8", "BF16"]
    uniform = {n: (float(8 * size[:, i].sum() / params), float(cost[:, i].sum()))
               for i, n in enumerate(names) if np.isfinite(cost[:, i]).all()}
    assert uniform["BF16"][1] == 0.0
    path = tmp_path / "out" / "frontier.png"
    plot_frontier(points, knee(points), uniform, path, "test frontier")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    width, height = struct.unpack(">II", data[16:24])
    assert 600 <= width <= 2000 and 400 <= height <= 1500
    assert list(path.parent.iterdir()) == [path]  # no partial file left
    inside = tmp_path / "zero.png"  # a zero cost inside the plotted range: symmetric-log axis
    plot_frontier(points, None, {"EXACT": (6.0, 0.0)}, inside, "zero inside")
    assert inside.stat().st_size > 10_000
