"""OCP microscaling formats: elements in groups of 32 sharing one E8M0 (power-of-two) scale.

On disk: MXFP4 `mxfp4-pack-quantized` (weight_packed uint8 [out, in/2]), MXFP8 `mxfp8-quantized` (weight e4m3
[out, in]), MXFP6 `mxfp6-pack-quantized` (weight_packed uint8 [out, 3*in/4]); all with weight_scale uint8
[out, in/32] holding biased exponents e (scale 2**(e-127)). Values are divided by the scale in the model dtype.
MXFP6 is research only: compressed-tensors can write E2M3 but no stock vLLM release serves MX6 yet.
"""

from __future__ import annotations

from typing import Any

import torch

from prismq.formats.base import Format, Grid, Tensors, TensorSpec, group_absmax, weight_args
from prismq.formats.elements import (
    E2M1, E2M3, E3M2, FP8_E4M3_MAX, MiniFloat, e8m0_exponent, e8m0_scale, round_to_e4m3,
)
from prismq.formats.fused import fused_activation_qdq
from prismq.formats.packing import pack_nibbles, pack_sextets, unpack_nibbles, unpack_sextets

GROUP = 32


class MX(Format):
    """An MX format over one element type (a MiniFloat, or None for FP8 E4M3)."""

    in_features_multiple = GROUP

    def __init__(self, name: str, element: MiniFloat | None, *, activations: bool, vllm_since: str | None,
                 summary: str) -> None:
        self.name = name
        self.element = element
        self.quantizes_activations = activations
        self.vllm_since = vllm_since
        self.summary = summary

    @property
    def element_bits(self) -> int:
        return 8 if self.element is None else self.element.bits

    @property
    def element_max(self) -> float:
        return FP8_E4M3_MAX if self.element is None else self.element.max

    @property
    def rounding_mantissa_bits(self) -> int:
        """Mantissa width used to round the group amax to a power of two (compressed-tensors: E2M1's for FP4 and
        FP8, E2M3's for FP6); our E3M2 uses its own."""
        if self.element is None or self.element is E2M1:
            return E2M1.man_bits
        return self.element.man_bits

    def tensor_specs(self, shape: tuple[int, int], dtype: torch.dtype = torch.bfloat16) -> dict[str, TensorSpec]:
        out, inp = shape
        if self.element is None:
            values: TensorSpec = (torch.float8_e4m3fn, (out, inp))
        else:
            values = (torch.uint8, (out, inp * self.element.bits // 8))
        return {"weight" if self.element is None else "weight_packed": values,
                "weight_scale": (torch.uint8, (out, inp // GROUP))}

    def grid(self, weight: torch.Tensor, shared_amax: torch.Tensor | None = None) -> MXGrid:
        return MXGrid(self)

    def decode(self, tensors: Tensors, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        grid = MXGrid(self)
        if self.element is None:
            codes = tensors["weight"]
        else:
            packed = tensors["weight_packed"]
            codes = unpack_nibbles(packed) if self.element.bits == 4 else unpack_sextets(packed)
        return grid.dequantize(codes, grid.expand(tensors["weight_scale"]), dtype)

    def qdq_activation(self, x: torch.Tensor, input_global_scale: torch.Tensor | None = None) -> torch.Tensor:
        if not self.quantizes_activations:
            return x
        grid = MXGrid(self)
        fused = fused_activation_qdq(grid, x)
        return grid.round(x, grid.fit(x)) if fused is None else fused

    def scheme(self) -> dict[str, Any]:
        args = weight_args(num_bits=self.element_bits, group_size=GROUP, strategy="group", scale_dtype="torch.uint8")
        activations = {**args, "dynamic": True} if self.quantizes_activations else None
        ct_format = {4: "mxfp4-pack-quantized", 6: "mxfp6-pack-quantized", 8: "mxfp8-quantized"}[self.element_bits]
        return {"weights": args, "input_activations": activations, "format": ct_format}


class MXGrid(Grid):
    """Element codes (E4M3 values for MXFP8) under E8M0 group exponents e, scale 2**(e-127) in the weight dtype."""

    group_size = GROUP

    def __init__(self, fmt: MX) -> None:
        self.fmt = fmt

    def fit(self, weight: torch.Tensor) -> torch.Tensor:
        return e8m0_exponent(group_absmax(weight, GROUP), self.fmt.element_max, self.fmt.rounding_mantissa_bits)

    def quantize(self, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        scaled = weight / e8m0_scale(scale, weight.dtype)
        if self.fmt.element is None:
            # + 0.0: compressed-tensors adds its all-zero zero-point here, which writes -0.0 as +0.0
            return round_to_e4m3(scaled + 0.0)
        return self.fmt.element.encode(scaled)

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        values = codes if self.fmt.element is None else self.fmt.element.values(codes)
        return values.to(dtype) * e8m0_scale(scale, dtype)

    def round_values(self, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        step = e8m0_scale(scale, weight.dtype)
        scaled = weight / step
        element = self.fmt.element
        values = round_to_e4m3(scaled + 0.0) if element is None else element.round(scaled)
        return values.to(weight.dtype).mul_(step)

    def pack(self, codes: torch.Tensor, scales: torch.Tensor) -> Tensors:
        element = self.fmt.element
        if element is None:
            return {"weight": codes, "weight_scale": scales}
        packed = pack_nibbles(codes) if element.bits == 4 else pack_sextets(codes)
        return {"weight_packed": packed, "weight_scale": scales}

    def candidates(self, scales: torch.Tensor) -> torch.Tensor:
        """The exponent itself, one lower (half the scale: finer steps, the maximum clipped) and one higher."""
        exponent = scales.to(torch.int16)
        return torch.stack([exponent, (exponent - 1).clamp(min=0), (exponent + 1).clamp(max=254)]).to(torch.uint8)


def mx_formats() -> list[MX]:
    """MXFP4 / MXFP4A16 / MXFP8 / MXFP8A16 (served) and MXFP6_E2M3 / MXFP6_E3M2 (research, weight-only)."""
    return [
        MX("MXFP4", E2M1, activations=True, vllm_since="0.22.0",
           summary="FP4 E2M1 weights and activations, group 32, E8M0 scales"),
        MX("MXFP4A16", E2M1, activations=False, vllm_since="0.14.0",
           summary="FP4 E2M1 weights, group 32, E8M0 scales; bf16 activations"),
        MX("MXFP6_E2M3", E2M3, activations=False, vllm_since=None,
           summary="research: FP6 E2M3 weights, group 32, E8M0 scales (cost only, no runtime serves it)"),
        MX("MXFP6_E3M2", E3M2, activations=False, vllm_since=None,
           summary="research: FP6 E3M2 weights, group 32, E8M0 scales (cost only, no runtime serves it)"),
        MX("MXFP8", None, activations=True, vllm_since="0.20.0",
           summary="FP8 E4M3 weights and activations, group 32, E8M0 scales"),
        MX("MXFP8A16", None, activations=False, vllm_since="0.20.0",
           summary="FP8 E4M3 weights, group 32, E8M0 scales; bf16 activations"),
    ]
