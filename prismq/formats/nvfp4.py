"""NVFP4: E2M1 values in groups of 16 with an FP8 E4M3 group scale and one fp32 global scale per tensor.

On disk (compressed-tensors `nvfp4-pack-quantized`): weight_packed uint8 [out, in/2], weight_scale e4m3 [out, in/16],
weight_global_scale fp32 [1] stored as a divisor gs = 448*6/amax, and for W4A4 input_global_scale fp32 [1].
A value decodes as E2M1[code] * e4m3_scale / gs. Fused siblings share gs (computed from their joint amax).
"""

from __future__ import annotations

from typing import Any

import torch

from prismq.formats.base import Format, FormatError, Grid, Tensors, TensorSpec, group_absmax, weight_args
from prismq.formats.elements import E2M1, FP8_E4M3_MAX, round_to_e4m3
from prismq.formats.fused import fused_activation_qdq
from prismq.formats.packing import pack_nibbles, unpack_nibbles

GROUP = 16
_ZERO_SCALE_REPLACEMENT = 0.125  # compressed-tensors replaces an all-zero group's scale by this e4m3 value


def global_scale(amax: torch.Tensor) -> torch.Tensor:
    """fp32 divisor gs = 448*6/amax, computed in amax's dtype as compressed-tensors does; 1.0 when amax is 0.
    A scalar amax gives the shipped [1] tensor; a batch of amaxes [B] gives [B]."""
    amax = amax.clamp(min=torch.finfo(amax.dtype).tiny)
    scale = (FP8_E4M3_MAX * E2M1.max) / amax
    scale = torch.nan_to_num(scale, nan=1.0, posinf=1.0, neginf=1.0).to(torch.float32)
    return scale.reshape(1) if scale.ndim == 0 else scale


def group_scales(x: torch.Tensor, gs: torch.Tensor) -> torch.Tensor:
    """E4M3-snapped group scales (as fp32 values) for x [..., n]: e4m3(gs * (amax_g / 6)), zero -> 0.125."""
    local = group_absmax(x, GROUP) / torch.tensor(E2M1.max, dtype=x.dtype, device=x.device)
    snapped = round_to_e4m3(gs.to(x.device) * local).to(torch.float32)
    return torch.where(snapped == 0, _ZERO_SCALE_REPLACEMENT, snapped)


# E4M3 scale codes tried by the scale sweep, as steps from the round-to-nearest scale (one step ~ 1/16 to 1/8):
# mostly smaller scales (trading a clipped maximum for finer steps), two larger.
SWEEP_STEPS = (0, -1, -2, -3, -4, -5, -6, -7, -8, 1, 2)
_E4M3_MAX_CODE = 0x7E  # 448; 0x7F is NaN


class NVFP4Grid(Grid):
    """E2M1 codes under fp32 E4M3 group scales divided by one global scale gs ([1], or [B, 1, 1] for a batch)."""

    group_size = GROUP

    def __init__(self, gs: torch.Tensor) -> None:
        self.gs = gs

    def fit(self, weight: torch.Tensor) -> torch.Tensor:
        return group_scales(weight, self.gs)

    def quantize(self, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return E2M1.encode(weight / (scale / self.gs.to(weight.device)))

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return (E2M1.values(codes) * (scale.to(torch.float32) / self.gs.to(codes.device))).to(dtype)

    def round_values(self, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return _round_on_steps(weight, scale.to(torch.float32) / self.gs.to(weight.device))

    def round(self, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        step = scales.to(torch.float32) / self.gs.to(weight.device)  # a batch's gs [B, 1, 1] aligns with [B, out, k]
        return _round_on_steps(weight.unflatten(-1, (scales.shape[-1], GROUP)), step.unsqueeze(-1)).flatten(-2)

    def pack(self, codes: torch.Tensor, scales: torch.Tensor) -> Tensors:
        return {"weight_packed": pack_nibbles(codes), "weight_scale": scales.to(torch.float8_e4m3fn),
                "weight_global_scale": self.gs.to(codes.device)}

    def candidates(self, scales: torch.Tensor) -> torch.Tensor:
        code = scales.to(torch.float8_e4m3fn).view(torch.uint8).to(torch.int16)
        steps = torch.tensor(SWEEP_STEPS, dtype=torch.int16, device=scales.device).reshape(-1, *[1] * scales.ndim)
        shifted = (code + steps).clamp(1, _E4M3_MAX_CODE).to(torch.uint8)
        return shifted.view(torch.float8_e4m3fn).to(torch.float32)


def _round_on_steps(weight: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """weight rounded to E2M1 multiples of `step` (scale / gs, fp32, broadcast), in weight's dtype: quantize then
    dequantize bit for bit (division and product in fp32, as there)."""
    return E2M1.round(weight / step).mul_(step).to(weight.dtype)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, gs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """E2M1[code] * (scale / gs) for codes [..., n] and group scales [..., n/16], in dtype (as the loader does)."""
    grid = NVFP4Grid(gs)
    return grid.dequantize(codes, grid.expand(scales), dtype)


def qdq(x: torch.Tensor, gs: torch.Tensor) -> torch.Tensor:
    """x [..., n] rounded to the nearest NVFP4 values under global scale gs: what the runtime does to activations
    (on a GPU one fused kernel, the same bits)."""
    grid = NVFP4Grid(gs)
    fused = fused_activation_qdq(grid, x)
    return grid.round(x, grid.fit(x)) if fused is None else fused


class NVFP4(Format):
    """NVFP4 weights; W4A4 when `activations` is True (dynamic per-16 input scales under a static global scale)."""

    in_features_multiple = GROUP

    def __init__(self, activations: bool) -> None:
        self.quantizes_activations = activations
        self.needs_input_amax = activations
        self.name = "NVFP4" if activations else "NVFP4A16"
        self.summary = ("FP4 E2M1 weights and activations, group 16, E4M3 scales + fp32 global" if activations
                        else "FP4 E2M1 weights, group 16, E4M3 scales + fp32 global; bf16 activations")
        self.vllm_since = "0.13.0"

    def tensor_specs(self, shape: tuple[int, int], dtype: torch.dtype = torch.bfloat16) -> dict[str, TensorSpec]:
        out, inp = shape
        specs: dict[str, TensorSpec] = {
            "weight_packed": (torch.uint8, (out, inp // 2)),
            "weight_scale": (torch.float8_e4m3fn, (out, inp // GROUP)),
            "weight_global_scale": (torch.float32, (1,)),
        }
        if self.quantizes_activations:
            specs["input_global_scale"] = (torch.float32, (1,))
        return specs

    def grid(self, weight: torch.Tensor, shared_amax: torch.Tensor | None = None) -> NVFP4Grid:
        """gs from the joint amax of fused siblings when given (a batch [B, out, in] takes amaxes [B])."""
        if shared_amax is None:  # max(-min, max): one pass over the weight, no |weight| temporary
            low, high = weight.flatten(-2).aminmax(dim=-1)
            amax = torch.maximum(low.neg(), high)
        else:
            amax = shared_amax.to(weight.dtype)
        if weight.ndim == 2:
            return NVFP4Grid(global_scale(amax.reshape(())))
        return NVFP4Grid(global_scale(amax.reshape(-1)).reshape(-1, 1, 1))

    def extra_tensors(self, weight: torch.Tensor, input_amax: torch.Tensor | None, name: str) -> Tensors:
        if not self.needs_input_amax:
            return {}
        if input_amax is None:
            raise FormatError(f"{name}: {self.name} needs the calibrated input absmax (input_global_scale)")
        return {"input_global_scale": global_scale(input_amax.to(weight.dtype)).to(weight.device)}

    def input_scale(self, input_amax: torch.Tensor) -> torch.Tensor | None:
        """input_global_scale = 448 * 6 / amax, computed in amax's dtype as for the shipped tensor."""
        return global_scale(input_amax) if self.needs_input_amax else None

    def decode(self, tensors: Tensors, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        codes = unpack_nibbles(tensors["weight_packed"])
        return dequantize(codes, tensors["weight_scale"], tensors["weight_global_scale"], dtype)

    def qdq_activation(self, x: torch.Tensor, input_global_scale: torch.Tensor | None = None) -> torch.Tensor:
        if not self.quantizes_activations:
            return x
        if input_global_scale is None:
            raise FormatError(f"{self.name} activation quantization needs the calibrated input_global_scale")
        return qdq(x, input_global_scale)

    def scheme(self) -> dict[str, Any]:
        args = weight_args(num_bits=4, group_size=GROUP, strategy="tensor_group", scale_dtype="torch.float8_e4m3fn")
        activations = None
        if self.quantizes_activations:
            activations = {**args, "dynamic": "local", "observer": "static_minmax"}
        return {"weights": args, "input_activations": activations, "format": "nvfp4-pack-quantized"}
