"""Sibling-coherent encoding: the members of a fused group share one weight amax and one input amax."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from prismq.formats import Tensors, get_format
from prismq.formats.base import Rounding
from prismq.model.checkpoint import SourceTensors
from prismq.model.siblings import sibling_groups
from prismq.model.targets import Target, targets_named


def encode_group(format_name: str, weights: dict[str, torch.Tensor], input_amax: dict[str, torch.Tensor],
                 rounding: Rounding | None = None,
                 block_scales: Mapping[str, torch.Tensor | None] | None = None) -> dict[str, Tensors]:
    """Encode fused siblings (or one lone Linear) in one format with their joint weight and input maxima;
    `rounding` (e.g. GPTQ) chooses the codes, round-to-nearest by default; `block_scales`: each weight's scales in
    a block-FP8 source (FP8_SOURCE ships them; `source_block_scales`)."""
    fmt = get_format(format_name)
    shared_amax = torch.stack([w.abs().amax() for w in weights.values()]).amax()
    known = [input_amax[n].reshape(()).float() for n in weights if n in input_amax]
    shared_input = torch.stack(known).amax() if len(known) == len(weights) else None
    scales = block_scales or {}
    return {name: fmt.encode(w, shared_amax=shared_amax, input_amax=shared_input, name=name, rounding=rounding,
                             block_scales=scales.get(name))
            for name, w in weights.items()}


def source_block_scales(format_name: str, targets: Mapping[str, Target],
                        source: SourceTensors | None) -> dict[str, torch.Tensor | None]:
    """The block scales a block-FP8 source stores for each of `targets`, when `format_name` ships them (empty
    otherwise, and without a source: such a format then refuses the weights)."""
    if source is None or not get_format(format_name).keeps_source:
        return {}
    return {name: source.block_scales(target.key) for name, target in targets.items()}


def encode_model(model: nn.Module | Mapping[str, nn.Module], assignment: dict[str, str],
                 input_amax: dict[str, torch.Tensor] | None = None, weight_dtype: torch.dtype | None = None,
                 known: Mapping[str, Target] | None = None,
                 source: SourceTensors | None = None) -> dict[str, Tensors]:
    """The exact tensors the exporter would write for every assigned target of an in-memory model, or of the
    modules by name of a streamed layer (`known`: the model's targets, which routed experts need; `source`: its
    checkpoint, whose block-FP8 scales FP8_SOURCE ships).

    weight_dtype: the checkpoint's dtype, which the codecs see whatever the model computes in (None: the model's own
    dtype); a model computing in float32 holds the checkpoint's bf16 values exactly, so the bytes are the same."""
    modules = dict(model.named_modules()) if isinstance(model, nn.Module) else model
    encoded: dict[str, Tensors] = {}
    for group in sibling_groups(assignment):
        targets = targets_named(group, modules, known)
        weights = {name: target.weight(modules, weight_dtype) for name, target in targets.items()}
        encoded.update(encode_group(assignment[group[0]], weights, input_amax or {},
                                    block_scales=source_block_scales(assignment[group[0]], targets, source)))
    return encoded
