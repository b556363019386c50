"""FP8_SOURCE: a natively block-FP8 checkpoint's own weights (DeepSeek V3, MiniMax M2), kept byte for byte.

Such a source stores each weight as E4M3 codes with one float32 scale per 128 x 128 block; prismq reads it
dequantized, `(codes * scale).to(model dtype)` (`prismq.model.checkpoint`). This format ships the codes and scales
the source stores: it costs 8 bits per weight plus 4 bytes per block and adds no weight error against that read.
The runtime quantizes the activations to E4M3 on the fly, one scale per token and 128 input columns, as it does for
the source itself.

On disk (compressed-tensors `float-quantized`, strategy `block`, as llm-compressor's FP8_BLOCK): `weight` E4M3
[out, in] and `weight_scale` float32 [out / 128, in / 128], the multiplier of its block (the source's
`weight_scale_inv`), held in float32 as vLLM holds them: a weight decodes to `codes.to(float32) * scale` cast to
the model dtype, exactly the values prismq reads the source as (compressed-tensors' own loader would round the
scales to the model dtype first; prismq's read-back keeps them in float32, `LayerStream`).
"""

from __future__ import annotations

from typing import Any

import torch

from prismq.formats.base import Format, FormatError, Rounding, Tensors, TensorSpec, weight_args
from prismq.formats.elements import FP8_E4M3_MAX, round_to_e4m3

BLOCK = 128  # rows and columns under one weight scale; columns under one activation scale


def block_expand(scales: torch.Tensor, shape: tuple[int, int], block: tuple[int, int] = (BLOCK, BLOCK),
                 offset: int = 0) -> torch.Tensor:
    """Per-block scales [rows / block[0], columns / block[1]] (rounded up) -> one per element of `shape` rows of the
    weight, the first of them `offset` rows into the first scale row's block (a partial last block takes its
    block's scale). Every block-FP8 weight is dequantized with it: the source read and FP8_SOURCE's decode."""
    per_row = scales.repeat_interleave(block[0], 0)[offset:offset + shape[0]]
    return per_row.repeat_interleave(block[1], 1)[:, :shape[1]]


def partial_rows_last(shapes: list[tuple[int, ...]]) -> bool:
    """Whether fused siblings (in the order vLLM stacks them) can keep their block-FP8 bytes as one layer: only
    the last may end on a partial block of rows (vLLM's check of merged block-FP8 layers, `validate_fp8_block_shape`:
    the others' rows must fill whole blocks so the stacked scales line up; a layer split over tensor-parallel ranks
    needs every part whole, which DeepSeek's replicated q_a / kv_a layer is not)."""
    return all(shape[0] % BLOCK == 0 for shape in shapes[:-1])


def keeps_stored(block: tuple[int, int] | None, shape: tuple[int, ...]) -> bool:
    """Whether a tensor a source stores in block FP8 (blocks of `block`) can ship as stored, FP8_SOURCE's bytes: a
    128 x 128 block and a shape FP8_SOURCE takes. The exporter writes such tensors the model does not load (an MTP
    layer) so; any other is written dequantized."""
    return block == (BLOCK, BLOCK) and FP8Source().legal(shape)


class FP8Source(Format):
    """The source's block-FP8 bytes for a weight stored so; no rounding of its own (see the module docstring)."""

    name = "FP8_SOURCE"
    summary = ("a block-FP8 source's own E4M3 weights and 128x128 block scales, byte for byte; activations E4M3 "
               "(dynamic, per token and 128 columns)")
    vllm_since = "0.13.0"  # compressed-tensors block FP8 for Linears and MoE since 0.11.0; 0.13.0: the oldest checked
    quantizes_activations = True
    rounds_weights = False
    keeps_source = True

    def illegal_reason(self, shape: tuple[int, ...]) -> str | None:
        """Any number of rows (a partial last block of rows is what DeepSeek's 576-row `kv_a_proj_with_mqa` stores,
        and vLLM's block-FP8 layers take it, last in a fusion: `partial_rows_last`); columns in whole blocks (the
        activations are quantized per 128 of them)."""
        if len(shape) != 2 or min(shape) < 1:
            return f"needs a 2-D weight [out, in], got shape {tuple(shape)}"
        if shape[1] % BLOCK:
            return f"needs in features divisible by {BLOCK}, got {list(shape)}"
        return None

    def tensor_specs(self, shape: tuple[int, int], dtype: torch.dtype = torch.bfloat16) -> dict[str, TensorSpec]:
        out, inp = shape
        return {"weight": (torch.float8_e4m3fn, (out, inp)),
                "weight_scale": (torch.float32, (-(-out // BLOCK), -(-inp // BLOCK)))}

    def encode(self, weight: torch.Tensor, *, shared_amax: torch.Tensor | None = None,
               input_amax: torch.Tensor | None = None, name: str = "weight", rounding: Rounding | None = None,
               block_scales: torch.Tensor | None = None) -> Tensors:
        """The source's codes and scales of `weight` (read dequantized from a block-FP8 source, `block_scales` its
        stored scales): each code is recovered exactly as weight / scale rounded to E4M3, and the result must
        decode back to `weight`, or the weight is not the source's."""
        self.check(weight, name)
        if block_scales is None:
            raise FormatError(f"{name}: {self.name} keeps a block-FP8 source's bytes, and this weight is not stored "
                              "in block FP8")
        scales = block_scales.float().to(weight.device)
        expected = self.tensor_specs(tuple(weight.shape))["weight_scale"][1]  # type: ignore[arg-type]
        if tuple(scales.shape) != expected:
            raise FormatError(f"{name}: block scales of shape {list(scales.shape)}, expected {list(expected)}")
        codes = round_to_e4m3(weight.float() / block_expand(scales, tuple(weight.shape)))  # type: ignore[arg-type]
        tensors = self.stored_tensors(codes, scales)
        if not torch.equal(self.decode(tensors, weight.dtype), weight):
            raise FormatError(f"{name}: the weight is not its block-FP8 source's (it does not decode back to "
                              "itself under the source's scales)")
        return tensors

    def stored_tensors(self, codes: torch.Tensor, block_scales: torch.Tensor) -> Tensors:
        """The shipped tensors of a weight the source stores as E4M3 `codes` under `block_scales`: those bytes, the
        scales as float32 (how the exporter writes a tensor the model does not load, e.g. an MTP head's, without
        reading it dequantized first)."""
        return {"weight": codes, "weight_scale": block_scales.float()}

    def decode(self, tensors: Tensors, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        codes, scales = tensors["weight"], tensors["weight_scale"]
        return (codes.float() * block_expand(scales.float(), tuple(codes.shape))).to(dtype)  # type: ignore[arg-type]

    def decode_into(self, tensors: Tensors, out: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> None:
        """decode(tensors, dtype) into `out` (cast to its dtype), BLOCK rows at a time (a scale row covers BLOCK
        weight rows)."""
        for block, start in enumerate(range(0, out.shape[0], BLOCK)):
            part = {"weight": tensors["weight"][start:start + BLOCK],
                    "weight_scale": tensors["weight_scale"][block:block + 1]}
            out[start:start + BLOCK].copy_(self.decode(part, dtype))

    def qdq(self, weight: torch.Tensor, *, shared_amax: torch.Tensor | None = None,
            name: str = "weight") -> torch.Tensor:
        """The weight itself: the source's bytes decode to exactly what was read from them."""
        self.check(weight, name, batched=True)
        return weight

    def qdq_activation(self, x: torch.Tensor, input_global_scale: torch.Tensor | None = None) -> torch.Tensor:
        groups = x.unflatten(-1, (x.shape[-1] // BLOCK, BLOCK))
        scale = groups.abs().amax(dim=-1, keepdim=True) / torch.tensor(FP8_E4M3_MAX, dtype=x.dtype, device=x.device)
        scale = torch.where(scale == 0, torch.finfo(x.dtype).eps, scale)
        return (round_to_e4m3(groups / scale).to(x.dtype) * scale).flatten(-2)

    def scheme(self) -> dict[str, Any]:
        weights = weight_args(num_bits=8, strategy="block", block_structure=[BLOCK, BLOCK])
        activations = weight_args(num_bits=8, strategy="group", group_size=BLOCK, dynamic=True)
        return {"weights": weights, "input_activations": activations, "format": "float-quantized"}
