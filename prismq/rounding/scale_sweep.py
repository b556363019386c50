"""Closed-form per-group scale sweep: try a few scales around each group's round-to-nearest scale, keep the best.

For each group the format's grid proposes candidate scales (NVFP4: neighbouring E4M3 codes, so every candidate is a
scale the checkpoint can store; MX: the E8M0 exponent +-1; INT: the scale shrunk by up to 20 % in 2 % steps). Every
weight of the group is rounded to its nearest code under each candidate, and the candidate with the lowest
importance-weighted squared error sum_j a_j (w_j - q_j)^2 wins, where a_j is how much column j's error costs (the
calibration input energy E[x_j^2], or GPTQ's 1 / [H^-1]_jj). Candidate 0 is the incoming scale and ties keep it, so
the sweep only ever replaces a scale by one that measures strictly better on that objective (improve-or-keep).
"""

from __future__ import annotations

import torch

from prismq.formats.base import Grid


def sweep_scales(grid: Grid, weight: torch.Tensor, importance: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The best candidate scale per group for weight [out, k * g] (model dtype) given its incoming scales [out, k]
    and per-column importance [k * g] (or per-element [out, k * g]); same shape and dtype as `scales`."""
    candidates = grid.candidates(scales)  # [C, out, k]
    if len(candidates) == 1:
        return scales
    best, best_error = candidates[0], _group_error(grid, weight, importance, candidates[0])
    for candidate in candidates[1:]:  # one candidate at a time: memory of a few weights, not C of them
        error = _group_error(grid, weight, importance, candidate)
        better = error < best_error  # strictly: the first minimum wins, candidate 0 on ties
        best, best_error = torch.where(better, candidate, best), torch.where(better, error, best_error)
    return best


def _group_error(grid: Grid, weight: torch.Tensor, importance: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """sum over each group of importance * (w - round(w))^2 under `scales` [out, k] -> [out, k]."""
    rounded = grid.round(weight, scales)
    error = (weight.float() - rounded.float()).square_().mul_(importance.float())
    return error.unflatten(-1, (scales.shape[-1], -1)).sum(-1)
