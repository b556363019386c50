"""An in-memory model that computes what the exported checkpoint computes: decoded weights, and inputs
fake-quantized by the format where the runtime quantizes activations."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from prismq.formats import Format, Tensors, get_format
from prismq.model.siblings import sibling_groups
from prismq.model.experts import quantize_expert_inputs
from prismq.model.targets import Target, targets_named


class _SharedInput:
    """The quantized input of one fused sibling group (q/k/v, gate/up), computed once per forward: the siblings read
    the same input tensor under the same input scale, so the second and third quantizations would be repeats. Holds
    the tensors only until every sibling has read them."""

    def __init__(self, fmt: Format, input_global_scale: torch.Tensor | None, readers: int) -> None:
        self.fmt, self.input_global_scale, self.readers = fmt, input_global_scale, readers
        self.source: torch.Tensor | None = None
        self.quantized: torch.Tensor | None = None
        self.left = 0

    def __call__(self, _module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        if self.source is not x or self.quantized is None:  # a new forward (or a sibling was skipped last time)
            self.source, self.quantized = x, self.fmt.qdq_activation(x, self.input_global_scale)
            self.left = self.readers
        quantized = self.quantized
        self.left -= 1
        if self.left <= 0:
            self.source = self.quantized = None
        return (quantized, *args[1:])


def apply_fake_quant(model: nn.Module | Mapping[str, nn.Module], assignment: dict[str, str],
                     encoded: Mapping[str, Tensors], weight_dtype: torch.dtype | None = None,
                     targets: Mapping[str, Target] | None = None) -> list[RemovableHandle]:
    """Replace each assigned target's weight by decode(encoded[name]) and quantize its input as the runtime does,
    in place; `model` is a model or its modules by name (a streamed layer's), `targets` the model's targets (routed
    experts need them; Linears are found by name without).

    `encoded` holds the exact tensors the exporter writes (input_global_scale included for NVFP4 W4A4), so the
    model's forward equals the exported checkpoint's. Weights are decoded in `weight_dtype` (the checkpoint's dtype,
    as a loader decodes them; None: the model's own dtype) and then cast to the model's compute dtype. Returns the
    hook handles (remove them to stop quantizing activations; the weights stay replaced). Call it once per layer:
    each call adds its own hooks."""
    modules = dict(model.named_modules()) if isinstance(model, nn.Module) else model
    handles = []
    experts: dict[tuple[str, str, int], tuple[Format, torch.Tensor | None]] = {}  # expert slice -> its input's
    for group in sibling_groups(assignment):
        hooks: dict[str, tuple[nn.Module, Format, torch.Tensor | None, tuple[str, bytes]]] = {}
        for name, target in targets_named(group, modules, targets).items():
            fmt = get_format(assignment[name])
            if fmt.scheme() is None:
                continue
            tensors = encoded[name]
            parameter = target.parameter(modules)
            with torch.no_grad():
                fmt.decode_into(tensors, parameter, weight_dtype or parameter.dtype)
            if not fmt.quantizes_activations:
                continue
            igs = tensors.get("input_global_scale")
            if target.expert is not None:
                experts[(target.module, target.parameter_name, target.expert)] = (fmt, igs)
            else:
                key = (fmt.name, b"" if igs is None else igs.detach().cpu().numpy().tobytes())
                hooks[name] = (modules[target.module], fmt, igs, key)
        shared: dict[tuple[str, bytes], _SharedInput] = {}  # siblings with one format and input scale share
        for name, (module, fmt, igs, key) in hooks.items():
            if key not in shared:
                shared[key] = _SharedInput(fmt, igs, readers=sum(1 for *_, k in hooks.values() if k == key))
            handles.append(module.register_forward_pre_hook(shared[key]))
    return handles + quantize_expert_inputs(modules, experts)
