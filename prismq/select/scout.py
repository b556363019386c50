"""SCOUT's decisions on the knapsack problem: which units the surrogate is least sure of, and the re-solve with
measured costs.

Costs: the surrogate prices unit u in format k as cost[u, k] (predicted delta-loss, nats, from the Fisher); L3
measures, for a few units, the end-to-end KL change of each alternative format against the current assignment
(`measured.FlipMeasure`). Both are in nats, but the Fisher diagonal misjudges scale as well as rank, so the
surrogate's costs are rescaled by the least-squares factor that maps its predicted changes onto the measured ones
(through the origin, fitted on the measured flips) before the two are combined in one knapsack: a measured unit
keeps its current option's rescaled cost and adds the estimated change for each alternative.

A measurement is noisy (its standard error over the selection positions), and so is the surrogate. The estimate of a
flip's change combines both by their precision: the measured change weighted by 1 / stderr^2 and the rescaled
prediction by 1 / tau^2, where tau^2, the surrogate's own error variance, is what the spread of the measured changes
around the rescaled predictions leaves once the measurements' noise is taken out. Precise measurements decide; a
measurement no more precise than the surrogate only moves it part of the way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from prismq.allocate.budget import Problem
from prismq.allocate.knapsack import prepare, solve
from prismq.select.measured import Flip, FlipMeasure

NEIGHBOUR_BUDGET = 0.02  # the exchange rate is read between budgets this fraction apart


@dataclass(frozen=True)
class Uncertainty:
    """Why each unit was picked: its smallest relative margin to an alternative, and its current predicted cost."""

    unit: int
    margin: float
    cost: float
    reason: str  # "margin" or "cost"


def exchange_rate(problem: Problem, budget: int) -> float:
    """The surrogate's marginal cost of a byte near `budget` (nats per byte, >= 0): the cost difference of the
    knapsack solved slightly below and slightly above it, over their byte difference."""
    low_budget = int(budget * (1 - NEIGHBOUR_BUDGET))
    smallest = prepare(problem.cost, problem.size).min_size
    low = solve(problem.cost, problem.size, max(low_budget, smallest), problem.params)
    high = solve(problem.cost, problem.size, int(budget * (1 + NEIGHBOUR_BUDGET)), problem.params)
    if high.size <= low.size:
        return 0.0
    return max(0.0, (low.cost - high.cost) / (high.size - low.size))


def uncertain_units(problem: Problem, choice: np.ndarray, rate: float, count: int) -> list[Uncertainty]:
    """Up to `count` units to measure end to end: half with the smallest relative margin between the chosen option
    and an alternative under the surrogate's exchange rate (a small predicted error there flips the decision), the
    rest with the largest predicted cost at their chosen option (the surrogate's absolute error is largest there).
    Units offered one option only are never picked."""
    units = np.arange(len(problem.units))
    chosen_cost = problem.cost[units, choice]
    chosen_size = problem.size[units, choice].astype(np.float64)
    offered = ~np.isinf(problem.cost)
    delta_cost = np.where(offered, problem.cost - chosen_cost[:, None], np.nan)
    delta_size = np.where(offered, problem.size - chosen_size[:, None], np.nan)
    objective = np.abs(delta_cost + rate * delta_size)
    scale = np.abs(delta_cost) + rate * np.abs(delta_size)
    with np.errstate(invalid="ignore", divide="ignore"):
        relative = np.where(scale > 0, objective / scale, np.inf)
    relative[units, choice] = np.inf
    margin = np.nan_to_num(relative, nan=np.inf).min(axis=1)
    eligible = offered.sum(axis=1) > 1
    picked: list[Uncertainty] = []
    for u in np.argsort(margin, kind="stable"):
        if len(picked) >= (count + 1) // 2 or not np.isfinite(margin[u]):
            break
        if eligible[u]:
            picked.append(Uncertainty(int(u), float(margin[u]), float(chosen_cost[u]), "margin"))
    taken = {p.unit for p in picked}
    for u in np.argsort(-chosen_cost, kind="stable"):
        if len(picked) >= count:
            break
        if eligible[u] and int(u) not in taken:
            picked.append(Uncertainty(int(u), float(margin[u]), float(chosen_cost[u]), "cost"))
    return picked


def flips_for(problem: Problem, choice: np.ndarray, units: list[int]) -> list[Flip]:
    """Every alternative option of each unit, as flips away from its chosen option."""
    return [Flip(tuple(problem.units[u]), problem.formats[k]) for u in units
            for k in np.flatnonzero(~np.isinf(problem.cost[u])) if k != choice[u]]


def surrogate_scale(problem: Problem, choice: np.ndarray, measured: list[FlipMeasure]) -> float:
    """The factor that best maps the surrogate's predicted change of each measured flip onto its measured change
    (least squares through the origin); 1 when nothing was measured or the fit is not positive."""
    index = {tuple(members): u for u, members in enumerate(problem.units)}
    predicted, observed = [], []
    for m in measured:
        u, k = index[m.flip.unit], problem.formats.index(m.flip.format)
        predicted.append(problem.cost[u, k] - problem.cost[u, choice[u]])
        observed.append(m.delta_kl)
    p, o = np.array(predicted), np.array(observed)
    denominator = float((p * p).sum())
    alpha = float((p * o).sum()) / denominator if denominator > 0 else 0.0
    return alpha if alpha > 0 and np.isfinite(alpha) else 1.0


def _predicted(problem: Problem, choice: np.ndarray, measured: list[FlipMeasure]) -> np.ndarray:
    """The surrogate's predicted change of each measured flip."""
    index = {tuple(members): u for u, members in enumerate(problem.units)}
    return np.array([problem.cost[index[m.flip.unit], problem.formats.index(m.flip.format)]
                     - problem.cost[index[m.flip.unit], choice[index[m.flip.unit]]] for m in measured])


def surrogate_error(problem: Problem, choice: np.ndarray, measured: list[FlipMeasure], alpha: float) -> float:
    """tau^2: the variance of the rescaled surrogate's error on a flip, estimated from the measured flips as the mean
    squared residual minus the mean squared standard error (floored at a tenth of the latter: never certain)."""
    if not measured:
        return float("inf")
    residual = np.array([m.delta_kl for m in measured]) - alpha * _predicted(problem, choice, measured)
    noise = float(np.mean([m.stderr ** 2 for m in measured]))
    return max(float(np.mean(residual ** 2)) - noise, 0.1 * noise, 1e-30)


def estimates(problem: Problem, choice: np.ndarray, measured: list[FlipMeasure], alpha: float) -> np.ndarray:
    """Each measured flip's estimated change: its measurement and the rescaled prediction, weighted by precision."""
    if not measured:
        return np.zeros(0)
    tau2 = surrogate_error(problem, choice, measured, alpha)
    predicted = alpha * _predicted(problem, choice, measured)
    weight = np.array([1.0 / max(m.stderr ** 2, 1e-30) for m in measured])
    values = np.array([m.delta_kl for m in measured])
    return (weight * values + predicted / tau2) / (weight + 1.0 / tau2)


def measured_costs(problem: Problem, choice: np.ndarray, measured: list[FlipMeasure], alpha: float) -> np.ndarray:
    """The cost matrix with measured units' alternatives at (rescaled chosen cost + estimated change, see
    `estimates`) and every other entry at alpha times the surrogate's."""
    cost = problem.cost * alpha
    index = {tuple(members): u for u, members in enumerate(problem.units)}
    for m, change in zip(measured, estimates(problem, choice, measured, alpha)):
        u, k = index[m.flip.unit], problem.formats.index(m.flip.format)
        cost[u, k] = cost[u, choice[u]] + change
    finite = np.where(np.isinf(cost), np.inf, cost)
    return cost - np.minimum(finite.min(axis=1, keepdims=True), 0.0)  # a unit's constant shift changes no decision
