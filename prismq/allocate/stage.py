"""The allocate stage: the cost rows and the budget in, WORK/allocation.json out.

One format per decision unit (the multiple-choice knapsack under the byte budget, or the --uniform format), the
predicted frontier over a sweep of budgets with its knee (frontier.json, frontier.png), and the uniform baselines
that fit the same budget (what the mix must beat when measured). The artifact is fingerprinted by the cost artifact
and the allocation settings: rerunning with the same ones reuses it, other ones solve again (it is cheap).
"""

from __future__ import annotations

import logging
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from prismq.allocate.budget import Problem, budget_bytes, build_problem
from prismq.artifacts import read_current, write_json
from prismq.config import QuantizeConfig
from prismq.errors import PrismqError
from prismq.formats import get_format
from prismq.measure.cost import CostRow
from prismq.model.checkpoint import SourceTensors, source_formats
from prismq.model.targets import model_targets
from prismq.model.units import model_units

logger = logging.getLogger(__name__)

ALLOCATION = "allocation"


class Allocation(BaseModel):
    """What the allocate stage decided: the assignment, how the budget was read, the predicted knee, and the
    uniform baselines {format: (assignment, bits per parameter)} that fit the same budget."""

    assignment: dict[str, str]
    budget: str
    knee_bits: float | None = None
    frontier_plot: str | None = None
    baselines: dict[str, tuple[dict[str, str], float]] = {}


def offered_formats(config: QuantizeConfig, model_dir: Path | None = None) -> tuple[list[str], list[str]]:
    """The formats offered to every unit (--formats and the formats keeping `model_dir`'s own bytes where it has
    some, or the --uniform format) and the fallbacks offered only where needed: BF16 (shapes no listed format
    takes, pinned routers) and --force formats not listed (their units only)."""
    listed = [config.uniform] if config.uniform else [*config.formats, *(source_formats(model_dir) if model_dir
                                                                           else [])]
    names = list(dict.fromkeys(get_format(f).name for f in listed))
    keeping = [f for f in [*names, *(rule.rpartition("=")[2] for rule in config.force)] if get_format(f).keeps_source]
    if keeping and model_dir is not None and get_format(keeping[0]).name not in source_formats(model_dir):
        raise PrismqError(f"{get_format(keeping[0]).name} keeps a block-FP8 checkpoint's own bytes (in 128 x 128 "
                          f"blocks); {model_dir} is not one")
    forced = [get_format(rule.rpartition("=")[2]).name for rule in config.force]
    fallback = [f for f in dict.fromkeys([*forced, "BF16"]) if f not in names]
    for name in [*names, *fallback]:
        if not get_format(name).exportable:
            raise PrismqError(f"{name} is a research format no runtime serves yet; it cannot be exported")
    return names, fallback


def _settings(config: QuantizeConfig) -> dict[str, Any]:
    """The settings an allocation depends on (besides the cost rows)."""
    return {key: getattr(config, key) for key in ("formats", "target_bits", "target_size", "uniform", "force")}


def _cost_fingerprint(work: Path) -> str:
    """A hash of the cost artifact the allocation was solved on."""
    return hashlib.sha256((work / "cost.json").read_bytes()).hexdigest()[:16]


def _in_model_order(allocation: Allocation, rows: list[CostRow]) -> Allocation:
    """The allocation with its assignments in the model's order (the cost rows'), as the stage made them: JSON
    stores them sorted by name, and fused siblings are grouped in the order they come (q, k, v: q leads)."""
    order = {row.linear: position for position, row in reversed(list(enumerate(rows)))}

    def ordered(assignment: dict[str, str]) -> dict[str, str]:
        return dict(sorted(assignment.items(), key=lambda item: (order.get(item[0], len(order)), item[0])))

    return allocation.model_copy(update={
        "assignment": ordered(allocation.assignment),
        "baselines": {name: (ordered(assignment), bits) for name, (assignment, bits) in allocation.baselines.items()}})


def stage_allocate(work: Path, config: QuantizeConfig, model_dir: Path, rows: list[CostRow]) -> Allocation:
    """Run (or resume) the allocation of the work directory's cost rows under `config`'s budget."""
    expect = {"cost": _cost_fingerprint(work), "settings": _settings(config)}
    done = read_current(work / "allocation.json", ALLOCATION, expect)
    if done is not None:
        return _in_model_order(Allocation.model_validate(done["allocation"]), rows)
    problem = allocation_problem(config, model_dir, rows)
    allocation = _uniform(config, problem) if config.uniform else _knapsack(config, problem, model_dir, work)
    write_json(work / "allocation.json", ALLOCATION, {**expect, "allocation": allocation.model_dump()})
    return allocation


def allocation_problem(config: QuantizeConfig, model_dir: Path, rows: list[CostRow]) -> Problem:
    """The knapsack's inputs: the model's decision units, the formats offered to each (pins and --force rules
    applied), their summed predicted costs and bytes."""
    formats, fallback = offered_formats(config, model_dir)
    units = model_units(model_dir)
    pins = [(re.compile(f"^{re.escape(m)}$"), u.pinned) for u in units if u.pinned for m in u.members]
    return build_problem(rows, [list(u.members) for u in units], formats, pins + config.force_rules(), fallback)


def allocation_budget(config: QuantizeConfig, model_dir: Path, problem: Problem) -> int:
    """Bytes the allocated weights may take under --target-bits or --target-size."""
    return budget_bytes(problem, config.target_bits, config.target_size, _other_bytes(model_dir, problem))


def _uniform(config: QuantizeConfig, problem: Problem) -> Allocation:
    """--uniform: the format everywhere it can take the shape (BF16 elsewhere); no frontier, no baselines."""
    target = get_format(config.uniform or "").name
    k, bf16 = problem.formats.index(target), problem.formats.index("BF16")
    finite = ~np.isinf(problem.cost)  # --force pins leave a unit a single finite option
    choice = np.where(finite[:, k], k, np.where(finite[:, bf16], bf16, np.argmin(problem.cost, axis=1)))
    return Allocation(assignment=problem.assignment(choice),
                      budget=f"uniform {target} (BF16 where it cannot take the shape)")


def _knapsack(config: QuantizeConfig, problem: Problem, model_dir: Path, work: Path) -> Allocation:
    """The knapsack under the budget, the predicted frontier and its knee, and the uniform baselines."""
    from prismq.allocate.knapsack import solve
    from prismq.allocate.pareto import budgets_from_bits, frontier_json, knee, plot_frontier, sweep

    budget = allocation_budget(config, model_dir, problem)
    label = (f"--target-bits {config.target_bits} -> {budget:,} bytes for the allocated Linears" if config.target_bits
             else f"--target-size {config.target_size} GB -> {budget:,} bytes for the allocated Linears")
    largest = int(np.where(np.isinf(problem.cost), 0, problem.size).max(axis=1).sum())
    if budget >= largest:
        logger.info("the budget (%s bytes) covers the largest format of every Linear: nothing to trade off",
                    f"{budget:,}")
        label += " (at or above the all-largest assignment)"
    allocation = solve(problem.cost, problem.size, budget, params=problem.params)
    points = sweep(problem.cost, problem.size, budgets_from_bits(np.arange(4.25, 8.51, 0.25), problem.params),
                   problem.params)
    knee_index = knee(points) if points else None
    uniform = {}
    for name in problem.formats:
        size = problem.bytes_of(name)
        if size is not None:
            k = problem.formats.index(name)
            uniform[name] = (8 * size / problem.params, float(problem.cost[:, k].sum()))
    plot = work / "frontier.png"
    if points:
        plot_frontier(points, knee_index, uniform, plot, f"predicted frontier ({problem.params:,} weights)")
        (work / "frontier.json").write_text(json.dumps(frontier_json(points, knee_index, problem.formats), indent=1)
                                            + "\n")
    return Allocation(assignment=problem.assignment(allocation.choice),
                      budget=label + f"; knapsack gap {allocation.gap:.3g}",
                      knee_bits=points[knee_index].bits_per_param if points and knee_index is not None else None,
                      frontier_plot=str(plot) if points else None,
                      baselines=_uniform_baselines(problem, budget, config))


def _other_bytes(model_dir: Path, problem: Problem) -> int:
    """Bytes of every source tensor that is not an allocated Linear's weight (they ship unchanged)."""
    from contextlib import ExitStack

    targets = model_targets(model_dir)
    allocated = {targets[n].key for members in problem.units for n in members}
    with ExitStack() as stack:
        source = SourceTensors(model_dir, stack)
        return sum(source.nbytes(key) for key in source.names() if key not in allocated)


def _uniform_baselines(problem: Problem, budget: int,
                       config: QuantizeConfig) -> dict[str, tuple[dict[str, str], float]]:
    """The uniform assignments (BF16 only where a shape needs it) of each listed format that fit in the same byte
    budget: what the mixed result must beat."""
    baselines = {}
    finite = ~np.isinf(problem.cost)
    for k, name in sorted(enumerate(problem.formats), key=lambda item: item[1]):  # the order JSON reads back
        if name not in [get_format(f).name for f in config.formats]:
            continue  # a fallback (BF16, a --force format) is not a baseline unless listed
        choice = np.where(finite[:, k], k, np.argmin(problem.cost, axis=1))
        size = int(problem.size[np.arange(len(choice)), choice].sum())
        if size <= budget:
            baselines[name] = (problem.assignment(choice), 8 * size / problem.params)
    return baselines
