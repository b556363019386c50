"""The select stage (SCOUT): the knapsack's mix in, a mix re-decided on measured end-to-end KL out.

The surrogate (predicted delta-loss from the Fisher) proposes; real KL decides where it is least sure: the units
with the smallest decision margins and the largest predicted costs are measured end to end, every alternative format
of each as a flip of the knapsack's mix (`measured.measure_flips`, on the selection split only), and the knapsack is
solved again under the same byte budget with those measured costs (`scout`). The round stage then rounds the
selected mix as it ships and keeps the knapsack's own mix and the uniform formats as alternatives, so the result is
never worse than either on the selection split. `--selection surrogate` (or `--select-units 0`) keeps the
knapsack's mix: the ablation.

Writes WORK/selection.json: every flip measured (unit, formats, bytes, predicted and measured change with its
standard error), the surrogate scale, the units picked and why, what changed. Rerunning with the same allocation,
text and settings reuses it.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel

from prismq.allocate.budget import Problem
from prismq.allocate.knapsack import prepare, solve
from prismq.allocate.pareto import budgets_from_bits
from prismq.allocate.stage import Allocation, allocation_budget, allocation_problem
from prismq.artifacts import fingerprint_model, fingerprint_tokens, read_current, write_json
from prismq.config import QuantizeConfig
from prismq.engine.distributed import run_everywhere
from prismq.engine.walkstate import WalkState
from prismq.measure.cost import CostRow
from prismq.measure.fisher_streamed import remove_scratch
from prismq.model.source import resolve_device
from prismq.rounding.ranges import ranges_fingerprint, ranges_for
from prismq.rounding.stage import assignment_fingerprint
from prismq.select.frontier import (LADDER_BITS, MeasuredPoint, best_within, leave_one_out, measured_front,
                                    plot_measured)
from prismq.select.measured import Flip
from prismq.select.perturbed import FixedPoint, fixed_point
from prismq.select.walks import flips_walk, lanes_walk, recost_walk
from prismq.select.scout import (estimates, exchange_rate, flips_for, measured_costs, surrogate_error,
                                 surrogate_scale, uncertain_units)

logger = logging.getLogger(__name__)

SELECTION = "selection"
MEASURED_PLOT = "frontier_measured.png"
RECOST_TOLERANCE = 0.01  # L2 stops once less than this share of the weights changed format in a step


class Selection(BaseModel):
    """What the select stage decided: the mix to round and ship, how (measured or surrogate), and its audit trail."""

    mode: str  # "measured" or "surrogate"
    assignment: dict[str, str]
    bits_per_param: float | None = None
    base_kl: dict[str, Any] | None = None  # the knapsack's mix (round-to-nearest) on the selection split
    surrogate_scale: float | None = None
    surrogate_error: float | None = None  # tau: the rescaled surrogate's error on a flip, nats
    exchange_rate: float | None = None  # predicted nats per byte at the budget
    units: list[dict[str, Any]] = []  # the units L3 measured
    decision_units: int | None = None  # every decision unit of the allocation problem
    flips: list[dict[str, Any]] = []
    changed: list[dict[str, Any]] = []  # units whose format differs from the knapsack's mix
    recost: dict[str, Any] | None = None  # the L2 iterations
    frontier: list[dict[str, Any]] = []  # every candidate measured: name, bits, bytes, KL, stderr, on the front
    knee: dict[str, Any] | None = None
    chosen: str | None = None  # the candidate shipped: the lowest measured KL within the budget
    seconds: dict[str, float] = {}  # per level: L2 (re-costing), L3 (the flips walk), frontier (fit + candidates)


def _settings(config: QuantizeConfig) -> dict[str, Any]:
    return {key: getattr(config, key) for key in ("selection", "select_units", "select_recost", "recost_blocks")}


def _choice(problem: Problem, assignment: dict[str, str]) -> np.ndarray:
    """The option index per unit of an assignment."""
    return np.array([problem.formats.index(assignment[members[0]]) for members in problem.units])


def stage_select(work: Path, config: QuantizeConfig, allocation: Allocation, model_dir: Path, rows: list[CostRow],
                 dtype: torch.dtype, device: str, blocks: torch.Tensor, calibration: torch.Tensor,
                 input_amax: dict[str, torch.Tensor]) -> Selection:
    """Run (or resume) the select stage on the allocation (see the module docstring); `blocks` are the selection
    split's, `calibration` the blocks L2 probes (the first `recost_blocks`), `input_amax` the ranges stage's static
    input ranges (the ones that ship)."""
    calibration = calibration[:config.recost_blocks]
    expect = {"allocation": hashlib.sha256((work / "allocation.json").read_bytes()).hexdigest()[:16],
              "settings": _settings(config), "text": fingerprint_tokens(blocks),
              "calibration": fingerprint_tokens(calibration), "dtype": str(dtype).removeprefix("torch."),
              "ranges": ranges_fingerprint(input_amax)}
    done = read_current(work / "selection.json", SELECTION, expect)
    if done is not None:
        return Selection.model_validate(done["selection"])
    if config.uniform or config.selection == "surrogate" or config.select_units == 0:
        result = Selection(mode="surrogate", assignment=allocation.assignment)
    else:
        result = _measured(work, config, allocation, model_dir, rows, dtype, device, blocks, calibration, expect,
                           input_amax)
    write_json(work / "selection.json", SELECTION, {**expect, "selection": result.model_dump()})
    for walk in work.glob("selection*.walk"):
        WalkState(walk, expect).clear()
    return result


def _recost(work: Path, config: QuantizeConfig, model_dir: Path, rows: list[CostRow], dtype: torch.dtype,
            device: str, calibration: torch.Tensor, start: dict[str, str], budget: int, expect: dict[str, Any],
            input_amax: dict[str, torch.Tensor]) -> tuple[Problem, FixedPoint]:
    """L2: the knapsack re-solved on costs measured with the current assignment installed, to a fixed point;
    returns the problem priced under the last assignment solved and the iterations."""
    problem = allocation_problem(config, model_dir, rows)
    walk_expect = {**expect, "model": fingerprint_model(model_dir), "device": resolve_device(device).type}
    priced: dict[str, Problem] = {}

    def step(assignment: dict[str, str]) -> dict[str, str]:
        key = assignment_fingerprint(assignment)
        state = WalkState(work / f"selection.recost-{key}.walk", walk_expect)
        remove_scratch(work)
        new_rows = run_everywhere(recost_walk, model_dir=model_dir, dtype=dtype, device=device,
                                  max_memory=config.max_memory_bytes, assignment=assignment,
                                  input_amax=ranges_for(input_amax, [assignment]), calibration=calibration,
                                  formats=problem.formats, state=state)
        priced[key] = allocation_problem(config, model_dir, new_rows)
        solved = solve(priced[key].cost, priced[key].size, budget, problem.params).choice
        return priced[key].assignment(solved)

    params = {r.linear: r.params for r in rows}
    result = fixed_point(start, step, params, RECOST_TOLERANCE, config.select_recost)
    last = result.assignments[-2] if len(result.assignments) > 1 else start
    return priced.get(assignment_fingerprint(last), problem), result


def _measured(work: Path, config: QuantizeConfig, allocation: Allocation, model_dir: Path, rows: list[CostRow],
              dtype: torch.dtype, device: str, blocks: torch.Tensor, calibration: torch.Tensor,
              expect: dict[str, Any], input_amax: dict[str, torch.Tensor]) -> Selection:
    """L2, then L3: measure the uncertain units' flips and re-solve the knapsack with the measured costs."""
    problem = allocation_problem(config, model_dir, rows)
    budget = allocation_budget(config, model_dir, problem)
    recost = None
    start = allocation.assignment
    clock = time.perf_counter()
    seconds: dict[str, float] = {}
    if config.select_recost:
        problem, recost = _recost(work, config, model_dir, rows, dtype, device, calibration, start, budget, expect,
                                  input_amax)
        start = recost.assignments[-1]
    choice = _choice(problem, start)
    rate = exchange_rate(problem, budget)
    picked = uncertain_units(problem, choice, rate, config.select_units)
    flips = flips_for(problem, choice, [p.unit for p in picked])
    if not flips:
        return Selection(mode="measured", assignment=start, recost=_recost_record(recost),
                         seconds={"L2": round(time.perf_counter() - clock, 1)})
    flip_assignments = [{**start, **dict.fromkeys(f.unit, f.format)} for f in flips]
    flip_ranges = ranges_for(input_amax, [start, *flip_assignments])
    logger.info("measuring %d flips of %d units end to end on %d selection blocks", len(flips), len(picked),
                len(blocks))
    state = WalkState(work / "selection.walk", {**expect, "model": fingerprint_model(model_dir),
                                                "device": resolve_device(device).type})
    streamed = {"model_dir": model_dir, "dtype": dtype, "device": device, "max_memory": config.max_memory_bytes}
    seconds["L2"], clock = round(time.perf_counter() - clock, 1), time.perf_counter()
    measured = run_everywhere(flips_walk, **streamed, base=start, flips=flips, blocks=blocks, input_amax=flip_ranges,
                              state=state)
    seconds["L3"], clock = round(time.perf_counter() - clock, 1), time.perf_counter()
    alpha = surrogate_scale(problem, choice, measured.flips)
    cost = measured_costs(problem, choice, measured.flips, alpha)
    candidates = _candidates(problem, cost, budget, allocation.assignment)
    results = run_everywhere(lanes_walk, **streamed, assignments=list(candidates.values()), blocks=blocks,
                             input_amax=ranges_for(input_amax, candidates.values()), state=state)
    seconds["frontier"] = round(time.perf_counter() - clock, 1)
    points = [MeasuredPoint(name, 8 * _size(problem, a) / problem.params, _size(problem, a), r.mean_kl,
                            float(r.kl.double().std()) / r.kl.numel() ** 0.5)
              for (name, a), r in zip(candidates.items(), results)]
    front = measured_front(points)
    loo = leave_one_out(np.array([points[i].bits for i in front]), np.array([points[i].mean_kl for i in front]))
    knee = front[int(loo["knee"])]
    best = best_within(points, budget)
    assert best is not None  # the knapsack's own mix fits
    predicted = [alpha * float(sum(problem.cost[u, k] for u, k in enumerate(_choice(problem, a))))
                 for a in candidates.values()]
    plot_measured(points, predicted, front, knee, work / MEASURED_PLOT)
    assignment = candidates[points[best].name]
    new_choice = _choice(problem, assignment)
    logger.info("measured frontier: %s; knee %.3f bits/param%s; shipping candidate %r (%.3f bits/param, KL %.5f)",
                ", ".join(f"{p.bits:.2f}:{p.mean_kl:.4f}" for p in points), points[knee].bits,
                "" if loo["stable"] else " (moves when a point is left out)", points[best].name, points[best].bits,
                points[best].mean_kl)
    knapsack = _choice(problem, allocation.assignment)
    changed = [{"unit": list(problem.units[u]), "from": problem.formats[knapsack[u]],
                "to": problem.formats[new_choice[u]]} for u in np.flatnonzero(new_choice != knapsack)]
    logger.info("selection changed %d of %d units (surrogate scale %.3g)", len(changed), len(problem.units), alpha)
    index = {tuple(members): u for u, members in enumerate(problem.units)}
    size = problem.size[np.arange(len(new_choice)), new_choice].sum()
    return Selection(
        mode="measured", assignment=assignment, bits_per_param=8 * float(size) / problem.params, seconds=seconds,
        base_kl=measured.base.to_json(), surrogate_scale=alpha, exchange_rate=rate,
        units=[{"unit": list(problem.units[p.unit]), "margin": p.margin, "predicted_cost": p.cost,
                "reason": p.reason} for p in picked], decision_units=len(problem.units),
        surrogate_error=surrogate_error(problem, choice, measured.flips, alpha) ** 0.5,
        flips=[{**_flip_record(problem, choice, index, m.flip, m.delta_kl, m.stderr, m.mean_kl), "estimate": float(e)}
               for m, e in zip(measured.flips, estimates(problem, choice, measured.flips, alpha))],
        changed=changed, recost=_recost_record(recost),
        frontier=[{**vars(p), "on_front": i in front, "predicted": predicted[i]} for i, p in enumerate(points)],
        knee={"name": points[knee].name, "bits": points[knee].bits, "stable": loo["stable"],
              "moved_to": [points[front[int(j)]].name for j in loo["moved_to"]]},  # type: ignore[union-attr]
        chosen=points[best].name)


def _size(problem: Problem, assignment: dict[str, str]) -> int:
    """Bytes of an assignment's allocated weights."""
    choice = _choice(problem, assignment)
    return int(problem.size[np.arange(len(choice)), choice].sum())


def _candidates(problem: Problem, cost: np.ndarray, budget: int, knapsack: dict[str, str]) -> dict[str, dict[str, str]]:
    """The validated frontier's candidates: the knapsack's solution on the estimated costs at the target budget and
    at each feasible rung of the ladder, and the surrogate knapsack's own mix; duplicates measured once."""
    smallest = prepare(cost, problem.size).min_size
    budgets = {"target": budget, **{f"{bits:g} bits": b for bits, b in
                                    zip(LADDER_BITS, budgets_from_bits(LADDER_BITS, problem.params)) if b >= smallest}}
    found: dict[str, dict[str, str]] = {}
    for name, size in budgets.items():
        assignment = problem.assignment(solve(cost, problem.size, size, problem.params).choice)
        if assignment not in found.values():
            found[name] = assignment
    if knapsack not in found.values():
        found["knapsack mix"] = knapsack
    return found


def _recost_record(recost: FixedPoint | None) -> dict[str, Any] | None:
    """The L2 iterations for selection.json: steps taken, weights changed per step, how it stopped."""
    if recost is None:
        return None
    return {"steps": len(recost.changed), "changed_share": recost.changed, "stopped": recost.stopped}


def _flip_record(problem: Problem, choice: np.ndarray, index: dict[tuple[str, ...], int], flip: Flip,
                 delta_kl: float, stderr: float, mean_kl: float) -> dict[str, Any]:
    """One measured flip for selection.json."""
    u, k = index[flip.unit], problem.formats.index(flip.format)
    return {"unit": list(flip.unit), "from": problem.formats[choice[u]], "to": flip.format,
            "bytes_delta": int(problem.size[u, k] - problem.size[u, choice[u]]),
            "predicted_delta": float(problem.cost[u, k] - problem.cost[u, choice[u]]),
            "measured_delta_kl": delta_kl, "stderr": stderr, "mean_kl": mean_kl}
