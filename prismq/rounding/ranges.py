"""The ranges stage: the static input ranges (NVFP4's input_global_scale) every candidate will ship, computed once.

Selection (L2's re-pricing, L3's flips, the validated frontier) and rounding all quantize activations with these
ranges, so what selection measures is what ships. They are computed for every target that some offered option
could give a static-input-scale format, before anything is selected: a Linear's clipped range depends only on the
unquantized model's inputs on the calibration blocks (`clip.streamed_input_amax`), never on the other units'
formats, so one set serves every candidate. Routed experts share one range per layer and projection kind
(`input_groups`), clipped the same way from the probe's records: candidates from the routed tokens' per-token
maxima, scored on the experts' input samples (a uniform sample of each expert's routed inputs; no walk). Written to
WORK/input_ranges.safetensors; a killed walk resumes from WORK/ranges.walk.
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
from prismq.measure.fisher import X_SAMPLE, X_TOKEN_MAX, input_statistic
from prismq.measure.probe_stage import PROBE_KIND, PROBE_STEM
from prismq.model.siblings import input_groups
from prismq.model.source import resolve_device
from prismq.rounding.clip import candidate_errors, candidates_from, streamed_input_amax

RANGES_STEM = "input_ranges"
RANGES_KIND = "input_ranges"
CLIPPING = "linears and routed experts"  # what is clipped: ranges computed before routed experts were are stale


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
              "clipped": CLIPPING, "dtype": str(dtype).removeprefix("torch."), "device": resolve_device(device).type,
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
    """Clipped ranges for the Linears and the routed experts; the clipping starts from the per-token input maxima
    the probe recorded on the same blocks when it did, in the same arithmetic."""
    routed = {n: f for n, f in needing.items() if n in stream.targets and stream.targets[n].expert is not None}
    linears = {n: f for n, f in needing.items() if n not in routed}
    probed = read_tensors(work / PROBE_STEM, PROBE_KIND)
    token_max = None
    same_arithmetic = probed is not None and probed[1].get("dtype") == str(stream.dtype).removeprefix("torch.")
    found = {n: input_statistic(probed[0], n, X_TOKEN_MAX) for n in needing} if probed is not None else {}
    if probed is not None and same_arithmetic and all(value is not None for value in found.values()):
        token_max = {n: value[:calibration.numel()] for n, value in found.items()}  # type: ignore[index]
    ranges = streamed_input_amax(stream, calibration, linears, token_max=token_max, state=state) if linears else {}
    if routed:
        samples = {n: input_statistic(probed[0], n, X_SAMPLE) for n in routed} if probed is not None else {}
        if token_max is None or any(sample is None for sample in samples.values()):
            raise PrismqError("routed experts' input ranges are read from the probe's per-token maxima and input "
                              "samples; rerun the probe (`prismq probe`) in this compute dtype")
        routed_max = {n: token_max[n] for n in routed}
        ranges.update(clipped_routed_inputs(routed_max, samples, routed, stream.dtype))  # type: ignore[arg-type]
    return ranges


def clipped_routed_inputs(token_max: dict[str, torch.Tensor], samples: dict[str, torch.Tensor],
                          formats: dict[str, str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Clipped input ranges of routed experts, one per group sharing an input scale (`input_groups`: a layer's
    experts per projection kind): the clip candidates of `clip` (the largest input, then quantiles of the per-token
    maxima) over every token routed to a member (-1 marks tokens that were not), each scored by the squared error
    of quantizing the members' input samples (in `dtype`) as the runtime would, each sample weighted by the tokens
    it stands for (an expert's routed tokens over its sample rows: a rarely routed expert repeats its few rows);
    the lowest wins, ties keep the largest input; a group no token reached gets the smallest positive range."""
    ranges = {}
    for group in input_groups(token_max):
        routed = torch.cat([token_max[n][token_max[n] >= 0] for n in group])
        if not routed.numel():
            ranges.update({n: torch.tensor(torch.finfo(torch.float32).tiny) for n in group})
            continue
        candidates = candidates_from([routed])
        errors = sum(candidate_errors(samples[n].to(dtype), candidates, formats[n])
                     * (float((token_max[n] >= 0).sum()) / max(len(samples[n]), 1)) for n in group)
        ranges.update({n: candidates[int(torch.argmin(errors))].clone() for n in group})  # type: ignore[arg-type]
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
