"""FP8 W8A8 dynamic: E4M3 weights with one scale per output channel, E4M3 activations with one scale per token.

On disk (compressed-tensors `float-quantized`): weight e4m3 [out, in] and weight_scale [out, 1] in the model dtype,
s = amax_row / 448, divided and multiplied in the model dtype as compressed-tensors does.
"""

from __future__ import annotations

from typing import Any

import torch

from prismq.formats.base import Format, Grid, Tensors, TensorSpec, weight_args
from prismq.formats.elements import FP8_E4M3_MAX, round_to_e4m3


def row_scales(x: torch.Tensor) -> torch.Tensor:
    """amax / 448 over the last dimension, in x's dtype, keeping that dimension; zero rows get the dtype's eps."""
    scale = x.abs().amax(dim=-1, keepdim=True) / torch.tensor(FP8_E4M3_MAX, dtype=x.dtype, device=x.device)
    return torch.where(scale == 0, torch.finfo(x.dtype).eps, scale)


class ChannelGrid(Grid):
    """E4M3 values under one model-dtype scale per output row: a single group spanning the input columns."""

    def __init__(self, in_features: int) -> None:
        self.group_size = in_features

    def fit(self, weight: torch.Tensor) -> torch.Tensor:
        return row_scales(weight)

    def quantize(self, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        # + 0.0: compressed-tensors adds its all-zero zero-point here, which writes -0.0 as +0.0
        return round_to_e4m3(weight / scale + 0.0)

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return codes.to(dtype) * scale.to(dtype)

    def pack(self, codes: torch.Tensor, scales: torch.Tensor) -> Tensors:
        return {"weight": codes, "weight_scale": scales}


class FP8(Format):
    """FP8_DYNAMIC: per-channel weights, dynamic per-token activations."""

    name = "FP8"
    summary = "FP8 E4M3 weights (per-channel scale) and activations (dynamic per-token scale)"
    vllm_since = "0.13.0"  # present in every release checked (0.13.0 is the oldest)
    quantizes_activations = True

    def tensor_specs(self, shape: tuple[int, int], dtype: torch.dtype = torch.bfloat16) -> dict[str, TensorSpec]:
        out, inp = shape
        return {"weight": (torch.float8_e4m3fn, (out, inp)), "weight_scale": (dtype, (out, 1))}

    def grid(self, weight: torch.Tensor, shared_amax: torch.Tensor | None = None) -> ChannelGrid:
        return ChannelGrid(weight.shape[-1])

    def decode(self, tensors: Tensors, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return tensors["weight"].to(dtype) * tensors["weight_scale"].to(dtype)

    def qdq_activation(self, x: torch.Tensor, input_global_scale: torch.Tensor | None = None) -> torch.Tensor:
        scale = row_scales(x)
        return round_to_e4m3(x / scale).to(x.dtype) * scale

    def scheme(self) -> dict[str, Any]:
        weights = weight_args(num_bits=8, strategy="channel")
        activations = weight_args(num_bits=8, strategy="token", dynamic=True)
        return {"weights": weights, "input_activations": activations, "format": "float-quantized"}
