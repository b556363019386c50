"""Activation clipping for static input scales (NVFP4 W4A4's input_global_scale).

The runtime quantizes a W4A4 Linear's input in groups of 16 with dynamic E4M3 group scales under one static global
scale gs = 448 * 6 / c, calibrated here. c = the input's absolute maximum loses nothing to clipping, but one outlier
token then sets the range every token's group scales are expressed in; a smaller c clips the rare values above it.
The clip value is chosen from calibration data, per input (fused siblings see the same input, so they get the same
value and stay coherent):

- candidates: the maximum over all calibration tokens of |x|, and the q-quantiles over tokens of each token's own
  maximum |x| for q in CLIP_QUANTILES (so c = the 0.999 quantile clips at most 0.1 % of the tokens);
- each candidate quantizes every calibration input exactly as the runtime would (the format's qdq_activation),
  and the one with the lowest summed squared error wins; ties keep the absolute maximum.

Two passes: one over every calibration block for the per-token maxima, one to score the candidates on at most
SCORE_BLOCKS of them, evenly spaced (scoring quantizes each input once per candidate, which dominated the time of
this stage on CPUs; a few thousand tokens rank a handful of candidates well).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from tqdm import tqdm

from prismq.engine.stream import BATCH_BLOCKS, LayerStream, run_layer
from prismq.engine.walkstate import WalkState, pack, unpack
from prismq.errors import PrismqError
from prismq.formats import get_format
from prismq.model.siblings import sibling_groups

RANGES = "ranges"  # the walk's snapshot: hidden states, candidate ranges and their errors so far

CLIP_QUANTILES = (0.9999, 0.999, 0.99)
SCORE_BLOCKS = 8


def _run(model: nn.Module, blocks: torch.Tensor, hooks: dict[str, object], desc: str, progress: bool) -> None:
    """Run every calibration block through the model with forward pre-hooks on the named modules, `BATCH_BLOCKS`
    at a time as the streamed walks run them (so the streamed ranges equal these to the bit); only through its
    decoder (no output head, whose logits nobody reads here) when every hooked module lies inside it."""
    modules = dict(model.named_modules())
    device = next(model.parameters()).device
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    inside = {id(m) for m in decoder.modules()} if decoder is not None else set()
    runner = decoder if decoder is not None and all(id(modules[n]) in inside for n in hooks) else model
    handles = [modules[name].register_forward_pre_hook(hook) for name, hook in hooks.items()]
    try:
        for batch in tqdm(blocks.split(BATCH_BLOCKS), desc=desc, unit="batch", disable=not progress):
            runner(batch.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()


def _maxima_hook(store: list[torch.Tensor]):
    """A pre-hook appending each token's max |x| of the module's input to `store`."""
    def hook(_module: nn.Module, args: tuple) -> None:
        store.append(args[0].detach().abs().amax(dim=-1).flatten().float().cpu())
    return hook


def candidates_from(maxima: list[torch.Tensor]) -> torch.Tensor:
    """Clip candidates from per-token maxima: the absolute maximum first, then the CLIP_QUANTILES quantiles."""
    values = torch.cat(maxima)
    quantiles = torch.quantile(values, torch.tensor(CLIP_QUANTILES)) if values.numel() > 1 else values[:0]
    return torch.cat([values.max().reshape(1), quantiles]).clamp(min=torch.finfo(torch.float32).tiny)


def candidate_errors(x: torch.Tensor, candidates: torch.Tensor, fmt_name: str) -> torch.Tensor:
    """Per candidate range, the summed squared error of quantizing inputs `x` [..., in] as the runtime would under
    that range's static input scale (float64, on the CPU)."""
    fmt = get_format(fmt_name)
    x = x.reshape(-1, x.shape[-1])
    gs = fmt.input_scale(candidates.to(x.dtype))
    assert gs is not None, f"{fmt.name} has no static input scale to clip"
    gs = gs.to(x.device).reshape(-1, 1, 1)
    quantized = fmt.qdq_activation(x.unsqueeze(0).expand(len(gs), -1, -1), gs)
    return (quantized.float() - x.float()).square().sum(dim=(1, 2)).double().cpu()


def _score_hook(candidates: torch.Tensor, fmt_name: str, errors: torch.Tensor):
    """A pre-hook adding, per candidate, the squared error of quantizing the module's input as the runtime would."""
    def hook(_module: nn.Module, args: tuple) -> None:
        errors.add_(candidate_errors(args[0].detach(), candidates, fmt_name))
    return hook


def _scored(blocks: int) -> list[int]:
    """Indices of the (at most SCORE_BLOCKS, evenly spaced) blocks the candidates are scored on."""
    return torch.linspace(0, blocks - 1, min(SCORE_BLOCKS, blocks)).round().long().unique().tolist()


def _choose(groups: list[list[str]], candidates: dict[str, torch.Tensor],
            errors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each group's lowest-error candidate (the first minimum: the absolute maximum wins ties), for every member."""
    chosen = {}
    for group in groups:
        best = int(torch.argmin(errors[group[0]]))
        chosen.update({name: candidates[group[0]][best].clone() for name in group})
    return chosen


@torch.no_grad()
def calibrated_input_amax(model: nn.Module, blocks: torch.Tensor, assignment: dict[str, str],
                          progress: bool = True) -> dict[str, torch.Tensor]:
    """The input range c (fp32 scalar, on the CPU) each Linear of `assignment` whose format ships a static input
    scale should be encoded with, chosen as the module docstring says; run on the unquantized in-memory model."""
    groups = [g for g in sibling_groups(assignment) if get_format(assignment[g[0]]).needs_input_amax]
    if not groups:
        return {}
    token_max: dict[str, list[torch.Tensor]] = {g[0]: [] for g in groups}
    _run(model, blocks, {name: _maxima_hook(store) for name, store in token_max.items()}, "calibrate input ranges",
         progress)
    candidates = {name: candidates_from(maxima) for name, maxima in token_max.items()}
    errors = {name: torch.zeros(len(c), dtype=torch.float64) for name, c in candidates.items()}
    hooks = {g[0]: _score_hook(candidates[g[0]], assignment[g[0]], errors[g[0]]) for g in groups}
    _run(model, blocks[_scored(len(blocks))], hooks, "choose input clipping", progress)
    return _choose(groups, candidates, errors)


@torch.no_grad()
def streamed_input_amax(stream: LayerStream, blocks: torch.Tensor, assignment: dict[str, str],
                        progress: bool = True,
                        token_max: Mapping[str, torch.Tensor] | None = None,
                        state: WalkState | None = None) -> dict[str, torch.Tensor]:
    """`calibrated_input_amax` on a streamed model, equal to it: each layer read once, its inputs' per-token maxima
    recorded over every block, then its candidates scored on the scored blocks' inputs of the same layer.

    `token_max` (per Linear, every token's max |x| over `blocks`, block after block: what the probe records) spares
    the first pass: only the scored blocks are run. `state`: the walk is snapshotted there after a layer
    (`WalkState.checkpoint`), and a rerun with the same state resumes after the last layer snapshotted."""
    groups = [g for g in sibling_groups(assignment) if get_format(assignment[g[0]]).needs_input_amax]
    if not groups:
        return {}
    scored = _scored(len(blocks))
    candidates: dict[str, torch.Tensor] = {}
    if token_max is not None:
        candidates = {g[0]: candidates_from([token_max[g[0]].float()]) for g in groups}
    # the scored blocks are a lane of their own; every block runs (for the maxima) only without `token_max`; both
    # in batches as `calibrated_input_amax` runs them, so the ranges are its ranges to the bit
    inputs = stream.first_inputs(blocks[scored])
    every = stream.first_inputs(blocks) if token_max is None else []
    errors: dict[str, torch.Tensor] = {}
    saved = state.load(RANGES) if state is not None else None
    start = 0 if saved is None else saved[1]["layer"]
    if saved is not None:
        hidden = unpack(saved[0], "hidden", stream.device, stream.dtype)
        inputs = [(h, kwargs) for h, (_, kwargs) in zip(hidden, inputs)]
        hidden = unpack(saved[0], "every", stream.device, stream.dtype)
        every = [(h, kwargs) for h, (_, kwargs) in zip(hidden, every)]
        for key in saved[0]:
            kind, _, name = key.partition(":")
            if kind in ("errors", "candidates"):
                (errors if kind == "errors" else candidates)[name] = saved[0][key]
    for index in tqdm(range(start, len(stream)), initial=start, total=len(stream), desc="calibrate input ranges",
                      unit="layer", disable=not progress):
        with stream.layer(index) as layer:
            named = stream.layer_names(index, layer)
            modules = {g[0]: named[stream.targets[g[0]].module] for g in groups
                       if g[0] in stream.targets and stream.targets[g[0]].module in named}
            here = [g for g in groups if g[0] in modules]
            if token_max is None:
                maxima: dict[str, list[torch.Tensor]] = {g[0]: [] for g in here}
                every = _hooked(layer, every, {modules[n]: _maxima_hook(store) for n, store in maxima.items()})
                candidates.update({name: candidates_from(values) for name, values in maxima.items()})
            errors.update({g[0]: torch.zeros(len(candidates[g[0]]), dtype=torch.float64) for g in here})
            hooks = {modules[g[0]]: _score_hook(candidates[g[0]], assignment[g[0]], errors[g[0]]) for g in here}
            inputs = _hooked(layer, inputs, hooks)
        if state is not None:
            state.checkpoint(RANGES, {**pack("hidden", [h for h, _ in inputs]), **pack("every", [h for h, _ in every]),
                                      **{f"errors:{n}": e for n, e in errors.items()},
                                      **{f"candidates:{n}": c for n, c in candidates.items()}}, layer=index + 1)
    outside = [g[0] for g in groups if g[0] not in errors]
    if outside:
        raise PrismqError(f"{outside[0]} lies outside the decoder layers; its format cannot take a static input scale")
    return _choose(groups, candidates, errors)


def _hooked(layer: nn.Module, inputs: list, hooks: dict[nn.Module, object]) -> list:
    """run_layer with forward pre-hooks on some of the layer's modules for the duration of the run."""
    handles = [module.register_forward_pre_hook(hook) for module, hook in hooks.items()]  # type: ignore[arg-type]
    try:
        return run_layer(layer, inputs)
    finally:
        for handle in handles:
            handle.remove()
