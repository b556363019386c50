"""Multiple-choice knapsack: one option per decision unit, minimum summed cost, summed bytes within a budget.

Unit u in option k costs `cost[u, k]` (predicted delta-loss; `inf` = not offered) and takes `size[u, k]` bytes.

Method (Sinha & Zoltners' LP relaxation, then two improvement passes):

1. Per unit, start at the smallest offered option (ties: cheapest) and walk the lower convex hull of its (size, cost)
   points towards its cheapest option. Each hull step buys a cost decrease for some bytes; along a unit's hull the
   efficiency (cost decrease per byte) strictly decreases (equal only for collinear points).
2. Sort every step of every unit by decreasing efficiency and take them while they fit. This greedy solves the LP
   relaxation exactly: the steps before the first one that does not fit, plus that step taken fractionally, are the
   LP optimum, so its cost is a proven lower bound on the integer optimum (`lower_bound`). The steps before the cut
   alone are a feasible integer solution whose cost exceeds the LP bound by at most the cut step's cost decrease.
3. Fill: keep taking the remaining hull steps that still fit, in efficiency order (vectorized rounds).
4. Core: free the `core_units` units whose hull steps lie nearest the cut (any offered option, hull or not), fix every
   other unit, and solve that sub-problem exactly by dynamic programming over Pareto lists of (bytes, cost).

Guarantee: `size <= budget` always, and `cost <= OPT + d_cut <= OPT + max_u (cost of u's smallest option - cost of
u's cheapest option)`, where d_cut is the cost decrease of the first hull step that does not fit (0 when all fit).
Passes 3 and 4 only ever lower the cost. When every unit with a choice to make is in the core (at most `core_units`
such units) the result is optimal. The actual gap to the LP bound, `gap = cost - lower_bound`, is reported per solve.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from prismq.errors import PrismqError

CORE_UNITS = 16  # units freed around the cut for the exact pass
_MAX_STATES = 200_000  # Pareto states per DP level before the core is halved


class _TooManyStates(Exception):
    """The core's Pareto lists outgrew _MAX_STATES: retry with a smaller core."""


@dataclass(frozen=True)
class Allocation:
    """One solved budget: the option index per unit, its total cost and bytes, and a proven lower bound."""

    choice: np.ndarray  # [U] int64
    cost: float
    size: int
    lower_bound: float

    @property
    def gap(self) -> float:
        """Cost above the LP lower bound: an upper bound on the distance to the true optimum."""
        return self.cost - self.lower_bound


@dataclass(frozen=True)
class Prepared:
    """A problem with its hull steps built once, so that many budgets can be solved cheaply (see `prepare`)."""

    cost: np.ndarray  # [U, K] float64, inf = not offered
    size: np.ndarray  # [U, K] int64
    base: np.ndarray  # [U] smallest offered option (ties: cheapest)
    min_size: int  # bytes of the base assignment: the cheapest feasible size
    step_unit: np.ndarray  # [S] hull steps in decreasing efficiency (per unit in hull order)
    step_from: np.ndarray  # [S]
    step_to: np.ndarray  # [S]
    step_bytes: np.ndarray  # [S] int64 > 0
    step_gain: np.ndarray  # [S] float > 0: cost decrease

    def solve(self, budget: int, params: int | None = None, core_units: int = CORE_UNITS) -> Allocation:
        """Solve one budget (bytes); see the module docstring for the method and its guarantee."""
        return _solve(self, int(budget), params, core_units)


def solve(cost: np.ndarray, size: np.ndarray, budget: int, params: int | None = None,
          core_units: int = CORE_UNITS) -> Allocation:
    """Minimize sum cost[u, choice[u]] subject to sum size[u, choice[u]] <= budget; `params` (weights covered) only
    makes the too-small-budget error speak in bits per parameter. Raises PrismqError if no assignment fits."""
    return prepare(cost, size).solve(budget, params, core_units)


def prepare(cost: np.ndarray, size: np.ndarray) -> Prepared:
    """Validate the arrays and build every unit's lower-convex-hull steps, sorted by decreasing efficiency; the
    expensive part of a solve, done once for a sweep of budgets."""
    cost = np.asarray(cost, dtype=np.float64)
    size = np.asarray(size)
    if cost.ndim != 2 or cost.shape != size.shape or cost.shape[1] == 0:
        raise PrismqError(f"knapsack: cost {cost.shape} and size {size.shape} must be the same [units, options] shape")
    if not np.issubdtype(size.dtype, np.integer):
        raise PrismqError(f"knapsack: sizes must be integer bytes, got {size.dtype}")
    size = size.astype(np.int64)
    if np.isnan(cost).any() or (cost == -np.inf).any():
        raise PrismqError("knapsack: costs must be finite or +inf (not offered); got NaN or -inf")
    offered = cost < np.inf
    if (size[offered] < 0).any():
        raise PrismqError("knapsack: negative size for an offered option")
    stuck = np.flatnonzero(~offered.any(axis=1))
    if stuck.size:
        raise PrismqError(f"knapsack: {stuck.size} unit(s) have no offered option (first: unit {int(stuck[0])})")
    units = np.arange(cost.shape[0])
    base = _smallest_cheapest(cost, np.where(offered, size, np.iinfo(np.int64).max))
    units_l, from_l, to_l = [], [], []
    cur = base.copy()
    active = units
    while active.size:  # Jarvis march along the lower hull, all units at once; at most K-1 rounds
        c0, s0 = cost[active, cur[active]][:, None], size[active, cur[active]][:, None]
        c, s = cost[active], size[active]
        better = (s > s0) & (c < c0)
        eff = np.where(better, (c0 - c) / np.where(better, s - s0, 1), -np.inf)
        top = eff.max(axis=1)
        nxt = np.argmin(np.where(eff == top[:, None], s, np.iinfo(np.int64).max), axis=1)  # ties: smaller (finer)
        ok = top > -np.inf
        active, nxt = active[ok], nxt[ok]
        units_l.append(active)
        from_l.append(cur[active])
        to_l.append(nxt)
        cur[active] = nxt
    u, f, t = (np.concatenate(x) if x else np.zeros(0, np.int64) for x in (units_l, from_l, to_l))
    step_bytes = size[u, t] - size[u, f]
    step_gain = cost[u, f] - cost[u, t]
    rank = np.arange(u.size)  # steps were appended in hull order per unit
    order = np.lexsort((rank, -(step_gain / step_bytes)))
    return Prepared(cost, size, base, int(size[units, base].sum()), u[order], f[order], t[order],
                    step_bytes[order], step_gain[order])


def _smallest_cheapest(cost: np.ndarray, size_key: np.ndarray) -> np.ndarray:
    """Per row, the option of least size, ties broken by least cost."""
    smallest = size_key == size_key.min(axis=1, keepdims=True)
    return np.argmin(np.where(smallest, cost, np.inf), axis=1)


def _solve(p: Prepared, budget: int, params: int | None, core_units: int) -> Allocation:
    """LP greedy, fill and exact core pass for one budget."""
    if budget < p.min_size:
        bpp = f" = {8 * p.min_size / params:.4f} bits/param" if params else ""
        raise PrismqError(f"budget of {budget:,} bytes is below the smallest feasible assignment: "
                          f"{p.min_size:,} bytes{bpp}")
    units = np.arange(p.cost.shape[0])
    room = budget - p.min_size
    cum = np.cumsum(p.step_bytes)
    cut = int(np.searchsorted(cum, room, side="right"))  # steps [0, cut) fit
    choice = p.base.copy()
    taken, last = np.unique(p.step_unit[:cut][::-1], return_index=True)  # per unit its last step before the cut
    choice[taken] = p.step_to[:cut][::-1][last]
    total_cost = float(p.cost[units, choice].sum())
    if cut < p.step_unit.size:
        left = room - (int(cum[cut - 1]) if cut else 0)
        lower = total_cost - p.step_gain[cut] * left / p.step_bytes[cut]
        choice = _fill(p, choice, cut, budget - int(p.size[units, choice].sum()))
        choice = _core(p, choice, cut, budget, core_units)
    else:
        lower = total_cost
    total_cost = float(p.cost[units, choice].sum())
    total_size = int(p.size[units, choice].sum())
    assert total_size <= budget, (total_size, budget)
    return Allocation(choice, total_cost, total_size, min(lower, total_cost))


def _fill(p: Prepared, choice: np.ndarray, cut: int, room: int) -> np.ndarray:
    """Take further hull steps (from the cut on, efficiency order) while they fit; rounds of vectorized prefix sums."""
    choice = choice.copy()
    rest = np.arange(cut, p.step_unit.size)
    rest = rest[p.step_bytes[rest] <= room]
    while rest.size:
        ready = rest[p.step_from[rest] == choice[p.step_unit[rest]]]
        if not ready.size:
            break
        cum = np.cumsum(p.step_bytes[ready])
        n = int(np.searchsorted(cum, room, side="right"))  # >= 1: every ready step fits alone
        choice[p.step_unit[ready[:n]]] = p.step_to[ready[:n]]  # one ready step per unit, so no clashes
        room -= int(cum[n - 1])
        rest = rest[(p.step_bytes[rest] <= room) & (choice[p.step_unit[rest]] != p.step_to[rest])]
    return choice


def _core(p: Prepared, choice: np.ndarray, cut: int, budget: int, core_units: int) -> np.ndarray:
    """Re-solve exactly the units whose hull steps are nearest the cut, others fixed; halve the core if too big."""
    if core_units <= 0:
        return choice
    dist = np.abs(np.arange(p.step_unit.size) - cut + 0.5)  # the cut sits between steps cut-1 and cut
    by_dist = p.step_unit[np.argsort(dist, kind="stable")]
    _, first = np.unique(by_dist, return_index=True)
    nearest = by_dist[np.sort(first)]  # units in order of their nearest step to the cut
    units = np.arange(p.cost.shape[0])
    while core_units > 0:
        core = nearest[:core_units]
        fixed = int(p.size[units, choice].sum() - p.size[core, choice[core]].sum())
        incumbent = float(p.cost[core, choice[core]].sum())
        try:
            best = _pareto_dp(p.cost[core], p.size[core], budget - fixed, incumbent)
        except _TooManyStates:
            core_units //= 2
            continue
        if best is not None and float(p.cost[core, best].sum()) < incumbent:
            choice = choice.copy()
            choice[core] = best
        return choice
    return choice


def _pareto_dp(cost: np.ndarray, size: np.ndarray, capacity: int, incumbent: float) -> np.ndarray | None:
    """Exact minimum-cost choice for a few units within `capacity` bytes, by merging Pareto lists of (bytes, cost)
    unit by unit; states that cannot fit or cannot beat `incumbent` are pruned. None if pruning left nothing (the
    incumbent is optimal up to rounding); raises _TooManyStates if a list outgrows _MAX_STATES."""
    offered = cost < np.inf
    min_size = np.where(offered, size, np.iinfo(np.int64).max).min(axis=1)
    min_cost = cost.min(axis=1)
    size_rest = np.concatenate([np.cumsum(min_size[::-1])[::-1][1:], [0]])
    cost_rest = np.concatenate([np.cumsum(min_cost[::-1])[::-1][1:], [0.0]])
    slack = 1e-12 * max(1.0, abs(incumbent))
    s, c = np.zeros(1, np.int64), np.zeros(1)
    parents, options = [], []
    for i in range(cost.shape[0]):
        ks = np.flatnonzero(offered[i])
        s2 = (s[:, None] + size[i, ks][None, :]).ravel()
        c2 = (c[:, None] + cost[i, ks][None, :]).ravel()
        parent = np.repeat(np.arange(s.size), ks.size)
        option = np.tile(ks, s.size)
        keep = (s2 + size_rest[i] <= capacity) & (c2 + cost_rest[i] <= incumbent + slack)
        s2, c2, parent, option = s2[keep], c2[keep], parent[keep], option[keep]
        if not s2.size:
            return None
        order = np.lexsort((c2, s2))
        s2, c2, parent, option = s2[order], c2[order], parent[order], option[order]
        prior_min = np.concatenate([[np.inf], np.minimum.accumulate(c2)[:-1]])
        front = c2 < prior_min  # strictly cheaper than every state of no more bytes
        s, c = s2[front], c2[front]
        parents.append(parent[front])
        options.append(option[front])
        if s.size > _MAX_STATES:
            raise _TooManyStates
    state = int(np.argmin(c))
    best = np.empty(cost.shape[0], np.int64)
    for i in range(cost.shape[0] - 1, -1, -1):
        best[i] = options[i][state]
        state = int(parents[i][state])
    return best
