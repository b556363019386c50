"""The ranges stage: the static input ranges (NVFP4's input_global_scale) every candidate will ship, computed once.

Selection (L2's re-pricing, L3's flips, the validated frontier) and rounding all quantize activations with these
ranges, so what selection measures is what ships. They are computed for every target that some offered option
could give a static-input-scale format, before anything is selected: a Linear's clipped range depends only on the
unquantized model's inputs on the calibration blocks (`clip.streamed_input_amax`), never on the other units'
formats, so one set serves every candidate. Routed experts take their layer's largest routed input per projection
kind (not clipped). Written to WORK/input_ranges.safetensors; a killed walk resumes from WORK/ranges.walk.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from prismq.allocate.budget import Problem
from prismq.artifacts import fingerprint_model, fingerprint_tokens, read_tensors, write_tensors
from prismq.engine.stream import LayerStream
from prismq.engine.walkstate import WalkState
from prismq.errors import PrismqError
from prismq.formats import get_format
from prismq.measure.fisher import X_TOKEN_MAX, input_statistic
from prismq.measure.probe_stage import PROBE_KIND, PROBE_STEM
from prismq.model.siblings import input_groups
from prismq.model.source import resolve_device
from prismq.rounding.clip import streamed_input_amax

RANGES_STEM = "input_ranges"
RANGES_KIND = "input_ranges"


def needing_ranges(problem: Problem, assignments: Iterable[dict[str, str]] = ()) -> dict[str, str]:
    """The targets that some option the allocation `problem` leaves open (a finite cost), or some given assignment,
    gives a static-input-scale format, with that format."""
    needing = {name: fmt for a in assignments for name, fmt in a.items() if get_format(fmt).needs_input_amax}
    for k, fmt in enumerate(problem.formats):
        if get_format(fmt).needs_input_amax:
            needing.update({name: fmt for u in np.flatnonzero(np.isfinite(problem.cost[:, k]))
                            for name in problem.units[u]})
    return needing


def stage_ranges(work: Path, model_dir: Path, dtype: torch.dtype, device: str, calibration: torch.Tensor,
                 needing: dict[str, str], max_memory: int | None = None) -> dict[str, torch.Tensor]:
    """Run (or reuse) the ranges stage (see the module docstring) for the targets in `needing` (name -> the
    static-input-scale format it may take); returns name -> range (fp32 scalar, on the CPU)."""
    if not needing:
        return {}
    expect = {"model": fingerprint_model(model_dir), "calibration": fingerprint_tokens(calibration),
              "dtype": str(dtype).removeprefix("torch."), "device": resolve_device(device).type,
              "targets": hashlib.sha256(json.dumps(sorted(needing.items())).encode()).hexdigest()[:16]}
    stored = read_tensors(work / RANGES_STEM, RANGES_KIND, expect)
    if stored is not None:
        return {name: stored[0][name].clone() for name in needing}
    state = WalkState(work / "ranges.walk", expect)
    with LayerStream(model_dir, dtype, device, max_memory) as stream:
        ranges = _ranges(stream, calibration, needing, work, state)
    write_tensors(work / RANGES_STEM, RANGES_KIND, {n: v.reshape(()).float().cpu() for n, v in ranges.items()},
                  expect)
    state.clear()
    return ranges


def _ranges(stream: LayerStream, calibration: torch.Tensor, needing: dict[str, str], work: Path,
            state: WalkState) -> dict[str, torch.Tensor]:
    """Clipped ranges for the Linears, the largest routed input for the routed experts; the clipping starts from
    the per-token input maxima the probe recorded on the same blocks when it did, in the same arithmetic."""
    routed = {n: f for n, f in needing.items() if n in stream.targets and stream.targets[n].expert is not None}
    linears = {n: f for n, f in needing.items() if n not in routed}
    probed = read_tensors(work / PROBE_STEM, PROBE_KIND)
    token_max = None
    same_arithmetic = probed is not None and probed[1].get("dtype") == str(stream.dtype).removeprefix("torch.")
    found = {n: input_statistic(probed[0], n, X_TOKEN_MAX) for n in needing} if probed is not None else {}
    if probed is not None and same_arithmetic and all(value is not None for value in found.values()):
        token_max = {n: value[:calibration.numel()] for n, value in found.items()}  # type: ignore[index]
    ranges = streamed_input_amax(stream, calibration, linears, token_max=token_max, state=state) if linears else {}
    if routed:  # not clipped: the largest routed input of the layer's experts (-1 marks tokens not routed)
        if token_max is None:
            raise PrismqError("routed experts' input ranges are read from the probe's per-token maxima; rerun the "
                              "probe (`prismq probe`) in this compute dtype")
        ranges.update(largest_inputs({n: token_max[n] for n in routed}))
    return ranges


def largest_inputs(token_max: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Unclipped input ranges from per-token input maxima: each target's largest input, shared by the targets that
    share one input scale (`input_groups`: a layer's routed experts per projection kind)."""
    ranges = {}
    for group in input_groups(token_max):
        largest = torch.stack([token_max[n].amax() for n in group]).amax().float()
        ranges.update({n: largest.clamp(min=torch.finfo(torch.float32).tiny).clone() for n in group})
    return ranges


def ranges_for(input_amax: dict[str, torch.Tensor], assignments: Iterable[dict[str, str]]) -> dict[str, torch.Tensor]:
    """The ranges some assignment needs (targets given a static-input-scale format); a missing one is an error."""
    needing = {n for a in assignments for n, f in a.items() if get_format(f).needs_input_amax}
    missing = sorted(needing - set(input_amax))
    if missing:
        raise PrismqError(f"no input range was computed for {missing[0]}: rerun the ranges stage")
    return {n: input_amax[n] for n in needing}


def ranges_fingerprint(input_amax: dict[str, torch.Tensor]) -> str:
    """A short hash of a set of input ranges (names and values): identifies what a measurement quantized with."""
    values = sorted((name, float(value)) for name, value in input_amax.items())
    return hashlib.sha256(json.dumps(values).encode()).hexdigest()[:16]
