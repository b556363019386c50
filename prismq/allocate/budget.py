"""From measured costs to the knapsack's inputs: per decision unit and format, summed predicted delta-loss and real
bytes; budgets in bytes from --target-bits / --target-size; --force pins; the assignment back per Linear."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from prismq.errors import PrismqError
from prismq.formats import get_format
from prismq.measure.cost import CostRow


@dataclass(frozen=True)
class Problem:
    """The allocation problem: unit u in format k costs cost[u, k] (inf: not offered) and takes size[u, k] bytes."""

    units: list[list[str]]  # members of each unit, model order
    formats: list[str]
    cost: np.ndarray  # [U, K] float64
    size: np.ndarray  # [U, K] int64 (0 where not offered)
    params: int  # weights over all allocated Linears

    def assignment(self, choice: np.ndarray) -> dict[str, str]:
        """{Linear: format} for a choice of one format index per unit."""
        return {name: self.formats[k] for members, k in zip(self.units, choice.tolist()) for name in members}

    def bytes_of(self, format_name: str) -> int | None:
        """Bytes of the uniform assignment to `format_name`, or None where some unit cannot take it."""
        k = self.formats.index(format_name)
        return None if np.isinf(self.cost[:, k]).any() else int(self.size[:, k].sum())


def build_problem(rows: list[CostRow], units: list[list[str]], formats: list[str],
                  force: list[tuple[re.Pattern[str], str]] = (), fallback: list[str] = ()) -> Problem:
    """Sum the cost rows of each unit's members per format; formats not legal for every member are not offered, and
    --force rules (first match wins) leave only their format to the units they match. `fallback` formats (e.g. BF16
    when the user did not list it) are offered only to units no other format can take, or that a rule pins to them."""
    names = [get_format(f).name for f in [*formats, *fallback]]
    names = list(dict.fromkeys(names))
    extra = np.array([n not in {get_format(f).name for f in formats} for n in names])
    by_key = {(r.linear, r.format): r for r in rows}
    cost = np.full((len(units), len(names)), np.inf)
    size = np.zeros((len(units), len(names)), dtype=np.int64)
    for u, members in enumerate(units):
        for k, name in enumerate(names):
            found = [by_key.get((m, name)) for m in members]
            if all(found):
                cost[u, k] = sum(r.predicted_dloss for r in found)
                size[u, k] = sum(r.bytes for r in found)
        full = cost[u].copy()  # every legal option, before the fallback is withheld
        if (~np.isinf(full) & ~extra).any():
            cost[u, extra] = np.inf  # a listed format can take it: no fallback
        pinned = {next((f for pattern, f in force if pattern.search(m)), None) for m in members}
        if len(pinned) > 1:
            raise PrismqError(f"--force rules split the fused unit {', '.join(members)}: they must share one format")
        pin = pinned.pop()
        if pin is not None:
            pin = get_format(pin).name
            if pin not in names:
                raise PrismqError(f"--force {pin} ({members[0]}) is not among --formats {','.join(names)}")
            k = names.index(pin)
            if np.isinf(full[k]):
                raise PrismqError(f"--force {pin}: {members[0]} cannot take it (its shape is not legal for {pin}, or "
                                  f"{pin} keeps source bytes it does not have)")
            cost[u] = np.where(np.arange(len(names)) == k, full, np.inf)
    offered = ~np.isinf(cost)
    if not offered.any(axis=1).all():
        stuck = units[int(np.flatnonzero(~offered.any(axis=1))[0])]
        raise PrismqError(f"no format in {','.join(names)} can take {stuck[0]} (add BF16 to --formats)")
    for k, name in enumerate(names):
        if not offered[:, k].any() and not extra[k]:
            raise PrismqError(f"format {name} is legal for no Linear of this model")
    params_of = {r.linear: r.params for r in rows}
    params = sum(params_of[m] for members in units for m in members)
    return Problem(units, names, cost, size, params)


def budget_bytes(problem: Problem, target_bits: float | None, target_size_gb: float | None,
                 other_bytes: int) -> int:
    """Bytes the allocated Linears may take: target_bits * params / 8, or the whole-checkpoint target minus the
    bytes of everything that is not an allocated Linear (embeddings, norms, lm_head)."""
    if target_bits is not None:
        return int(target_bits * problem.params / 8)
    assert target_size_gb is not None
    budget = int(target_size_gb * 1e9) - other_bytes
    if budget <= 0:
        raise PrismqError(f"--target-size {target_size_gb} GB is below the {other_bytes / 1e9:.3f} GB the "
                          "non-quantized tensors (embeddings, norms, lm_head) take alone")
    return budget
