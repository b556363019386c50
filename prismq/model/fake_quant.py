"""An in-memory model that computes what the exported checkpoint computes: decoded weights, and inputs
fake-quantized by the format where the runtime quantizes activations."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from prismq.formats import Tensors, get_format


def apply_fake_quant(model: nn.Module, assignment: dict[str, str], encoded: dict[str, Tensors],
                     weight_dtype: torch.dtype | None = None) -> list[RemovableHandle]:
    """Replace each assigned Linear's weight by decode(encoded[name]) and hook its input quantization, in place.

    `encoded` holds the exact tensors the exporter writes (input_global_scale included for NVFP4 W4A4), so the
    model's forward equals the exported checkpoint's. Weights are decoded in `weight_dtype` (the checkpoint's dtype,
    as a loader decodes them; None: the model's own dtype) and then cast to the model's compute dtype. Returns the
    hook handles (remove them to stop quantizing activations; the weights stay replaced)."""
    modules = dict(model.named_modules())
    handles = []
    for name, format_name in assignment.items():
        fmt, module = get_format(format_name), modules[name]
        if fmt.scheme() is None:
            continue
        tensors = encoded[name]
        with torch.no_grad():
            module.weight.copy_(fmt.decode(tensors, weight_dtype or module.weight.dtype))
        if fmt.quantizes_activations:
            igs = tensors.get("input_global_scale")

            def quantize_input(_module: nn.Module, args: tuple, fmt=fmt, igs=igs) -> tuple:
                return (fmt.qdq_activation(args[0], igs), *args[1:])

            handles.append(module.register_forward_pre_hook(quantize_input))
    return handles

