"""The non-regressive polish: coordinate descent from the shipped mix, every move measured on the weights as they ship.

Each round: every alternative format of the `polish_units` decision units the surrogate is least sure of (small
decision margin, large predicted cost; `scout.uncertain_units`) is measured as a single flip of the current mix,
each flip rounded exactly as it would ship (`shipped.measure_variants`: same method, scale sweep, clipped ranges;
the rest of the model keeps its shipped tensors). Moves are built from those paired measurements: single flips that
fit the byte budget, and pairs of flips on two units (one usually paying for the other's bytes); a pair's expected
change is the sum of its flips' measured changes. The best few moves that fit and promise a lower KL are measured
whole (a single flip's KL is already measured), and the one with the lowest selection-split KL among those that
lower it significantly is kept: its paired change against the current mix, position by position, must be below zero
by more than `margin` standard errors (`--polish-margin`, 2 by default; with 0, any strictly lower KL). The next
round starts from there (its flips rounded on the new mix's hidden states); the polish stops after `polish_rounds`
rounds or when no move is kept. So the shipped KL on the selection split never goes up, and what is measured is
exactly what ships. Why a margin: with a few thousand selection positions a move's measured gain is often within its
noise, and such a move is as likely to raise the KL on other text as to lower it (measured on SmolLM2: moves of
0.3-0.7 % kept without a margin raised the report split's KL).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from prismq.allocate.budget import Problem
from prismq.measure.kl import KLResult
from prismq.select.measured import Flip, FlipMeasure, paired
from prismq.select.scout import exchange_rate, flips_for, uncertain_units

MOVES_MEASURED = 4  # pair moves measured whole per round, best expected first


@dataclass(frozen=True)
class Move:
    """One or two flips applied together, their byte change and the sum of their measured single changes."""

    flips: tuple[Flip, ...]
    bytes_delta: int
    expected: float

    def changes(self) -> dict[str, str]:
        """Target name -> its new format."""
        return {name: flip.format for flip in self.flips for name in flip.unit}


class Evaluator(Protocol):
    """Measures variants of the current mix on the selection split (the base's KL first), and moves the current mix
    when a move is kept."""

    def measure(self, step: str, variants: list[dict[str, str]]) -> list[KLResult]: ...

    def accept(self, changes: dict[str, str]) -> None: ...


@dataclass
class PolishLog:
    """Every round of the polish: flips measured, moves proposed and measured, the move kept (if any)."""

    rounds: list[dict[str, Any]] = field(default_factory=list)
    start_kl: float | None = None
    final_kl: float | None = None
    stopped: str = ""


def moves(problem: Problem, choice: np.ndarray, singles: list[FlipMeasure], budget: int) -> list[Move]:
    """Every single flip and every pair of flips on two different units that fits `budget` (bytes of the allocated
    weights) and whose measured changes sum below zero, best expected change first."""
    index = {tuple(members): u for u, members in enumerate(problem.units)}
    slack = budget - int(problem.size[np.arange(len(choice)), choice].sum())
    units = np.array([index[m.flip.unit] for m in singles])
    formats = np.array([problem.formats.index(m.flip.format) for m in singles])
    grow = (problem.size[units, formats] - problem.size[units, choice[units]]).astype(np.int64)
    delta = np.array([m.delta_kl for m in singles])
    found = [Move((m.flip,), int(grow[i]), float(delta[i])) for i, m in enumerate(singles)
             if grow[i] <= slack and delta[i] < 0]
    first, second = np.triu_indices(len(singles), k=1)
    keep = ((units[first] != units[second]) & (grow[first] + grow[second] <= slack)
            & (delta[first] + delta[second] < 0))
    found += [Move((singles[i].flip, singles[j].flip), int(grow[i] + grow[j]), float(delta[i] + delta[j]))
              for i, j in zip(first[keep], second[keep])]
    return sorted(found, key=lambda move: move.expected)


def polish(problem: Problem, assignment: dict[str, str], budget: int, unit_count: int, rounds: int,
           evaluator: Evaluator, margin: float = 0.0) -> tuple[dict[str, str], PolishLog]:
    """Coordinate descent from `assignment` (see the module docstring); returns the polished assignment and the log.
    The returned assignment's measured KL is never above the starting one's; a kept move lowered it by more than
    `margin` standard errors of its paired change."""
    log = PolishLog()
    rate = exchange_rate(problem, budget)
    for number in range(rounds):
        choice = np.array([problem.formats.index(assignment[members[0]]) for members in problem.units])
        picked = uncertain_units(problem, choice, rate, unit_count)
        flips = flips_for(problem, choice, [p.unit for p in picked])
        if not flips:
            log.stopped = "no unit has another format to try"
            break
        base, *flipped = evaluator.measure(f"round-{number}-flips", [_changes(f) for f in flips])
        log.start_kl = base.mean_kl if log.start_kl is None else log.start_kl
        log.final_kl = base.mean_kl
        singles = [paired(f, result, base) for f, result in zip(flips, flipped)]
        proposed = moves(problem, choice, singles, budget)
        pairs = [move for move in proposed if len(move.flips) > 1][:MOVES_MEASURED]
        measured_pairs = evaluator.measure(f"round-{number}-moves", [m.changes() for m in pairs])[1:] if pairs else []
        single = {s.flip: s for s in singles}  # a single flip is already measured
        tried = [(m, single[m.flips[0]]) for m in proposed if len(m.flips) == 1]
        tried += [(m, paired(m.flips[0], r, base)) for m, r in zip(pairs, measured_pairs)]  # (label: 1st flip)
        record = {"round": number, "base_kl": base.mean_kl,
                  "flips": [{"unit": list(s.flip.unit), "to": s.flip.format, "delta_kl": s.delta_kl,
                             "stderr": s.stderr} for s in singles],
                  "moves": [{"changes": m.changes(), "bytes_delta": m.bytes_delta, "expected": m.expected,
                             "mean_kl": r.mean_kl, "delta_kl": r.delta_kl, "stderr": r.stderr} for m, r in tried],
                  "kept": None}
        log.rounds.append(record)
        significant = [(m, r) for m, r in tried if r.mean_kl < base.mean_kl and r.delta_kl < -margin * r.stderr]
        if not significant:
            log.stopped = ("no move measured a lower KL within the budget" if margin == 0 else
                           f"no move measured a KL lower by more than {margin:g} standard errors within the budget")
            break
        best, best_measure = min(significant, key=lambda t: t[1].mean_kl)
        best_kl = best_measure.mean_kl
        record["kept"] = {"changes": best.changes(), "mean_kl": best_kl}
        assignment = {**assignment, **best.changes()}
        evaluator.accept(best.changes())
        log.final_kl = best_kl
    else:
        log.stopped = f"{rounds} round(s) done"
    return assignment, log


def _changes(flip: Flip) -> dict[str, str]:
    return dict.fromkeys(flip.unit, flip.format)
