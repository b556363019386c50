"""Fused GPU quantize-dequantize of weights: one Triton kernel per grid kind, bit for bit the torch codecs.

`Format.qdq` (round to nearest, then decode) is the inner loop of the cost stage, of GPTQ's scale fitting and of
every lane the selection measures. In torch it is a chain of elementwise passes over the weight (absmax, scale,
divide, round, multiply, cast), each a kernel launch and a trip through memory; here one kernel reads each group of
the weight once and writes its rounded values once. The torch code stays the reference and the CPU path: every
operation below repeats its arithmetic step for step (which intermediate is rounded to the weight's dtype, which
division is IEEE, where the E4M3 cast saturates), so the results are equal to the bit, which the tests check on hard
inputs. Served: NVFP4 (W4A4 and A16), MXFP4 / MXFP8 (and A16) and FP8 per channel, on bf16 or fp32 weights on a
CUDA device with Triton installed; anything else returns None and the caller takes the torch path.
"""

from __future__ import annotations

from typing import Any

import torch

try:  # Triton ships with CUDA builds of torch; CPU machines go without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without Triton
    triton = None

GROUPS_PER_PROGRAM = 128  # NVFP4 / MX groups each program rounds (a [128, group] tile; 64 and 256 were slower)
ROW_BLOCK, ROW_WARPS = 2048, 8  # FP8 per channel: columns a program visits per step of its row, its warps
AMAX_BLOCK = 16384  # NVFP4's global absmax: values each program reduces (8192: 10 % slower on an H200)


def available(weight: torch.Tensor) -> bool:
    """Whether a fused kernel can round `weight` (CUDA, Triton, bf16 or fp32, contiguous-able)."""
    return triton is not None and weight.is_cuda and weight.dtype in (torch.bfloat16, torch.float32)


def fused_qdq(grid: Any, weight: torch.Tensor, check_finite: bool = True) -> tuple[torch.Tensor, bool] | None:
    """`grid.round(weight, grid.fit(weight))` by one kernel when one serves this grid and weight, and whether the
    weight holds a non-finite value (found on the same pass; the rounded values are then meaningless); else
    None. `check_finite` False: no check and no wait for the GPU (activations: the runtime checks nothing)."""
    from prismq.formats.elements import E2M1
    from prismq.formats.fp8 import ChannelGrid
    from prismq.formats.mx import MXGrid
    from prismq.formats.nvfp4 import NVFP4Grid

    served = isinstance(grid, (NVFP4Grid, ChannelGrid)) or isinstance(grid, MXGrid) and grid.fmt.element in (None, E2M1)
    if not served or not available(weight) or weight.numel() == 0:
        return None
    x = weight.contiguous()
    out = torch.empty_like(x)
    flag = torch.zeros(1, dtype=torch.int32, device=x.device) if check_finite else out  # unused when not checking
    bf16 = x.dtype == torch.bfloat16
    if isinstance(grid, NVFP4Grid):
        groups = x.numel() // 16
        per_matrix = x.shape[-2] * x.shape[-1] // 16 if x.ndim == 3 else groups  # a batch: one gs per matrix
        gs = grid.gs.to(device=x.device, dtype=torch.float32).reshape(-1).contiguous()
        _nvfp4_kernel[(triton.cdiv(groups, GROUPS_PER_PROGRAM),)](x, out, flag, gs, groups, per_matrix,
                                                                  IS_BF16=bf16, FROM_AMAX=False,
                                                                  BLOCK=GROUPS_PER_PROGRAM, CHECK=check_finite)
    elif isinstance(grid, MXGrid):
        groups = x.numel() // 32
        _mx_kernel[(triton.cdiv(groups, GROUPS_PER_PROGRAM),)](x, out, flag, groups, IS_BF16=bf16,
                                                               FP4=grid.fmt.element is E2M1, BLOCK=GROUPS_PER_PROGRAM,
                                                               CHECK=check_finite)
    else:
        columns = x.shape[-1]
        _fp8_rows_kernel[(x.numel() // columns,)](x, out, flag, columns, IS_BF16=bf16, BLOCK=ROW_BLOCK,
                                                  CHECK=check_finite, num_warps=ROW_WARPS)
    return out, check_finite and bool(flag.item())


def fused_activation_qdq(grid: Any, x: torch.Tensor) -> torch.Tensor | None:
    """`grid.round(x, grid.fit(x))` of activations x [..., n] (groups along n) by one kernel, without the non-finite
    check (the runtime checks nothing) and so without waiting for the GPU; None where no kernel serves, or where
    x needs a gradient (the torch path then keeps the graph). NVFP4 with one global scale per leading index
    (gs [B, 1, ..., 1], x [B, ...]: the cost stage's and the clip search's batches) rounds each x[b] under gs[b];
    other layouts of several scales take the torch path."""
    if x.ndim == 0 or x.requires_grad:
        return None
    gs = getattr(grid, "gs", None)
    scales = 1 if gs is None else gs.numel()
    if scales == 1:
        flat = x.reshape(-1, x.shape[-1])
    elif x.ndim >= 2 and x.shape[0] == scales and gs.shape[0] == scales and gs.numel() == gs.shape[0]:
        flat = x.reshape(scales, -1, x.shape[-1])  # a batch of matrices: the kernel's one gs per matrix
    else:
        return None
    fused = fused_qdq(grid, flat, check_finite=False)
    return None if fused is None else fused[0].reshape(x.shape)


def fused_nvfp4_qdq(fmt: Any, weight: torch.Tensor) -> tuple[torch.Tensor, bool] | None:
    """NVFP4's `fused_qdq` with the global scale found on the GPU as well (no grid built first): one kernel finds
    each matrix's absmax (a batch [B, out, in]: one per matrix) and whether the weight holds a non-finite value
    (it reads every value anyway), the rounding kernel derives gs from it as `nvfp4.global_scale` does (in the
    weight dtype: 1 / amax, then times 448 * 6; non-finite -> 1). None when `fmt` is not NVFP4 or no kernel serves
    the weight."""
    from prismq.formats.nvfp4 import NVFP4

    if not isinstance(fmt, NVFP4) or not available(weight) or weight.numel() == 0:
        return None
    x = weight.contiguous()
    matrices = x.shape[0] if x.ndim == 3 else 1
    per_matrix = x.numel() // matrices
    # each matrix's absmax as float bits (ordered as ints when >= 0), then the non-finite flag: one zeroed buffer
    found = torch.zeros(matrices + 1, dtype=torch.int32, device=x.device)
    amax, flag = found[:matrices], found[matrices:]
    _absmax_kernel[(triton.cdiv(per_matrix, AMAX_BLOCK), matrices)](x, amax, flag, per_matrix, BLOCK=AMAX_BLOCK,
                                                                    num_warps=8)
    out = torch.empty_like(x)
    groups = x.numel() // 16
    _nvfp4_kernel[(triton.cdiv(groups, GROUPS_PER_PROGRAM),)](x, out, flag, amax, groups, per_matrix // 16,
                                                              IS_BF16=x.dtype == torch.bfloat16, FROM_AMAX=True,
                                                              BLOCK=GROUPS_PER_PROGRAM, CHECK=False)
    return out, bool(flag.item())


if triton is not None:

    @triton.jit
    def _as_dtype(value, IS_BF16: tl.constexpr):
        """fp32 -> the weight dtype and back: what storing an intermediate in the weight's dtype does."""
        if IS_BF16:
            return value.to(tl.bfloat16).to(tl.float32)
        return value

    @triton.jit
    def _e2m1_round(v):
        """E2M1.round: |v| clamped to 6, rounded to a multiple of its exponent's quantum 2**(E-1), ties to even,
        the sign of v (+0.0 for -0.0)."""
        magnitude = tl.minimum(tl.abs(v), 6.0)
        exponent = tl.maximum((magnitude.to(tl.int32, bitcast=True) >> 23) - 127, 0)
        inverse_quantum = ((128 - exponent) << 23).to(tl.float32, bitcast=True)
        quantum = ((126 + exponent) << 23).to(tl.float32, bitcast=True)
        # ties to even by adding and removing 2**23 (fp32 has no fraction bits left there); exact below 2**22
        rounded = ((magnitude * inverse_quantum + 8388608.0) - 8388608.0) * quantum
        sign = tl.where(v < 0, -2147483648, 0)  # a sign bit, not a negation: Triton's -x is 0 - x, which loses -0.0
        return (rounded.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)

    @triton.jit
    def _to_e4m3(v):
        """round_to_e4m3 as fp32 values: clamp to +-448, round to nearest even E4M3."""
        return tl.minimum(tl.maximum(v, -448.0), 448.0).to(tl.float8e4nv).to(tl.float32)

    @triton.jit
    def _flag_non_finite(flag_ptr, x):
        """Set the flag when x holds an inf or a nan (one atomic, from the programs that found one)."""
        bad = tl.max(tl.where(tl.abs(x) <= 3.4028234663852886e38, 0, 1))
        tl.atomic_max(flag_ptr, bad, mask=bad > 0)

    @triton.jit
    def _load_groups(x_ptr, flag_ptr, groups, GROUP: tl.constexpr, BLOCK: tl.constexpr, CHECK: tl.constexpr):
        """This program's BLOCK groups of GROUP consecutive values as a float32 [BLOCK, GROUP] tile, with their
        group indices, offsets and mask; with CHECK, the non-finite flag set when the tile holds an inf or a nan."""
        group = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        offsets = group[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
        mask = group[:, None] < groups
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        if CHECK:
            _flag_non_finite(flag_ptr, x)
        return group, offsets, mask, x

    @triton.jit
    def _absmax_kernel(x_ptr, amax_ptr, flag_ptr, per_matrix, BLOCK: tl.constexpr):
        """max |x| over BLOCK values of one matrix, into that matrix's slot (float bits, atomic max as ints), and
        the non-finite flag set when they hold an inf or a nan."""
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # the long axis first: grid x
        x = tl.load(x_ptr + tl.program_id(1).to(tl.int64) * per_matrix + offsets, mask=offsets < per_matrix,
                    other=0.0).to(tl.float32)
        _flag_non_finite(flag_ptr, x)
        tl.atomic_max(amax_ptr + tl.program_id(1), tl.max(tl.abs(x)).to(tl.int32, bitcast=True))

    @triton.jit
    def _global_scale(amax, IS_BF16: tl.constexpr):
        """nvfp4.global_scale in the weight dtype: amax at least the smallest normal, 1 / amax, times 448 * 6
        (torch's scalar / tensor is a reciprocal, then a product), a non-finite result replaced by 1."""
        inverse = _as_dtype(tl.math.div_rn(1.0, tl.maximum(amax, 1.1754943508222875e-38)), IS_BF16)
        gs = _as_dtype(inverse * 2688.0, IS_BF16)
        return tl.where(tl.abs(gs) <= 3.4028234663852886e38, gs, 1.0)

    @triton.jit
    def _nvfp4_kernel(x_ptr, out_ptr, flag_ptr, scale_ptr, groups, per_matrix, IS_BF16: tl.constexpr,
                      FROM_AMAX: tl.constexpr, BLOCK: tl.constexpr, CHECK: tl.constexpr):
        """NVFP4 qdq; `scale_ptr`: each matrix's global scale gs (fp32), or with FROM_AMAX its absmax's bits."""
        group, offsets, mask, x = _load_groups(x_ptr, flag_ptr, groups, 16, BLOCK, CHECK)
        if FROM_AMAX:
            amax = tl.load(scale_ptr + group // per_matrix, mask=group < groups, other=0).to(tl.float32, bitcast=True)
            gs = _global_scale(_as_dtype(amax, IS_BF16), IS_BF16)
        else:
            gs = tl.load(scale_ptr + group // per_matrix, mask=group < groups, other=1.0)
        local = _as_dtype(tl.math.div_rn(tl.max(tl.abs(x), axis=1), 6.0), IS_BF16)  # amax / 6 in the weight dtype
        scale = _to_e4m3(gs * local)
        scale = tl.where(scale == 0.0, 0.125, scale)
        step = tl.math.div_rn(scale, gs)[:, None]
        rounded = _e2m1_round(tl.math.div_rn(x, step)) * step
        tl.store(out_ptr + offsets, rounded.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _mx_kernel(x_ptr, out_ptr, flag_ptr, groups, IS_BF16: tl.constexpr, FP4: tl.constexpr,
                   BLOCK: tl.constexpr, CHECK: tl.constexpr):
        _, offsets, mask, x = _load_groups(x_ptr, flag_ptr, groups, 32, BLOCK, CHECK)
        amax = tl.max(tl.abs(x), axis=1)
        # round_to_power_of_two on the weight dtype's bits with E2M1's mantissa width, then the E8M0 exponent
        if IS_BF16:
            bits = (amax.to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF) + (1 << 5)
            biased = (bits >> 7) & 0x1FF
        else:
            bits = amax.to(tl.int32, bitcast=True) + (1 << 21)
            biased = (bits >> 23) & 0x1FF
        offset = 2 if FP4 else 8  # floor(log2(6)), floor(log2(448))
        exponent = tl.where(biased >= 255, 255, tl.minimum(tl.maximum(biased - offset, 0), 255))
        exponent = tl.where(biased == 0, 0, exponent)
        # 2**(e - 127) from its bits (e = 0: the subnormal 2**-127, whose bits are 1 << 22)
        step = tl.where(exponent == 0, 1 << 22, exponent << 23).to(tl.float32, bitcast=True)[:, None]
        scaled = _as_dtype(tl.math.div_rn(x, step), IS_BF16) + 0.0
        if FP4:
            values = _e2m1_round(scaled)
        else:
            values = _to_e4m3(scaled)
        tl.store(out_ptr + offsets, (values * step).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _fp8_rows_kernel(x_ptr, out_ptr, flag_ptr, columns, IS_BF16: tl.constexpr, BLOCK: tl.constexpr,
                         CHECK: tl.constexpr):
        row = x_ptr + tl.program_id(0).to(tl.int64) * columns
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(0, columns, BLOCK):
            column = start + tl.arange(0, BLOCK)
            x = tl.load(row + column, mask=column < columns, other=0.0).to(tl.float32)
            if CHECK:
                _flag_non_finite(flag_ptr, x)
            amax = tl.maximum(amax, tl.abs(x))
        scale = _as_dtype(tl.math.div_rn(tl.max(amax, axis=0), 448.0), IS_BF16)
        scale = tl.where(scale == 0.0, 0.0078125 if IS_BF16 else 1.1920928955078125e-07, scale)
        target = out_ptr + tl.program_id(0).to(tl.int64) * columns
        for start in range(0, columns, BLOCK):
            column = start + tl.arange(0, BLOCK)
            x = tl.load(row + column, mask=column < columns, other=0.0).to(tl.float32)
            codes = _to_e4m3(_as_dtype(tl.math.div_rn(x, scale), IS_BF16) + 0.0)
            tl.store(target + column, (codes * scale).to(target.dtype.element_ty), mask=column < columns)
