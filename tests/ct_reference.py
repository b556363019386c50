"""Independent reference: what the compressed-tensors library itself writes for a weight under a preset scheme.

Uses CT's own calibration arithmetic (min/max per group in the weight dtype, `generate_gparam`,
`calculate_qparams`, as llmcompressor's memoryless min-max observer does) and CT's own compressor classes.
Nothing here calls prismq.
"""

from __future__ import annotations

import torch
from compressed_tensors.compressors.base import BaseCompressor
from compressed_tensors.quantization import preset_name_to_scheme
from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

# prismq format name -> (compressed-tensors preset, compressed-tensors format)
PRESETS = {
    "NVFP4": ("NVFP4", "nvfp4-pack-quantized"),
    "NVFP4A16": ("NVFP4A16", "nvfp4-pack-quantized"),
    "MXFP4": ("MXFP4", "mxfp4-pack-quantized"),
    "MXFP4A16": ("MXFP4A16", "mxfp4-pack-quantized"),
    "MXFP8": ("MXFP8", "mxfp8-quantized"),
    "MXFP8A16": ("MXFP8A16", "mxfp8-quantized"),
    "FP8": ("FP8_DYNAMIC", "float-quantized"),
    "INT8_W8A16": ("W8A16", "pack-quantized"),
    "INT4_W4A16": ("W4A16", "pack-quantized"),
}


def ct_scheme(format_name: str):
    """The CT QuantizationScheme of a prismq format name."""
    preset, _ = PRESETS[format_name]
    return preset_name_to_scheme(preset, ["Linear"])


def ct_encode(format_name: str, weight: torch.Tensor, shared_amax: torch.Tensor | None = None,
              input_amax: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """CT's compressed tensors for `weight` (suffix -> tensor)."""
    preset, ct_format = PRESETS[format_name]
    scheme = preset_name_to_scheme(preset, ["Linear"])
    args = scheme.weights
    if args.strategy in ("group", "tensor_group"):
        groups = weight.unflatten(-1, (weight.shape[-1] // args.group_size, args.group_size))
        min_vals, max_vals = groups.amin(dim=-1), groups.amax(dim=-1)
    else:  # channel
        min_vals, max_vals = weight.amin(dim=-1, keepdim=True), weight.amax(dim=-1, keepdim=True)
    state: dict[str, torch.Tensor] = {"weight": weight}
    global_scale = None
    if args.strategy == "tensor_group":
        if shared_amax is None:
            global_scale = generate_gparam(weight.amin(), weight.amax())
        else:
            global_scale = generate_gparam(-shared_amax.to(weight.dtype), shared_amax.to(weight.dtype))
        state["weight_global_scale"] = global_scale
    scale, zero_point = calculate_qparams(min_vals, max_vals, args, global_scale=global_scale)
    state["weight_scale"] = scale.to(weight.dtype)  # the module parameter is created in the weight dtype
    state["weight_zero_point"] = zero_point
    if scheme.input_activations is not None and args.strategy == "tensor_group":
        amax = input_amax.to(weight.dtype)
        state["input_global_scale"] = generate_gparam(-amax, amax)
    compressor = BaseCompressor.get_value_from_registry(ct_format)
    return dict(compressor.compress(state, scheme))


def ct_fake_quantize_activation(format_name: str, x: torch.Tensor,
                                input_global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """CT's forward-pass activation fake-quantization (dynamic scales) for a [batch, tokens, in] input."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    args = ct_scheme(format_name).input_activations
    scale, zero_point = compute_dynamic_scales_and_zp(x, args, module=None, global_scale=input_global_scale)
    return fake_quantize(x, scale, zero_point if args.strategy == "int" else None, args,
                         global_scale=input_global_scale)


def ct_decode(format_name: str, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The dense weight compressed-tensors' own decompression reconstructs from shipped tensors, in `dtype`."""
    preset, ct_format = PRESETS[format_name]
    scheme = preset_name_to_scheme(preset, ["Linear"])
    compressor = BaseCompressor.get_value_from_registry(ct_format)
    return compressor.decompress(dict(tensors), scheme)["weight"].to(dtype)
