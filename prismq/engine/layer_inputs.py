"""What each decoder layer receives besides its hidden states.

A model's forward computes, before its decoder loop, the arguments of every layer: rotary tables, attention masks,
and in hybrid models they differ by layer (sliding-window and full attention in Gemma 3/4 and GPT-OSS, linear and
full attention in Qwen3-Next and Qwen3.5, Gemma 4's per-layer input embeddings passed positionally).
`first_layer_inputs` runs the model's own forward with every decoder layer replaced by a stub that records what it
was called with, and returns per batch the first layer's hidden states and one keyword dict: layer 0's arguments
and, under PER_LAYER when later layers receive something else, each layer's own entries. Every caller passes that
same dict to whichever layer it runs; `per_layer_arguments` hooks a layer to take its own entries out of it.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

LayerInput = tuple[torch.Tensor, dict[str, Any]]
PER_LAYER = "_prismq_per_layer"  # kwargs key: per decoder layer, the arguments that differ from layer 0's


class _Stop(Exception):
    """Raised by the last layer's stub: the rest of the model's forward (final norm, head) is not needed."""


def _named_arguments(forward: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    """(hidden states, every other argument by name) of one call of a layer's `forward`."""
    bound = inspect.signature(forward).bind(*args, **kwargs)
    named: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = inspect.signature(forward).parameters[name].kind
        named.update(value if kind is inspect.Parameter.VAR_KEYWORD else {name: value})
    first = next(iter(inspect.signature(forward).parameters))
    return named.pop(first), named


@torch.no_grad()
def first_layer_inputs(model: nn.Module, layers: nn.ModuleList, blocks: torch.Tensor,
                       batch_size: int) -> list[LayerInput]:
    """(hidden states, keyword arguments) the first decoder layer of `layers` receives for each batch of `blocks`,
    the keyword arguments carrying what later layers receive differently (see the module docstring); from the
    model's own forward with stubs for the layers (which may be on the meta device)."""
    device = next(p for p in model.parameters() if p.device.type != "meta").device
    calls: list[tuple[torch.Tensor, dict[str, Any]]] = []

    def stub(index: int, forward: Any):
        def record(*args: Any, **kwargs: Any) -> torch.Tensor:
            hidden, named = _named_arguments(forward, args, kwargs)
            calls.append((hidden, named))
            if index == len(layers) - 1:
                raise _Stop
            return hidden
        return record

    captured: list[LayerInput] = []
    own_forward = [layer.__dict__.get("forward") for layer in layers]  # None: the class's
    for layer_index, layer in enumerate(layers):
        layer.forward = stub(layer_index, layer.forward)
    try:
        for batch in blocks.split(batch_size):
            calls.clear()
            try:
                model(batch.to(device), use_cache=False)
            except _Stop:
                pass
            hidden, first = calls[0]
            own = [{k: v for k, v in named.items() if k not in first or v is not first[k]} for _, named in calls]
            captured.append((hidden, {**first, PER_LAYER: own} if any(own) else first))
    finally:
        for layer, forward in zip(layers, own_forward):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward
    return captured


def per_layer_arguments(layer: nn.Module, index: int) -> RemovableHandle:
    """A pre-hook on decoder layer `index` replacing the PER_LAYER entry of its keyword arguments by that layer's
    own arguments."""
    def hook(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        own = kwargs.pop(PER_LAYER, None)
        return args, kwargs if own is None else {**kwargs, **own[index]}
    return layer.register_forward_pre_hook(hook, with_kwargs=True)
