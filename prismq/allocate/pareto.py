"""The predicted frontier: the knapsack solved over a sweep of budgets, its knee (kneedle), frontier.json and a plot."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from prismq.allocate.knapsack import prepare
from prismq.errors import PrismqError

DEFAULT_BITS: tuple[float, ...] = tuple(4.25 + 0.25 * i for i in range(18))  # 4.25 ... 8.5


@dataclass(frozen=True)
class FrontierPoint:
    """One budget of the sweep and the allocation chosen for it."""

    budget: int  # bytes
    budget_bits: float  # the budget in bits per parameter
    bits_per_param: float  # achieved: 8 * size / params
    size: int  # bytes
    cost: float  # predicted delta-loss
    lower_bound: float
    gap: float  # cost - lower_bound
    choice: np.ndarray  # [U] option index per unit


def budgets_from_bits(bits: Sequence[float], params: int) -> list[int]:
    """Byte budgets for mean bits per parameter over `params` weights, rounded down so that the achieved bits never
    exceed the target."""
    if params <= 0:
        raise PrismqError(f"params must be positive, got {params}")
    return [int(Fraction(float(b)) * params // 8) for b in bits]


def sweep(cost: np.ndarray, size: np.ndarray, budgets: Sequence[int], params: int) -> list[FrontierPoint]:
    """Solve every budget (bytes) sharing one hull build; budgets below the smallest feasible assignment are skipped.
    Points come in increasing budget with cost non-increasing: a larger budget whose heuristic solution is worse
    than a smaller budget's keeps the smaller budget's (still feasible) allocation."""
    problem = prepare(cost, size)
    points: list[FrontierPoint] = []
    for budget in sorted(int(b) for b in budgets):
        if budget < problem.min_size:
            continue
        a = problem.solve(budget, params)
        choice, total, used = a.choice, a.cost, a.size
        if points and points[-1].cost < total:
            choice, total, used = points[-1].choice, points[-1].cost, points[-1].size
        points.append(FrontierPoint(budget, 8 * budget / params, 8 * used / params, used, total, a.lower_bound,
                                    total - a.lower_bound, choice))
    return points


def knee(points: Sequence[FrontierPoint]) -> int:
    """Index of the knee of the decreasing convex curve (bits per parameter, predicted cost), by kneedle (Satopaa et
    al. 2011): normalise both axes to [0, 1] and take the point farthest below the chord from the first point to the
    last. Where there is no bend to find (fewer than 3 points, or no point below the chord: a straight or concave
    curve) the lowest-cost point is returned, since then more bits keep paying at least as much; a flat curve gives
    the first (smallest) point."""
    if not points:
        raise PrismqError("knee of an empty frontier")
    return kneedle(np.array([p.bits_per_param for p in points]), np.array([p.cost for p in points]))


def kneedle(x: np.ndarray, y: np.ndarray) -> int:
    """`knee` on bare arrays: x (bits per parameter, increasing) and a decreasing y (predicted cost or measured
    KL)."""
    if len(x) == 0:
        raise PrismqError("knee of an empty frontier")
    if np.ptp(y) == 0:
        return 0
    lowest = int(np.flatnonzero(y == y.min())[0])
    if len(x) < 3 or np.ptp(x) == 0:
        return lowest
    xn = (x - x.min()) / np.ptp(x)
    yn = (y - y.min()) / np.ptp(y)
    below = (1.0 - xn) - yn
    return int(np.argmax(below)) if below.max() > 1e-12 else lowest


def frontier_json(points: Sequence[FrontierPoint], knee_index: int | None,
                  formats: Sequence[str] | None = None) -> dict:
    """frontier.json: every point (budget, achieved bits, predicted cost, LP bound and gap, the choice per unit) and
    the knee; with `formats`, the option names and the number of units per format at each point."""
    out: dict = {"knee_index": knee_index,
                 "knee_bits_per_param": None if knee_index is None else points[knee_index].bits_per_param}
    if formats is not None:
        out["formats"] = list(formats)
    rows = []
    for p in points:
        row = {"budget_bytes": p.budget, "budget_bits": p.budget_bits, "bits_per_param": p.bits_per_param,
               "size_bytes": p.size, "predicted_dloss": p.cost, "lower_bound": p.lower_bound, "gap": p.gap}
        if formats is not None:
            counts = np.bincount(p.choice, minlength=len(formats))
            row["units_per_format"] = {f: int(n) for f, n in zip(formats, counts)}
        row["choice"] = [int(k) for k in p.choice]
        rows.append(row)
    out["points"] = rows
    return out


def plot_frontier(points: Sequence[FrontierPoint], knee_index: int | None, uniform: dict[str, tuple[float, float]],
                  path: Path, title: str) -> None:
    """Write a PNG of predicted delta-loss vs bits per parameter: the frontier (line and markers), the knee, and each
    uniform format at its (bits, cost), labelled (those far right of the frontier, like BF16, are listed in a note
    instead of squeezing it; non-finite ones are dropped). The y axis is logarithmic when the values span more than two
    decades (symmetric-log if some are 0, e.g. BF16)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MultipleLocator

    fig = Figure(figsize=(8, 5), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = [p.bits_per_param for p in points]
    y = [p.cost for p in points]
    ax.plot(x, y, "-o", color="tab:blue", markersize=4, linewidth=1.5, label="allocated (predicted frontier)")
    if knee_index is not None and points:
        kx, ky = x[knee_index], y[knee_index]
        ax.plot([kx], [ky], "*", color="tab:red", markersize=16, zorder=5, label=f"knee: {kx:.3f} bits/param")
        ax.annotate(f"knee {kx:.2f}", (kx, ky), xytext=(10, 10), textcoords="offset points", color="tab:red")
    lo = min(x, default=4.0)
    hi = max(x, default=8.0)
    uniform = {n: v for n, v in uniform.items() if np.isfinite(v).all()}
    inside = {n: v for n, v in uniform.items() if lo - 1.0 <= v[0] <= hi + 1.0}
    outside = {n: v for n, v in uniform.items() if n not in inside}
    if inside:
        ax.plot([v[0] for v in inside.values()], [v[1] for v in inside.values()], "s", color="tab:orange",
                markersize=7, zorder=4, label="uniform formats")
        for name, (bx, by) in inside.items():
            above = _label_above(name, inside)
            ax.annotate(name, (bx, by), xytext=(7, 6 if above else -13), textcoords="offset points", fontsize=9,
                        color="tab:orange", bbox=dict(boxstyle="round,pad=0.1", fc="white", ec="none", alpha=0.8))
    if outside:
        note = "off the plot: " + ", ".join(f"{n} ({bx:.2f} bits, {by:.3g})" for n, (bx, by) in outside.items())
        ax.text(0.01, 0.01, note, transform=ax.transAxes, fontsize=8, color="tab:orange", va="bottom")
    values = np.array(y + [v[1] for v in inside.values()])
    positive = values[values > 0]
    if positive.size and positive.max() > 100 * positive.min():
        if (values <= 0).any():
            ax.set_yscale("symlog", linthresh=float(positive.min()), linscale=0.5)
        else:
            ax.set_yscale("log")
    if hi - lo <= 8:
        ax.xaxis.set_major_locator(MultipleLocator(0.5))
        ax.xaxis.set_minor_locator(MultipleLocator(0.25))
    ax.set_xlabel("bits per parameter (allocated Linears, every scale counted)")
    ax.set_ylabel("predicted delta-loss (nats/token)")
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.4)
    ax.grid(True, which="minor", alpha=0.15)
    ax.legend(loc="upper right")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")  # never a half-written PNG at `path`
    try:
        fig.savefig(partial, format="png")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _label_above(name: str, points: dict[str, tuple[float, float]]) -> bool:
    """Put a uniform point's label above it unless its nearest neighbour in bits is costlier (then below), so that
    two close formats get their labels on opposite sides."""
    bx, by = points[name]
    others = [(abs(ox - bx), oy) for n, (ox, oy) in points.items() if n != name]
    return not others or by >= min(others)[1]
