"""The validated frontier: candidate mixes at several budgets measured end to end, the measured Pareto front, its
knee, and whether that knee survives leaving any one point out.

Candidates are the knapsack's solutions with the costs L3 estimated, at a ladder of budgets around the target (and
the knapsack's own mix): each is a full forward on the selection split, as one lane of a streamed walk
(`measured.measure_lanes`). A point stays on the measured front only if its mean KL is below that of every cheaper
point on the front by `margin` of its standard errors: paying more bytes must buy a measurable improvement. The
knee is kneedle's on the front's (bits, KL); leave-one-out drops each other point in turn and says whether the knee
moves.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prismq.allocate.pareto import kneedle

LADDER_BITS: tuple[float, ...] = (4.5, 4.75, 5.0, 5.5, 6.0, 7.0, 8.25)  # budgets measured besides the target
FRONT_MARGIN = 2.0  # standard errors a dearer point must gain over a cheaper one to stay on the front


@dataclass(frozen=True)
class MeasuredPoint:
    """One measured candidate: its name, bits per parameter and bytes, mean KL on the selection split and the
    standard error of that mean."""

    name: str
    bits: float
    size: int
    mean_kl: float
    stderr: float


def measured_front(points: list[MeasuredPoint], margin: float = FRONT_MARGIN) -> list[int]:
    """Indices of the measured Pareto front in increasing bits: walking up in bits, a point is kept when its mean KL
    is below the last kept point's by more than `margin` of its own standard errors."""
    order = sorted(range(len(points)), key=lambda i: (points[i].bits, points[i].mean_kl))
    kept: list[int] = []
    for i in order:
        if not kept or points[i].mean_kl < points[kept[-1]].mean_kl - margin * points[i].stderr:
            kept.append(i)
    return kept


def leave_one_out(x: np.ndarray, y: np.ndarray) -> dict[str, object]:
    """The kneedle knee of (x, y) and its stability: the knee found again with each other point left out; stable
    when it never moves."""
    knee = kneedle(x, y)
    moved = set()
    for drop in range(len(x)):
        if drop == knee:
            continue
        keep = [j for j in range(len(x)) if j != drop]
        found = keep[kneedle(x[keep], y[keep])]
        if found != knee:
            moved.add(found)
    return {"knee": knee, "stable": not moved, "moved_to": sorted(moved)}


def best_within(points: list[MeasuredPoint], budget: int) -> int | None:
    """The index of the lowest measured KL among the points that fit `budget` bytes (None if none fits)."""
    fitting = [i for i, p in enumerate(points) if p.size <= budget]
    return min(fitting, key=lambda i: points[i].mean_kl) if fitting else None


def plot_measured(points: list[MeasuredPoint], predicted: list[float], front: list[int], knee: int | None,
                  path: Path) -> None:
    """A PNG of the candidates' measured mean KL (with standard errors, the front joined, the knee starred) next to
    the rescaled surrogate's prediction for the same mixes, against bits per parameter."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = np.array([p.bits for p in points])
    ax.errorbar(x, [p.mean_kl for p in points], yerr=[p.stderr for p in points], fmt="o", color="tab:blue",
                capsize=3, label="measured KL (selection split)")
    ax.plot(x[front], [points[i].mean_kl for i in front], "-", color="tab:blue", linewidth=1.5, label="measured front")
    ax.plot(x, predicted, "x", color="tab:gray", markersize=7, label="predicted (surrogate, rescaled)")
    if knee is not None:
        ax.plot([points[knee].bits], [points[knee].mean_kl], "*", color="tab:red", markersize=16, zorder=5,
                label=f"knee: {points[knee].bits:.3f} bits/param")
    for p in points:
        ax.annotate(p.name, (p.bits, p.mean_kl), xytext=(6, 5), textcoords="offset points", fontsize=8)
    if min(p.mean_kl for p in points) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("bits per parameter (allocated weights, every scale counted)")
    ax.set_ylabel("mean KL (nats/token)")
    ax.set_title("measured frontier (round-to-nearest weights)")
    ax.grid(True, alpha=0.4)
    ax.legend(loc="upper right")
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        fig.savefig(partial, format="png")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
