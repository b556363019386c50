"""Round a whole model the way it will run: decoder layer by decoder layer, each layer's Linears rounded against the
inputs produced by the already-rounded layers before it.

The calibration blocks are run up to the first decoder layer once and its inputs kept. Then for each layer: hooks
accumulate H = X^T X (fp32, over every calibration token) for the input each fused sibling group shares; each group
is encoded by GPTQ (optionally with the scale sweep; the siblings' rows stacked into one pass) through the codecs'
`encode`, so the tensors are exactly the shipped ones; the layer's weights are replaced by their decoded values and
its inputs quantized as the runtime does (NVFP4/MXFP4/FP8 activations); finally the layer is run again to produce
the next layer's inputs. Only one layer's Hessians exist at a time. Linears outside the decoder layers (rare:
lm_head is kept BF16) are rounded to nearest, with a warning.

`round_layer` is that per-layer step; the streamed walk (`prismq.rounding.lanes`) runs it on layers read from disk,
`round_model` on a model held in memory (scripts, tests).
"""

from __future__ import annotations

import warnings
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from safetensors.torch import load, save
from torch import nn
from tqdm import tqdm

from prismq.engine.distributed import Ranks
from prismq.engine.layer_inputs import LayerInput, first_layer_inputs, per_layer_arguments
from prismq.engine.stream import decoder_layers, run_layer
from prismq.errors import PrismqError
from prismq.export.encode import encode_group, encode_model, source_block_scales
from prismq.formats import Tensors, get_format
from prismq.formats.base import Grid
from prismq.model.checkpoint import SourceTensors
from prismq.model.fake_quant import apply_fake_quant
from prismq.model.siblings import sibling_groups
from prismq.model.experts import ExpertCall, ExpertCalls, parameters_of
from prismq.model.targets import Target, targets_named
from prismq.rounding.gptq import Factors, GPTQSettings, Rounded, gptq_siblings
from prismq.rounding.store import EncodedStore, PassingStore, variant_key

Method = Literal["rtn", "gptq", "gptq+sweep"]
METHODS: tuple[str, ...] = ("rtn", "gptq", "gptq+sweep")
EXPERT_HESSIAN_BYTES = 1 << 30  # routed experts' Hessians held at once while a layer is rounded


class _Stop(Exception):
    """Raised by a hook once a forward has produced everything it was run for (the rest is skipped)."""


@torch.no_grad()
def input_hessians(layer: nn.Module, modules: dict[str, nn.Linear],
                   inputs: list[LayerInput]) -> dict[str, torch.Tensor]:
    """H = sum_t x_t x_t^T (fp32) of each named Linear's input over every calibration token.

    Only the Linears' inputs are needed, so once the first batch shows each of them runs once per forward, later
    batches stop as soon as the last one has received its input (the rest of the layer, e.g. down_proj's product,
    is skipped; the sums are the same)."""
    hessians = {name: torch.zeros(m.in_features, m.in_features, dtype=torch.float32, device=m.weight.device)
                for name, m in modules.items()}
    calls = dict.fromkeys(modules, 0)
    seen: set[str] = set()
    stop_early = False

    def accumulate(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            hessians[name].addmm_(x.T, x)
            calls[name] += 1
            seen.add(name)
            if stop_early and len(seen) == len(modules):
                raise _Stop
        return hook

    handles = [m.register_forward_pre_hook(accumulate(name)) for name, m in modules.items()]
    device = next((p.device for p in layer.parameters()), None)
    try:
        for index, (hidden, kwargs) in enumerate(inputs):
            seen.clear()
            try:
                layer(hidden if device is None else hidden.to(device), **kwargs)  # spilled states come over
            except _Stop:
                pass
            if index == 0:
                stop_early = all(count == 1 for count in calls.values())
    finally:
        for handle in handles:
            handle.remove()
    return hessians


class _SiblingGPTQ:
    """The codec's rounding callback for one fused group: on the first call, GPTQ of every sibling at once (they
    share H and the grid, see gptq_siblings); each call returns that sibling's shipped tensors. `factors`: the
    group's cache of H's factorizations, shared by its roundings in other formats and methods."""

    def __init__(self, weights: dict[str, torch.Tensor], hessian: torch.Tensor, settings: GPTQSettings,
                 factors: Factors | None = None) -> None:
        self.weights, self.hessian, self.settings, self.factors = weights, hessian, settings, factors
        self.rounded: dict[str, Rounded] = {}

    def __call__(self, grid: Grid, weight: torch.Tensor, name: str) -> Tensors:
        if weight is not self.weights[name]:
            raise PrismqError(f"{name}: the codec handed GPTQ a weight other than the one stacked with its siblings")
        if not self.rounded:
            self.rounded = gptq_siblings(grid, self.weights, self.hessian, self.settings, self.factors)
        return self.rounded[name].pack(grid)


@dataclass
class RoundedModel:
    """The exact tensors to ship per Linear, and for each GPTQ-rounded Linear (method used, output error, output
    error of round-to-nearest on the same calibration inputs)."""

    encoded: dict[str, Tensors] | EncodedStore | PassingStore
    details: dict[str, tuple[str, float, float]] = field(default_factory=dict)

    def error_ratios(self) -> dict[str, float]:
        """Output error relative to round-to-nearest, per GPTQ-rounded Linear (1.0 where both are zero)."""
        return {name: (error / rtn if rtn > 0 else 1.0) for name, (_, error, rtn) in self.details.items()}


@torch.no_grad()
def expert_hessians(layer: nn.Module, modules: Mapping[str, nn.Module], targets: Mapping[str, Target],
                    inputs: list[LayerInput]) -> dict[str, torch.Tensor]:
    """H = sum_t x_t x_t^T (fp32) over the tokens routed to each named expert target's expert (gate and up share
    theirs: one product); zero for an expert no token reached."""
    slots = {(t.module, t.parameter_name, t.expert): name for name, t in targets.items()}
    hessians = {name: torch.zeros(t.shape[1], t.shape[1], dtype=torch.float32, device=inputs[0][0].device)
                for name, t in targets.items()}

    def accumulate(call: ExpertCall, x: torch.Tensor, _out: torch.Tensor) -> None:
        name = slots.get((call.module, call.parameter_name, call.expert))
        if name is not None:
            rows = x.detach().float()
            hessians[name].addmm_(rows.T, rows)

    handles = ExpertCalls(modules, parameters_of(slots), after=accumulate).attach()
    device = next((p.device for p in layer.parameters()), None)
    try:
        for hidden, kwargs in inputs:
            layer(hidden if device is None else hidden.to(device), **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return hessians


def _expert_chunks(groups: list[list[str]], known: Mapping[str, Target], budget: int) -> list[list[list[str]]]:
    """Expert groups in chunks whose Hessians fit in `budget` bytes together (at least one group per chunk)."""
    chunks: list[list[list[str]]] = [[]]
    used = 0
    for group in groups:
        size = 4 * known[group[0]].shape[1] ** 2
        if chunks[-1] and used + size > budget:
            chunks.append([])
            used = 0
        chunks[-1].append(group)
        used += size
    return [chunk for chunk in chunks if chunk]


@torch.no_grad()
def round_layer(layer: nn.Module, modules: dict[str, nn.Module], groups: list[list[str]], assignment: dict[str, str],
                method: Method, inputs: list[LayerInput], input_amax: dict[str, torch.Tensor],
                settings: GPTQSettings, weight_dtype: torch.dtype | None, result: RoundedModel,
                targets: Mapping[str, Target] | None = None, hessian_bytes: int = EXPERT_HESSIAN_BYTES,
                others: Mapping[str, Collection[tuple[str, Method]]] | None = None,
                source: SourceTensors | None = None,
                variant_details: dict[str, tuple[str, float, float]] | None = None,
                ranks: Ranks | None = None) -> dict[str, Tensors]:
    """Encode one decoder layer's sibling `groups` (named as in `modules`) with `method` on the layer's calibration
    `inputs`, add the tensors to ship to `result`, and leave the layer computing what the export computes.

    `others`: more (format, method) pairs to encode some of the groups' members in (name -> pairs; a group's
    members alike), on the same Hessians (and each H factorized once), for variants of this assignment; their
    tensors are returned, keyed by `variant_key(name, format, method)`, and not installed (their GPTQ details go
    to `variant_details` under the same keys, when given). `targets`: the model's targets (routed experts need
    them); `source`: the checkpoint, whose block-FP8 scales FP8_SOURCE ships. Every Hessian is taken on the layer as
    read (the layer is fake-quantized once all its groups are encoded); routed experts' Hessians, one per expert
    over its routed tokens, are taken a chunk of experts at a time, at most `hessian_bytes` of them at once.
    `ranks`: processes that all call this on the same layer and inputs (a divided walk), each encoding the groups
    dealt to it (by their index in `groups`: Hessians, GPTQ and variants alike), every rank then getting every
    group's tensors (`_share`); by default one process encodes them all."""
    ranks = ranks or Ranks()
    others = others or {}
    known = targets_named([name for group in groups for name in group], modules, targets)

    def pairs_of(group: list[str]) -> list[tuple[str, Method]]:
        """The group's own (format, method) first, then its variants' others."""
        own = (assignment[group[0]], method)
        return [own, *sorted(set(others.get(group[0], ())) - {own})]

    def routed_by_gptq(group: list[str]) -> bool:
        """Whether the group is a routed expert's that GPTQ rounds (on its own routed tokens' Hessian)."""
        return known[group[0]].expert is not None and any(m != "rtn" and get_format(f).rounds_weights
                                                          for f, m in pairs_of(group))

    # the order one process encodes the groups in (routed experts rounded by GPTQ last), for `_share`
    order = sorted(range(len(groups)), key=lambda number: (routed_by_gptq(groups[number]), number))
    places = {name: place for place, number in enumerate(order) for name in groups[number]}
    owners = ranks.deal([_cost(known, group, pairs_of(group)) for group in groups])
    groups = [g for g, owner in zip(groups, owners) if owner == ranks.rank]
    to_gptq = [g for g in groups if any(m != "rtn" and get_format(f).rounds_weights for f, m in pairs_of(g))]
    dense = [g for g in to_gptq if known[g[0]].expert is None]
    routed = [g for g in to_gptq if known[g[0]].expert is not None]
    hessians = input_hessians(layer, {g[0]: modules[known[g[0]].module] for g in dense}, inputs) if dense else {}
    layer_assignment: dict[str, str] = {}
    layer_encoded: dict[str, Tensors] = {}
    variants: dict[str, Tensors] = {}
    layer_details: dict[str, tuple[str, float, float]] = {}
    layer_variant_details: dict[str, tuple[str, float, float]] = {}

    def encode(group: list[str], hessian: torch.Tensor | None) -> None:
        weights = {name: known[name].weight(modules, weight_dtype) for name in group}
        factors: Factors = {}
        for number, (format_name, how) in enumerate(pairs_of(group)):
            rounding = None
            if hessian is not None and how != "rtn":
                rounding = _SiblingGPTQ(weights, hessian, replace(settings, sweep=how == "gptq+sweep"), factors)
            tensors = encode_group(format_name, weights, input_amax, rounding=rounding,
                                   block_scales=source_block_scales(format_name, {n: known[n] for n in group},
                                                                    source))
            details = {} if rounding is None else {n: (r.method, r.error, r.rtn_error)
                                                   for n, r in rounding.rounded.items()}
            if number:
                variants.update({variant_key(name, format_name, how): tensors[name] for name in group})
                layer_variant_details.update({variant_key(n, format_name, how): d for n, d in details.items()})
                continue
            layer_details.update(details)
            layer_assignment.update(dict.fromkeys(group, format_name))
            layer_encoded.update(tensors)

    for group in groups:
        if group not in routed:
            encode(group, hessians.pop(group[0], None))
    for chunk in _expert_chunks(routed, known, hessian_bytes):
        chunk_hessians = expert_hessians(layer, modules, {g[0]: known[g[0]] for g in chunk}, inputs)
        for group in chunk:
            encode(group, chunk_hessians.pop(group[0]))
    if ranks.world > 1:
        device = next((p.device for p in layer.parameters()), torch.device("cpu"))
        layer_assignment, layer_encoded, layer_details, variants, layer_variant_details = _share(
            ranks, places, device, (layer_assignment, layer_encoded, layer_details, variants, layer_variant_details))
    result.details.update(layer_details)
    if variant_details is not None:
        variant_details.update(layer_variant_details)
    apply_fake_quant(modules, layer_assignment, layer_encoded, weight_dtype, targets)
    result.encoded.update(layer_encoded)
    return variants


def _cost(known: Mapping[str, Target], group: list[str], pairs: list[tuple[str, Method]]) -> float:
    """A sibling group's rounding work, roughly: per GPTQ pass, H's factorization (in^3 / 3) and the column loop's
    updates (out x in^2 / 2) over the stacked siblings; rounding to nearest only, one pass over the weights."""
    columns = known[group[0]].shape[1]
    rows = sum(known[name].shape[0] for name in group)
    passes = sum(1 for f, m in pairs if m != "rtn" and get_format(f).rounds_weights)
    return passes * columns ** 2 * (columns / 3 + rows / 2) + len(pairs) * rows * columns


def _share(ranks: Ranks, places: dict[str, int], device: torch.device,
           parts: tuple[dict[str, Any], ...]) -> tuple[dict[str, Any], ...]:
    """Each of `parts` (a layer's results keyed by a target's name, or by a `variant_key` of it; tensors as
    name -> suffix -> tensor) merged over the ranks, in the order one process fills them (by the targets' `places`);
    other ranks' tensors arrive on `device`, bit for bit (sent as safetensors bytes: no tensor is pickled)."""
    plain = tuple({key: value for key, value in part.items() if not isinstance(value, dict)} for part in parts)
    layout = tuple({key: list(value) for key, value in part.items() if isinstance(value, dict)} for part in parts)
    flat = {f"{number}|{key}|{suffix}": tensor.detach().to("cpu", copy=True)  # its own storage, not a weight's
            for number, part in enumerate(parts) for key, value in part.items() if isinstance(value, dict)
            for suffix, tensor in value.items()}
    gathered = ranks.gather({ranks.rank: (plain, layout, save(flat) if flat else b"")})
    merged: list[dict[str, Any]] = [{} for _ in parts]
    for rank in range(ranks.world):
        if rank == ranks.rank:
            for entries, part in zip(merged, parts):
                entries.update(part)
            continue
        their_plain, their_layout, data = gathered[rank]
        tensors = load(data) if data else {}
        for number, entries in enumerate(merged):
            entries.update(their_plain[number])
            entries.update({key: {suffix: tensors[f"{number}|{key}|{suffix}"].to(device) for suffix in suffixes}
                            for key, suffixes in their_layout[number].items()})
    return tuple(dict(sorted(entries.items(), key=lambda item: places[item[0].split("|", 1)[0]]))
                 for entries in merged)


@torch.no_grad()
def round_model(model: nn.Module, assignment: dict[str, str], method: Method, calibration: torch.Tensor,
                input_amax: dict[str, torch.Tensor], settings: GPTQSettings | None = None, batch_size: int = 4,
                progress: bool = True, weight_dtype: torch.dtype | None = None,
                source: SourceTensors | None = None) -> RoundedModel:
    """Encode every Linear of `assignment` with `method` and leave `model` computing what the export computes
    (decoded weights, quantized activations); returns the exact tensors to ship, per Linear.

    weight_dtype: the checkpoint's dtype, in which the codecs see the weights (None: the model's own dtype); the
    model may compute in another (float32 on CPUs without native bf16). source: the checkpoint, whose block-FP8
    scales FP8_SOURCE ships."""
    if method not in METHODS:
        raise PrismqError(f"unknown rounding {method!r} (choose from {', '.join(METHODS)})")
    groups_to_round = [g for g in sibling_groups(assignment) if get_format(assignment[g[0]]).scheme() is not None]
    if method == "rtn" or not groups_to_round:  # nothing for GPTQ to do
        encoded = encode_model(model, assignment, input_amax, weight_dtype, source=source)
        apply_fake_quant(model, assignment, encoded, weight_dtype)
        return RoundedModel(encoded)
    settings = settings or GPTQSettings()
    modules = dict(model.named_modules())
    prefix, layers = decoder_layers(model)
    by_layer: dict[int, list[list[str]]] = {}
    outside: dict[str, str] = {}
    for group in groups_to_round:
        index = group[0][len(prefix) + 1:].split(".", 1)[0] if group[0].startswith(f"{prefix}.") else ""
        if index.isdigit():
            by_layer.setdefault(int(index), []).append(group)
        else:
            outside.update({name: assignment[name] for name in group})
    result = RoundedModel({})
    if outside:
        warnings.warn(f"{len(outside)} Linear(s) outside the decoder layers (e.g. {next(iter(outside))}) are rounded "
                      "to nearest, not by GPTQ", stacklevel=2)
    inputs = first_layer_inputs(model, layers, calibration, batch_size)
    hooks = [per_layer_arguments(layer, index) for index, layer in enumerate(layers)]
    try:
        for index, layer in enumerate(tqdm(layers, desc=f"round ({method})", unit="layer", disable=not progress)):
            if by_layer.get(index):
                round_layer(layer, modules, by_layer[index], assignment, method, inputs, input_amax, settings,
                            weight_dtype, result, source=source)
            inputs = run_layer(layer, inputs)
    finally:
        for hook in hooks:
            hook.remove()
    if outside:
        rest = encode_model(model, outside, input_amax, weight_dtype, source=source)
        apply_fake_quant(model, outside, rest, weight_dtype)
        result.encoded.update(rest)
    encoded = result.encoded
    passthrough = {n: f for n, f in assignment.items() if n not in encoded}
    encoded.update(encode_model(model, passthrough, input_amax, weight_dtype, source=source))
    return result
