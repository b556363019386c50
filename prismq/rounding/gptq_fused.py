"""GPTQ's column loop within a block as one GPU kernel: round a column on the grid, push its error onto the block's
remaining columns, 128 times, without leaving the kernel.

In torch each column costs a dozen small kernel launches (cast, divide, round, multiply, subtract, the rank-1
update), so a 4096 x 14336 Linear spends seconds dispatching what is milliseconds of arithmetic. Here one program
holds a tile of rows of the block in registers and walks its columns; the update of the columns after the block
(a real matrix product) stays in torch. The reference is the torch loop in `prismq.rounding.gptq`, whose arithmetic
this repeats step for step (the column cast to the weight dtype, the grid's own division and rounding, the error
times 1 / U_jj, the update as a product then a difference: no fused multiply-add), so both give the same codes
bit for bit, which the GPU tests check.

Served where a group's scale is fixed before the loop (activation order, the default, or groups wider than a
block) on the grids the fused codecs serve: NVFP4, MXFP4 / MXFP8 and FP8 per channel, bf16 or fp32 weights on CUDA.
Anything else returns None and the torch loop runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from prismq.formats.fused import available

try:
    import triton
    import triton.language as tl

    from prismq.formats.fused import _as_dtype, _e2m1_round, _to_e4m3
except ImportError:  # pragma: no cover - machines without Triton
    triton = None

ROWS_PER_PROGRAM = 16  # rows of the block each program holds ([16, 128] fp32: 16 values per thread of 4 warps)


@dataclass(frozen=True)
class FusedSteps:
    """How the kernel rounds one grid: the step of every row and group (fp32: what a value is divided by and the
    rounded element multiplied by), the element (E2M1 or E4M3) and whether the quotient is first rounded to the
    weight dtype (MX and FP8 divide in the weight dtype; NVFP4 in fp32)."""

    steps: torch.Tensor
    fp4: bool
    dtype_division: bool


def fused_steps(grid: Any, scales: torch.Tensor, weight: torch.Tensor) -> FusedSteps | None:
    """The steps of `grid` under `scales` [rows, groups] for the kernel, exactly as `grid.round_values` derives them
    from a column's scales, or None when no kernel serves this grid and weight."""
    from prismq.formats.elements import E2M1, e8m0_scale
    from prismq.formats.fp8 import ChannelGrid
    from prismq.formats.mx import MXGrid
    from prismq.formats.nvfp4 import NVFP4Grid

    if not available(weight) or not scales.is_cuda:
        return None
    if isinstance(grid, NVFP4Grid) and grid.gs.numel() == 1:
        steps = scales.to(torch.float32) / grid.gs.to(weight.device)
        return FusedSteps(steps.contiguous(), fp4=True, dtype_division=False)
    if isinstance(grid, MXGrid) and grid.fmt.element in (None, E2M1):
        steps = e8m0_scale(scales, weight.dtype).to(torch.float32)
        return FusedSteps(steps.contiguous(), fp4=grid.fmt.element is E2M1, dtype_division=True)
    if isinstance(grid, ChannelGrid) and scales.dtype == weight.dtype:
        return FusedSteps(scales.to(torch.float32).contiguous(), fp4=False, dtype_division=True)
    return None


def gptq_block(block: torch.Tensor, upper: torch.Tensor, inverse_diagonal: torch.Tensor, steps: FusedSteps,
               groups: torch.Tensor, inputs: torch.Tensor, errors: torch.Tensor) -> None:
    """Run GPTQ's column loop over `block` [rows, width] (fp32, row-major; read, not written back) with the block's
    factor `upper` [width, width] (any strides: a Cholesky factor is often a transposed view) and
    `inverse_diagonal` [width] (1 / U_jj): each column's value cast to the weight dtype goes to `inputs`
    [rows, width] (a view into the weight-dtype matrix of what every column rounded), its scaled error to `errors`
    [rows, width] (fp32). `groups` [width] (int32): each column's group in `steps`."""
    rows, width = block.shape
    if block.stride(1) != 1 or inputs.stride(1) != 1 or errors.stride(1) != 1:
        raise ValueError("gptq_block needs row-major block, inputs and errors")
    _block_kernel[(triton.cdiv(rows, ROWS_PER_PROGRAM),)](
        block, upper, inverse_diagonal, steps.steps, groups, inputs, errors, rows, width,
        block.stride(0), upper.stride(0), upper.stride(1), steps.steps.stride(0), inputs.stride(0), errors.stride(0),
        FP4=steps.fp4, DTYPE_DIVISION=steps.dtype_division, IS_BF16=inputs.dtype == torch.bfloat16,
        ROWS=ROWS_PER_PROGRAM, WIDTH=triton.next_power_of_2(width), enable_fp_fusion=False)


if triton is not None:

    @triton.jit
    def _block_kernel(block_ptr, upper_ptr, inverse_ptr, steps_ptr, groups_ptr, inputs_ptr, errors_ptr, rows, width,
                      block_stride, upper_stride, upper_column_stride, steps_stride, inputs_stride, errors_stride,
                      FP4: tl.constexpr, DTYPE_DIVISION: tl.constexpr, IS_BF16: tl.constexpr,
                      ROWS: tl.constexpr, WIDTH: tl.constexpr):
        row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        column = tl.arange(0, WIDTH)
        in_rows = row < rows
        mask = in_rows[:, None] & (column < width)[None, :]
        w = tl.load(block_ptr + row[:, None] * block_stride + column[None, :], mask=mask, other=0.0)
        for i in range(width):
            # column i, exactly (its bits summed with zeros: -0.0 stays -0.0)
            bits = tl.sum(tl.where(column[None, :] == i, w.to(tl.int32, bitcast=True), 0), axis=1)
            value = _as_dtype(bits.to(tl.float32, bitcast=True), IS_BF16)  # cast to the weight dtype
            step = tl.load(steps_ptr + row * steps_stride + tl.load(groups_ptr + i), mask=in_rows, other=1.0)
            if DTYPE_DIVISION:
                scaled = _as_dtype(tl.math.div_rn(value, step), IS_BF16) + 0.0
            else:
                scaled = tl.math.div_rn(value, step)
            if FP4:
                element = _e2m1_round(scaled)
            else:
                element = _to_e4m3(scaled)
            rounded = _as_dtype(element * step, IS_BF16)
            error = (bits.to(tl.float32, bitcast=True) - rounded) * tl.load(inverse_ptr + i)
            tl.store(inputs_ptr + row * inputs_stride + i, value.to(inputs_ptr.dtype.element_ty), mask=in_rows)
            tl.store(errors_ptr + row * errors_stride + i, error, mask=in_rows)
            factor = tl.load(upper_ptr + i * upper_stride + column * upper_column_stride,
                             mask=(column >= i) & (column < width), other=0.0)
            w = w - error[:, None] * factor[None, :]
