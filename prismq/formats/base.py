"""The codec contract every format implements: the one place weights turn into shipped bytes.

Cost, selection, polish and export all call these methods, so what is measured is exactly what ships.
A format encodes a Linear weight [out, in] (in the model's dtype) into the tensors written to the checkpoint,
keyed by their suffix (`weight_packed`, `weight_scale`, ...), and decodes them back exactly as
compressed-tensors does when transformers or vLLM load the checkpoint.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, Callable

import torch

from prismq.errors import PrismqError
from prismq.formats.fused import fused_nvfp4_qdq, fused_qdq

Tensors = dict[str, torch.Tensor]
TensorSpec = tuple[torch.dtype, tuple[int, ...]]
Rounding = Callable[["Grid", torch.Tensor, str], Tensors]  # (grid, weight, name) -> codes and scales by grid.pack
ROW_TENSORS = frozenset({"weight", "weight_packed", "weight_scale"})  # shipped tensors with one row per weight row
CHUNK_ELEMENTS = 1 << 21  # values per row-wise step of a large matrix (bounds the codecs' float temporaries)


class FormatError(PrismqError, ValueError):
    """A weight a format cannot take: wrong shape, non-finite values, a missing calibration input."""


def weight_args(**fields: Any) -> dict[str, Any]:
    """A compressed-tensors QuantizationArgs dict with the keys it always serialises, plus `fields`."""
    args: dict[str, Any] = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None,
                            "strategy": "tensor", "dynamic": False}
    args.update(fields)
    return args


class Format(ABC):
    """One quantization format: legality, exact bytes, encode/decode, fake-quantization, its config group."""

    name: str
    summary: str
    vllm_since: str | None = None  # first stock vLLM release that serves it; None: no runtime serves it yet
    quantizes_activations: bool = False
    needs_input_amax: bool = False  # a static input scale is shipped, calibrated from the input's absmax
    rounds_weights: bool = True  # its codes are chosen by a rounding method (RTN, GPTQ, the sweep); False: fixed
    keeps_source: bool = False  # ships the source checkpoint's own block-FP8 bytes (encode needs `block_scales`)

    @property
    def exportable(self) -> bool:
        """Whether the exporter may write it (a stock runtime serves it); research formats are cost-only."""
        return self.vllm_since is not None

    # --- shape and bytes -------------------------------------------------------------------------------------
    def illegal_reason(self, shape: tuple[int, ...]) -> str | None:
        """Why a weight of this shape cannot take the format, or None if it can."""
        if len(shape) != 2 or min(shape) < 1:
            return f"needs a 2-D weight [out, in], got shape {tuple(shape)}"
        multiple = self.in_features_multiple
        if shape[1] % multiple:
            return f"needs in_features divisible by {multiple}, got {shape[1]}"
        return None

    def legal(self, shape: tuple[int, ...]) -> bool:
        """True when `illegal_reason` has nothing to say."""
        return self.illegal_reason(shape) is None

    in_features_multiple: int = 1

    @abstractmethod
    def tensor_specs(self, shape: tuple[int, int], dtype: torch.dtype = torch.bfloat16) -> dict[str, TensorSpec]:
        """Suffix -> (dtype, shape) of every tensor written for a weight of `shape` in a model of `dtype`."""

    def nbytes(self, shape: tuple[int, int], dtype: torch.dtype = torch.bfloat16) -> int:
        """Exact bytes written for one weight: packed values, every scale and global scale."""
        return sum(math.prod(s) * d.itemsize for d, s in self.tensor_specs(shape, dtype).values())

    def bits_per_weight(self, shape: tuple[int, int], dtype: torch.dtype = torch.bfloat16) -> float:
        """8 * nbytes / number of weights: the honest bits per parameter."""
        return 8 * self.nbytes(shape, dtype) / (shape[0] * shape[1])

    # --- codec -----------------------------------------------------------------------------------------------
    def encode(self, weight: torch.Tensor, *, shared_amax: torch.Tensor | None = None,
               input_amax: torch.Tensor | None = None, name: str = "weight",
               rounding: Rounding | None = None, block_scales: torch.Tensor | None = None) -> Tensors:
        """The exact tensors that ship for `weight`, keyed by suffix.

        shared_amax: absolute maximum over all fused siblings (formats with a tensor-wide scale use it so that
        siblings share one global scale). input_amax: calibrated absolute maximum of the Linear's input (formats
        with a static input scale need it). name: used in error messages. rounding: how codes and scales are chosen
        on the format's grid (GPTQ, the scale sweep); default round-to-nearest. block_scales: the scales a block-FP8
        source stores for the weight (`keeps_source` formats ship them; the others ignore them).
        """
        self.check(weight, name)
        grid = self.grid(weight, shared_amax)
        packed = grid.encode(weight) if rounding is None else rounding(grid, weight, name)
        return {**packed, **self.extra_tensors(weight, input_amax, name)}

    def extra_tensors(self, weight: torch.Tensor, input_amax: torch.Tensor | None, name: str) -> Tensors:
        """Tensors shipped beside the weight's codes and scales (a static input scale, the weight shape)."""
        return {}

    @abstractmethod
    def decode(self, tensors: Tensors, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The dense weight a loader reconstructs from the shipped tensors, in `dtype`."""

    def decode_into(self, tensors: Tensors, out: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> None:
        """Write decode(tensors, dtype) into `out` [out, in] (cast to its dtype), a few rows at a time: the same
        values, without the full-size temporaries of decoding a large matrix at once. Every shipped tensor holds
        one row per weight row (ROW_TENSORS) or is shared by all rows (global and input scales, the shape)."""
        rows = chunk_rows(out.shape[-1])
        for start in range(0, out.shape[0], rows):
            part = {suffix: tensor[start:start + rows] if suffix in ROW_TENSORS else tensor
                    for suffix, tensor in tensors.items()}
            out[start:start + rows].copy_(self.decode(part, dtype))

    def grid(self, weight: torch.Tensor, shared_amax: torch.Tensor | None = None) -> Grid:
        """The scale-and-round structure `weight` is encoded on (see Grid); formats that round nothing have none."""
        raise FormatError(f"{self.name} does not round weights, so it has no quantization grid")

    def qdq(self, weight: torch.Tensor, *, shared_amax: torch.Tensor | None = None,
            name: str = "weight") -> torch.Tensor:
        """Fake-quantized weight, equal to decode(encode(weight)) in the weight's dtype.

        weight may also be a batch [B, out, in] of equal-shape Linears (shared_amax then [B]): the cost stage
        prices many Linears in one call; each matrix gets exactly what it would get alone."""
        self.check(weight, name, batched=True, values=False)
        # on a GPU one Triton kernel (NVFP4: two, its global scale too), the same bits (prismq.formats.fused)
        fused = fused_nvfp4_qdq(self, weight) if shared_amax is None else None
        if fused is None:
            grid = self.grid(weight, shared_amax)
            fused = fused_qdq(grid, weight)
        if fused is not None:
            rounded, non_finite = fused
            if non_finite:
                raise FormatError(f"{name}: non-finite value(s) (inf/nan) in the weight; cannot quantize")
            return rounded
        self.check(weight, name, batched=True)
        rows = max(1, chunk_rows(weight.shape[-1]) // (weight.shape[0] if weight.ndim == 3 else 1))
        return torch.cat([grid.round(part, grid.fit(part)) for part in weight.split(rows, dim=-2)], dim=-2)

    def qdq_activation(self, x: torch.Tensor, input_global_scale: torch.Tensor | None = None) -> torch.Tensor:
        """What the runtime does to a Linear's input [..., in]: identity unless the format quantizes it."""
        return x

    def input_scale(self, input_amax: torch.Tensor) -> torch.Tensor | None:
        """The static input scale shipped for a calibrated input range (elementwise over a batch of ranges), as
        `qdq_activation` takes it; None for formats without one."""
        return None

    def check(self, weight: torch.Tensor, name: str, batched: bool = False, values: bool = True) -> None:
        """Refuse, with the tensor's name, weights of an illegal shape or with non-finite values
        (`batched`: a [B, out, in] stack of weights is accepted too; `values` False: the shape alone, for a caller
        that checks the values on its own pass over them)."""
        if not weight.is_floating_point():
            raise FormatError(f"{name}: {self.name} needs a floating-point weight, got {weight.dtype}")
        shape = tuple(weight.shape[1:]) if batched and weight.ndim == 3 else tuple(weight.shape)
        reason = self.illegal_reason(shape)
        if reason:
            raise FormatError(f"{name}: {self.name} {reason}")
        if values and not bool(torch.isfinite(weight).all()):
            bad = int((~torch.isfinite(weight)).sum())
            raise FormatError(f"{name}: {bad} non-finite value(s) (inf/nan) in the weight; cannot quantize")

    # --- compressed-tensors config ---------------------------------------------------------------------------
    @abstractmethod
    def scheme(self) -> dict[str, Any] | None:
        """The compressed-tensors config group (without targets): weights, input_activations, format.
        None for formats written as plain weights (BF16 passthrough: the module goes in `ignore`)."""

    def __repr__(self) -> str:
        return f"<Format {self.name}>"


class Grid(ABC):
    """How one weight rounds under a format: each run of `group_size` consecutive input columns shares one scale,
    and each element becomes the code nearest to weight / scale.

    Round-to-nearest encoding is `pack(quantize(w, expand(fit(w))), fit(w))`; GPTQ and the scale sweep choose the
    scales and codes differently but hand them to the same `pack`, so every rounding ships codec bytes and
    decode(pack(codes, scales)) == dequantize(codes, expand(scales)) exactly. Scales are kept in the form the format
    stores them (E4M3 values as fp32, E8M0 exponents, model-dtype floats); `quantize`/`dequantize` are elementwise,
    taking one scale per element, so a caller may round a single column as well as a whole matrix. All arithmetic
    happens in the weight's dtype exactly where the loader's does.
    """

    group_size: int

    @abstractmethod
    def fit(self, weight: torch.Tensor) -> torch.Tensor:
        """Round-to-nearest scales for weight [..., n]: one per group, [..., n / group_size]."""

    @abstractmethod
    def quantize(self, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Codes of weight [..., n] under per-element scales (broadcast to its shape)."""

    @abstractmethod
    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The values the loader reconstructs from codes under per-element scales, in dtype."""

    @abstractmethod
    def pack(self, codes: torch.Tensor, scales: torch.Tensor) -> Tensors:
        """The shipped tensors (without input scales) of one weight's codes [out, in] and group scales."""

    def candidates(self, scales: torch.Tensor) -> torch.Tensor:
        """Scales worth trying for each group in place of `scales` (for the scale sweep): [C, *scales.shape],
        candidate 0 being `scales` itself. Default: no alternatives."""
        return scales.unsqueeze(0)

    def expand(self, scales: torch.Tensor) -> torch.Tensor:
        """Per-group scales [..., k] -> per-element scales [..., k * group_size]."""
        return scales.repeat_interleave(self.group_size, dim=-1)

    def round_values(self, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """dequantize(quantize(weight, scale)) bit for bit, in weight's dtype, with `scale` broadcast against weight
        (one column and its group scales, or groups and theirs). Formats override it with arithmetic on the values
        alone (no codes, no lookup table): GPTQ calls it once per column, activations once per Linear call."""
        return self.dequantize(self.quantize(weight, scale), scale, weight.dtype)

    def round(self, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """weight [..., n] rounded to the nearest codes under per-group `scales` [..., n / group_size], as decoded
        values in weight's dtype (no per-element scale tensor is built)."""
        groups = weight.unflatten(-1, (scales.shape[-1], self.group_size))
        return self.round_values(groups, scales.unsqueeze(-1)).flatten(-2)

    def encode(self, weight: torch.Tensor) -> Tensors:
        """Round-to-nearest: the shipped tensors of weight [out, in]. Every step is row by row, so it runs a few rows
        at a time: the same bytes, without the full-size float temporaries of a large matrix at once."""
        rows = chunk_rows(weight.shape[-1])
        scales = torch.cat([self.fit(part) for part in weight.split(rows)])
        codes = torch.cat([self.quantize(part, self.expand(part_scales))
                           for part, part_scales in zip(weight.split(rows), scales.split(rows))])
        return self.pack(codes, scales)


def chunk_rows(columns: int) -> int:
    """Rows of a [*, columns] matrix processed together by the row-wise codec steps (about CHUNK_ELEMENTS values)."""
    return max(1, CHUNK_ELEMENTS // max(columns, 1))


def group_absmax(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Absolute maximum of consecutive groups along the last dimension, in x's dtype: [..., n] -> [..., n/g]."""
    return x.unflatten(-1, (x.shape[-1] // group_size, group_size)).abs().amax(dim=-1)

