"""Symmetric integer weights in groups of 128 with bf16 scales (W4A16 / W8A16, activations untouched).

On disk (compressed-tensors `pack-quantized`): weight_packed int32 [out, in*b/32] (u = q + 2**(b-1), element k of a
word in bits b*k..), weight_scale [out, in/128] in the model dtype with s = amax_g / (2**b - 1) * 2, and
weight_shape int64 [2]. q = round(clamp(w / s, -2**(b-1), 2**(b-1)-1)), computed in the model dtype.
"""

from __future__ import annotations

from typing import Any

import torch

from prismq.formats.base import Format, Grid, Tensors, TensorSpec, group_absmax, weight_args
from prismq.formats.packing import pack_int32, unpack_int32

GROUP = 128


# Multipliers of the round-to-nearest scale tried by the scale sweep (shrinking clips the group maximum for finer
# steps); each product is rounded to the scale's dtype.
SWEEP_FACTORS = (1.0, 0.98, 0.96, 0.94, 0.92, 0.9, 0.88, 0.86, 0.84, 0.82, 0.8)


class IntegerGrid(Grid):
    """Integer levels in [qmin, qmax] under one scale per group of 128, in the weight dtype."""

    group_size = GROUP

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.qmin, self.qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1

    def fit(self, weight: torch.Tensor) -> torch.Tensor:
        half_range = torch.tensor((self.qmax - self.qmin) / 2, dtype=weight.dtype, device=weight.device)
        scale = group_absmax(weight, GROUP) / half_range
        return torch.where(scale == 0, torch.finfo(weight.dtype).eps, scale)

    def quantize(self, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return torch.round((weight / scale).clamp(self.qmin, self.qmax)).to(torch.int8)

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return codes.to(dtype) * scale.to(dtype)

    def pack(self, codes: torch.Tensor, scales: torch.Tensor) -> Tensors:
        return {"weight_packed": pack_int32(codes, self.bits), "weight_scale": scales}

    def candidates(self, scales: torch.Tensor) -> torch.Tensor:
        factors = torch.tensor(SWEEP_FACTORS, dtype=torch.float32, device=scales.device)
        return (scales.float() * factors.reshape(-1, *[1] * scales.ndim)).to(scales.dtype)


class IntegerGroup(Format):
    """INT4_W4A16 or INT8_W8A16: b-bit symmetric integers, group 128."""

    in_features_multiple = GROUP

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.name = f"INT{bits}_W{bits}A16"
        self.summary = f"INT{bits} symmetric weights, group {GROUP}, bf16 scales; bf16 activations"
        self.vllm_since = "0.13.0"  # present in every release checked (0.13.0 is the oldest)

    def tensor_specs(self, shape: tuple[int, int], dtype: torch.dtype = torch.bfloat16) -> dict[str, TensorSpec]:
        out, inp = shape
        return {"weight_packed": (torch.int32, (out, inp * self.bits // 32)),
                "weight_scale": (dtype, (out, inp // GROUP)),
                "weight_shape": (torch.int64, (2,))}

    def grid(self, weight: torch.Tensor, shared_amax: torch.Tensor | None = None) -> IntegerGrid:
        return IntegerGrid(self.bits)

    def extra_tensors(self, weight: torch.Tensor, input_amax: torch.Tensor | None, name: str) -> Tensors:
        return {"weight_shape": torch.tensor(tuple(weight.shape), dtype=torch.int64, device=weight.device)}

    def decode(self, tensors: Tensors, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        grid = IntegerGrid(self.bits)
        levels = unpack_int32(tensors["weight_packed"], self.bits)
        return grid.dequantize(levels, grid.expand(tensors["weight_scale"]), dtype)

    def scheme(self) -> dict[str, Any]:
        weights = weight_args(num_bits=self.bits, type="int", group_size=GROUP, strategy="group")
        return {"weights": weights, "input_activations": None, "format": "pack-quantized"}
