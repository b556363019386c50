"""Symmetric integer weights in groups of 128 with bf16 scales (W4A16 / W8A16, activations untouched).

On disk (compressed-tensors `pack-quantized`): weight_packed int32 [out, in*b/32] (u = q + 2**(b-1), element k of a
word in bits b*k..), weight_scale [out, in/128] in the model dtype with s = amax_g / (2**b - 1) * 2, and
weight_shape int64 [2]. q = round(clamp(w / s, -2**(b-1), 2**(b-1)-1)), computed in the model dtype.
"""

from __future__ import annotations

from typing import Any

import torch

from prismq.formats.base import Format, Tensors, TensorSpec, group_absmax, grouped, weight_args
from prismq.formats.packing import pack_int32, unpack_int32

GROUP = 128


class IntegerGroup(Format):
    """INT4_W4A16 or INT8_W8A16: b-bit symmetric integers, group 128."""

    in_features_multiple = GROUP

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.name = f"INT{bits}_W{bits}A16"
        self.summary = f"INT{bits} symmetric weights, group {GROUP}, bf16 scales; bf16 activations"
        self.vllm_since = "0.13.0"  # present in every release checked (0.13.0 is the oldest)
        self.qmin, self.qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1

    def tensor_specs(self, shape: tuple[int, int], dtype: torch.dtype = torch.bfloat16) -> dict[str, TensorSpec]:
        out, inp = shape
        return {"weight_packed": (torch.int32, (out, inp * self.bits // 32)),
                "weight_scale": (dtype, (out, inp // GROUP)),
                "weight_shape": (torch.int64, (2,))}

    def quantize(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(integer levels as int8, group scales in the weight dtype)."""
        half_range = torch.tensor((self.qmax - self.qmin) / 2, dtype=weight.dtype, device=weight.device)
        scale = group_absmax(weight, GROUP) / half_range
        scale = torch.where(scale == 0, torch.finfo(weight.dtype).eps, scale)
        levels = torch.round((grouped(weight, GROUP) / scale.unsqueeze(-1)).clamp(self.qmin, self.qmax))
        return levels.flatten(-2).to(torch.int8), scale

    def dequantize(self, levels: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """levels * scale in dtype."""
        return (grouped(levels.to(dtype), GROUP) * scale.to(dtype).unsqueeze(-1)).flatten(-2)

    def _encode(self, weight: torch.Tensor, *, shared_amax: torch.Tensor | None,
                input_amax: torch.Tensor | None, name: str) -> Tensors:
        levels, scale = self.quantize(weight)
        return {"weight_packed": pack_int32(levels, self.bits), "weight_scale": scale,
                "weight_shape": torch.tensor(tuple(weight.shape), dtype=torch.int64, device=weight.device)}

    def decode(self, tensors: Tensors, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return self.dequantize(unpack_int32(tensors["weight_packed"], self.bits), tensors["weight_scale"], dtype)

    def qdq(self, weight: torch.Tensor, *, shared_amax: torch.Tensor | None = None,
            name: str = "weight") -> torch.Tensor:
        self.check(weight, name, batched=True)
        return self.dequantize(*self.quantize(weight), weight.dtype)

    def scheme(self) -> dict[str, Any]:
        weights = weight_args(num_bits=self.bits, type="int", group_size=GROUP, strategy="group")
        return {"weights": weights, "input_activations": None, "format": "pack-quantized"}
