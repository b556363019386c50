"""GPTQ on a format's grid: round a Linear's weight column by column, pushing each column's rounding error onto the
columns not yet rounded so that the layer's output on calibration inputs, not the weight, stays close.

With H = X^T X (calibration inputs of the Linear, fp32) and U the upper Cholesky factor of H^-1, rounding column j
to q_j costs (w_j - q_j)^2 / U_jj^2 and the optimal update of the remaining columns is
W[:, j:] -= (w_j - q_j) / U_jj * U[j, j:] (Frantar et al., 2022). Columns are processed in blocks of
`block_size`; within a block the update is applied column by column, then once to everything after it. On a GPU
the column loop of a block is one kernel (`prismq.rounding.gptq_fused`, the same arithmetic).

Grid specifics, so the result is exactly what the codec ships:
- a group's scale is fixed when the group is first reached, from the weights as updated so far (with activation
  order, or groups wider than a block, the groups are fixed up front from the original weights: a group's columns
  then do not all lie in one block), optionally chosen by the scale sweep with GPTQ's own column costs 1 / U_jj^2;
- each column is cast to the model dtype and rounded by the grid's own quantize, and the codes are kept, so `pack`
  writes exactly the weight whose error was propagated.

Damping adds d * mean(diag H) to the diagonal. Each value in `damping` is tried (more, in steps of x10, while the
Cholesky factorization fails) and the result with the lowest output error tr(dW H dW^T) on the undamped H wins, with
round-to-nearest as a candidate too, so GPTQ never returns something worse than RTN on its own objective.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from prismq.formats.base import Grid, Tensors
from prismq.rounding.gptq_fused import fused_steps, gptq_block
from prismq.rounding.scale_sweep import sweep_scales

MAX_DAMPING = 10.0


@dataclass(frozen=True)
class GPTQSettings:
    """How GPTQ runs: column block width, activation order, damping values tried, the per-group scale sweep."""

    block_size: int = 128
    act_order: bool = True
    damping: tuple[float, ...] = (0.01,)
    sweep: bool = False


@dataclass
class Rounded:
    """One weight rounded on a grid: codes [out, in] and group scales as the grid stores them, the decoded weight,
    and its output error tr(dW H dW^T) on the calibration Hessian."""

    codes: torch.Tensor
    scales: torch.Tensor
    weight: torch.Tensor
    error: float
    method: str
    rtn_error: float  # the output error round-to-nearest has on the same Hessian, for comparison

    def pack(self, grid: Grid) -> Tensors:
        """The shipped tensors (weight part) of this rounding."""
        return grid.pack(self.codes, self.scales)


def output_error(weight: torch.Tensor, rounded: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr((W - Q) H (W - Q)^T): the summed squared output error of the Linear on the calibration inputs."""
    delta = weight.to(hessian.dtype) - rounded.to(hessian.dtype)
    return float(((delta @ hessian) * delta).sum())


def round_to_nearest(grid: Grid, weight: torch.Tensor, hessian: torch.Tensor | None = None) -> Rounded:
    """The codec's own encoding of weight, as a Rounded (error 0 when no Hessian is given)."""
    scales = grid.fit(weight)
    per_element = grid.expand(scales)
    codes = grid.quantize(weight, per_element)
    decoded = grid.dequantize(codes, per_element, weight.dtype)
    error = 0.0 if hessian is None else output_error(weight, decoded, hessian)
    return Rounded(codes, scales, decoded, error, "rtn", error)


def _inverse_cholesky(hessian: torch.Tensor, damping: float, order: torch.Tensor | None = None) -> torch.Tensor | None:
    """Upper Cholesky factor of (H + damping * mean(diag H) * I)^-1, with H's rows and columns taken in `order` when
    given, or None when H is not positive definite. The permuted H is never kept beside its damped copy."""
    damped = hessian.clone() if order is None else hessian[order.unsqueeze(1), order]
    damped.diagonal().add_(damping * float(damped.diagonal().mean()))
    factor, info = torch.linalg.cholesky_ex(damped)
    del damped  # each [in, in] intermediate is dropped as soon as the next exists: two alive at a time, not four
    if int(info):
        return None
    inverse = torch.cholesky_inverse(factor)
    del factor
    upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
    return None if int(info) else upper


def _gptq_pass(grid: Grid, weight: torch.Tensor, upper: torch.Tensor, order: torch.Tensor | None,
               settings: GPTQSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """One GPTQ run with the factor `upper` (of the permuted H when `order` is given): (codes, scales)."""
    dtype, (rows, columns), g = weight.dtype, weight.shape, grid.group_size
    work = weight.to(upper.dtype).clone(memory_format=torch.contiguous_format)  # row-major whatever weight's layout
    importance = upper.diagonal().square().reciprocal()  # GPTQ's cost per unit squared error, permuted order
    static = order is not None or settings.block_size % g != 0  # else every group lies inside one block
    if static:  # every group's scale fixed up front, from the original weights
        natural_importance = importance if order is None else importance[torch.argsort(order)]
        scales = _fit(grid, weight, natural_importance, settings.sweep)
        if order is not None:
            work = work[:, order]
    else:  # overwritten group by group as each is first reached
        scales = grid.fit(weight).clone()
    group_index = (order if order is not None else torch.arange(columns, device=weight.device)) // g
    group_of = group_index.tolist()  # plain ints: views, no sync
    rounded_inputs = torch.empty((rows, columns), dtype=dtype, device=weight.device)  # what each column rounded
    inverse_diagonal = upper.diagonal().reciprocal()  # the error is scaled by a product, as the fused kernel does
    fused = fused_steps(grid, scales, weight) if static and upper.dtype == torch.float32 else None
    groups = group_index.to(torch.int32)
    for start in range(0, columns, settings.block_size):
        end = min(start + settings.block_size, columns)
        block = work[:, start:end].clone(memory_format=torch.contiguous_format)
        block_upper = upper[start:end, start:end]
        errors = torch.empty_like(block)
        if fused is not None:
            gptq_block(block, block_upper, inverse_diagonal[start:end], fused, groups[start:end],
                       rounded_inputs[:, start:end], errors)
        else:
            refit = None if static else (importance[start:end], settings.sweep)
            _column_loop(grid, block, block_upper, inverse_diagonal[start:end], errors, rounded_inputs[:, start:end],
                         scales, group_of[start:end], refit)
        work[:, end:].addmm_(errors, upper[start:end, end:], alpha=-1)
    if order is not None:
        rounded_inputs = rounded_inputs[:, torch.argsort(order)]
    codes = grid.quantize(rounded_inputs, grid.expand(scales))  # elementwise: the codes each column's rounding chose
    return codes, scales


def _column_loop(grid: Grid, block: torch.Tensor, block_upper: torch.Tensor, inverse_diagonal: torch.Tensor,
                 errors: torch.Tensor, inputs: torch.Tensor, scales: torch.Tensor, group_of: list[int],
                 refit: tuple[torch.Tensor, bool] | None) -> None:
    """GPTQ's column loop over one block in torch (the reference of `gptq_block`, which documents the arguments).
    `refit`: the block's column importances and the sweep flag when each group's scale is fixed as the loop first
    reaches it (then from the weights as updated so far), None when the scales are fixed already."""
    g = grid.group_size
    for i in range(block.shape[1]):
        if refit is not None and i % g == 0:  # a group is first reached (groups lie inside blocks): fit its scale
            scales[:, group_of[i]] = _fit(grid, block[:, i:i + g].to(inputs.dtype), refit[0][i:i + g],
                                          refit[1]).squeeze(-1)
        current = inputs[:, i:i + 1]
        current.copy_(block[:, i:i + 1])  # cast to the weight dtype: the codec rounds what ships
        quantized = grid.round_values(current, scales[:, group_of[i]].unsqueeze(1))
        error = errors[:, i:i + 1]
        torch.sub(block[:, i:i + 1], quantized, out=error).mul_(inverse_diagonal[i])
        block[:, i:].sub_(error * block_upper[i:i + 1, i:])  # a product, then a difference: no fused multiply-add


def _fit(grid: Grid, weight: torch.Tensor, importance: torch.Tensor, sweep: bool) -> torch.Tensor:
    """Round-to-nearest scales of weight [out, k*g], improved by the scale sweep when asked."""
    scales = grid.fit(weight)
    return sweep_scales(grid, weight, importance, scales) if sweep else scales


def gptq(grid: Grid, weight: torch.Tensor, hessian: torch.Tensor, settings: GPTQSettings = GPTQSettings(),
         name: str = "weight") -> Rounded:
    """Round weight [out, in] (model dtype) on `grid` with GPTQ under H = X^T X [in, in]; falls back to
    round-to-nearest, with a warning, when no damping makes H positive definite. The updates are computed in fp32,
    or in fp64 when H is given in fp64."""
    return gptq_siblings(grid, {name: weight}, hessian, settings)[name]


Factors = dict[float, tuple[float, torch.Tensor | None]]  # damping asked -> (damping used, factor or None)


def gptq_siblings(grid: Grid, weights: dict[str, torch.Tensor], hessian: torch.Tensor,
                  settings: GPTQSettings = GPTQSettings(), factors: Factors | None = None) -> dict[str, Rounded]:
    """GPTQ of fused siblings (q/k/v, gate/up) in one pass: they share their input, hence H, and their grid (one
    joint amax), and GPTQ treats rows independently, so their stacked rows are rounded together (one column loop
    instead of one per sibling). Each sibling still gets its own choice between round-to-nearest and the damping
    values, on its own output error. A single weight is a group of one.

    `factors`: a cache of H's inverse Cholesky factors per damping, for several roundings of the same weights on
    the same H (other formats, with and without the scale sweep): each factorization is then computed once."""
    names = list(weights)
    weight = torch.cat(list(weights.values())) if len(weights) > 1 else weights[names[0]]
    label = "/".join(names)
    if hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"{label}: Hessian {tuple(hessian.shape)} does not match the weight {tuple(weight.shape)}")
    rows = [w.shape[0] for w in weights.values()]
    hessian = hessian.to(torch.float64 if hessian.dtype == torch.float64 else torch.float32)
    if not bool(torch.isfinite(hessian).all()):
        warnings.warn(f"{label}: the calibration Hessian has non-finite entries; rounding to nearest instead of GPTQ",
                      stacklevel=2)
        return {n: round_to_nearest(grid, w) for n, w in weights.items()}
    dead = hessian.diagonal() == 0  # inputs that were always zero: any value works, keep the problem regular
    if bool(dead.any()):
        hessian = hessian.clone()  # the caller's H stays as given; copied only when there is something to change
        hessian[dead, dead] = 1.0
    rtn = round_to_nearest(grid, weight)
    rtn_errors = _member_errors(weight, rtn.weight, hessian, rows)
    best = [("rtn", rtn.codes, rtn.scales, rtn.weight, error) for error in rtn_errors]
    order = torch.argsort(hessian.diagonal(), descending=True) if settings.act_order else None
    tried = 0
    factors = {} if factors is None else factors
    for asked in settings.damping:
        if asked not in factors:
            damping, upper = asked, _inverse_cholesky(hessian, asked, order)
            while upper is None and damping < MAX_DAMPING:
                damping *= 10
                upper = _inverse_cholesky(hessian, damping, order)
            factors[asked] = (damping, upper)
        damping, upper = factors[asked]
        if upper is None:
            continue
        tried += 1
        codes, scales = _gptq_pass(grid, weight, upper, order, settings)
        decoded = grid.dequantize(codes, grid.expand(scales), weight.dtype)
        for member, error in enumerate(_member_errors(weight, decoded, hessian, rows)):
            if error < best[member][4] or not math.isfinite(best[member][4]):
                best[member] = (f"gptq(damp={damping:g})", codes, scales, decoded, error)
    if not tried:
        warnings.warn(f"{label}: the calibration Hessian stays singular at damping {MAX_DAMPING:g}; "
                      "rounding to nearest instead of GPTQ", stacklevel=2)
    bounds = [sum(rows[:k]) for k in range(len(rows) + 1)]
    return {name: Rounded(*(t[bounds[k]:bounds[k + 1]] for t in (codes, scales, decoded)), error, method,
                          rtn_errors[k])
            for k, (name, (method, codes, scales, decoded, error)) in enumerate(zip(names, best))}


def _member_errors(weight: torch.Tensor, rounded: torch.Tensor, hessian: torch.Tensor, rows: list[int]) -> list[float]:
    """output_error of each sibling's block of rows of a stacked weight."""
    delta = weight.to(hessian.dtype) - rounded.to(hessian.dtype)
    per_row = ((delta @ hessian) * delta).sum(dim=1)
    return [float(part.sum()) for part in per_row.split(rows)]
