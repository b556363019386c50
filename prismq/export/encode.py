"""Sibling-coherent encoding: the members of a fused group share one weight amax and one input amax."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from prismq.formats import Tensors, get_format
from prismq.formats.base import Rounding
from prismq.model.siblings import sibling_groups
from prismq.model.targets import Target, targets_named


def encode_group(format_name: str, weights: dict[str, torch.Tensor], input_amax: dict[str, torch.Tensor],
                 rounding: Rounding | None = None) -> dict[str, Tensors]:
    """Encode fused siblings (or one lone Linear) in one format with their joint weight and input maxima;
    `rounding` (e.g. GPTQ) chooses the codes, round-to-nearest by default."""
    fmt = get_format(format_name)
    shared_amax = torch.stack([w.abs().amax() for w in weights.values()]).amax()
    known = [input_amax[n].reshape(()).float() for n in weights if n in input_amax]
    shared_input = torch.stack(known).amax() if len(known) == len(weights) else None
    return {name: fmt.encode(w, shared_amax=shared_amax, input_amax=shared_input, name=name, rounding=rounding)
            for name, w in weights.items()}


def encode_model(model: nn.Module | Mapping[str, nn.Module], assignment: dict[str, str],
                 input_amax: dict[str, torch.Tensor] | None = None, weight_dtype: torch.dtype | None = None,
                 known: Mapping[str, Target] | None = None) -> dict[str, Tensors]:
    """The exact tensors the exporter would write for every assigned target of an in-memory model, or of the
    modules by name of a streamed layer (`known`: the model's targets, which routed experts need).

    weight_dtype: the checkpoint's dtype, which the codecs see whatever the model computes in (None: the model's own
    dtype); a model computing in float32 holds the checkpoint's bf16 values exactly, so the bytes are the same."""
    modules = dict(model.named_modules()) if isinstance(model, nn.Module) else model
    encoded: dict[str, Tensors] = {}
    for group in sibling_groups(assignment):
        targets = targets_named(group, modules, known)
        weights = {name: target.weight(modules, weight_dtype) for name, target in targets.items()}
        encoded.update(encode_group(assignment[group[0]], weights, input_amax or {}))
    return encoded
