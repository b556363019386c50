"""L3: the end-to-end KL of single-unit changes ("flips") to an assignment, measured in one streamed walk.

Lanes of the walk: the unquantized reference, the base assignment, and one lane per flip (one decision unit in
another format, everything else as in the base). A flip lane starts at its unit's decoder layer from the base lane's
hidden states there (the prefix is shared, never recomputed) and re-runs only the layers from there on: tail
replay. Each decoder layer is read from disk once; the base's quantized tensors of a layer are encoded once, and a
flip starting in that layer encodes only its own unit, in a copy of the layer. At the head every lane's full-
vocabulary KL against the reference is taken position by position on the same blocks, and each flip is paired with
the base: its cost is the mean of (KL(flip) - KL(base)) over every position, with that mean's standard error.

Weights are rounded to nearest by the codecs (the exact bytes of round-to-nearest) and static input scales are the
ranges stage's, the ones that ship: the measurement ranks formats per unit; the chosen mix is then rounded as it
ships (GPTQ, scale sweep) and checked again by the round stage.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from prismq.engine.distributed import Ranks
from prismq.engine.layer_inputs import LayerInput
from prismq.engine.stream import LayerStream, run_layer, spill
from prismq.engine.walkstate import WalkState, pack, unpack
from prismq.export.encode import encode_model
from prismq.formats import get_format
from prismq.measure.kl import DEFAULT_CHUNK, HiddenStates, KLResult, evaluate_states
from prismq.model.fake_quant import apply_fake_quant

logger = logging.getLogger(__name__)
FLIPS = "flips"  # the flips walk's snapshot: every lane's hidden states before its next layer
CANDIDATES = "candidates"  # the frontier walk's snapshot


@dataclass(frozen=True)
class Flip:
    """One decision unit (its members) in another format than the base assignment gives it."""

    unit: tuple[str, ...]
    format: str


@dataclass(frozen=True)
class FlipMeasure:
    """A flip's measured cost on the selection blocks: the mean over positions of KL(flip) - KL(base), its standard
    error (over positions), and the flipped model's mean KL."""

    flip: Flip
    delta_kl: float
    stderr: float
    mean_kl: float


@dataclass
class Measured:
    """The base assignment's KL statistics and every flip's paired cost, in the order the flips were given."""

    base: KLResult
    flips: list[FlipMeasure] = field(default_factory=list)


def paired(flip: Flip, flipped: KLResult, base: KLResult) -> FlipMeasure:
    """The flip's cost against the base on the same positions: mean difference and its standard error."""
    difference = (flipped.kl.double() - base.kl.double()).flatten()
    stderr = float(difference.std() / math.sqrt(difference.numel())) if difference.numel() > 1 else 0.0
    return FlipMeasure(flip, float(difference.mean()), stderr, flipped.mean_kl)


def _layer_assignment(stream: LayerStream, assignment: dict[str, str], index: int) -> dict[str, str]:
    """The part of `assignment` inside decoder layer `index` that takes a quantized format."""
    return {name: fmt for name, fmt in assignment.items()
            if stream.layer_of(name) == index and get_format(fmt).scheme() is not None}


def measure_flips(stream: LayerStream, base: dict[str, str], flips: list[Flip], blocks: torch.Tensor,
                  input_amax: dict[str, torch.Tensor], chunk_size: int = DEFAULT_CHUNK,
                  progress: bool = True, state: WalkState | None = None, ranks: Ranks | None = None) -> Measured:
    """KL of the base assignment and the paired cost of every flip on token `blocks` [N, L] (see the module
    docstring); `BATCH_BLOCKS` blocks per forward, as the other walks run them. Units outside the decoder layers
    cannot flip (only BF16 is assigned there). `state`: every lane's hidden states are snapshotted there after a layer
    (`WalkState.checkpoint`), and a rerun with the same state resumes after the last layer snapshotted.
    `ranks` (default: the initialized process group's, else one process): the flips are divided among the
    processes, each walking the base and its own flips (no snapshots: `Ranks.own`), and every rank gets every
    flip's measure, the same as one process measures (a lane's numbers do not depend on the other lanes)."""
    ranks = ranks or Ranks.current()
    if ranks.world == 1:
        return _measure_flips(stream, base, flips, blocks, input_amax, chunk_size, progress, state)
    mine = [number for number in range(len(flips)) if ranks.mine(number)]
    local = _measure_flips(stream, base, [flips[n] for n in mine], blocks, input_amax, chunk_size,
                           progress and ranks.leader, ranks.own(state))
    measures = ranks.gather(dict(zip(mine, local.flips)))
    return Measured(local.base, [measures[number] for number in range(len(flips))])


@torch.no_grad()
def _measure_flips(stream: LayerStream, base: dict[str, str], flips: list[Flip], blocks: torch.Tensor,
                   input_amax: dict[str, torch.Tensor], chunk_size: int, progress: bool,
                   state: WalkState | None) -> Measured:
    """`measure_flips` in one process."""
    starts: dict[int, list[int]] = {}
    for number, flip in enumerate(flips):
        index = stream.layer_of(flip.unit[0])
        if index is None:
            raise ValueError(f"{flip.unit[0]} lies outside the decoder layers: it cannot be measured as a flip")
        starts.setdefault(index, []).append(number)
    reference = stream.first_inputs(blocks)
    lane_bytes = sum(h.numel() * h.element_size() for h, _ in reference)
    if stream.device.type != "cpu" and stream.layer_copies(reserved=(len(flips) + 2) * lane_bytes) < 2:
        logger.info("the %d lanes' hidden states (%.2f GB) do not fit on %s beside two layers: kept in host memory",
                    len(flips) + 2, (len(flips) + 2) * lane_bytes / 1e9, stream.device)
        reference = spill(reference)
    base_lane: list[LayerInput] = reference
    lanes: dict[int, list[LayerInput]] = {}
    saved = state.load(FLIPS) if state is not None else None
    start = 0 if saved is None else saved[1]["layer"]
    if saved is not None:
        def restored(prefix: str) -> list[LayerInput]:
            hidden = unpack(saved[0], prefix, reference[0][0].device, stream.dtype)  # where the lanes are kept
            return [(h, kwargs) for h, (_, kwargs) in zip(hidden, reference)]

        reference, base_lane = restored("reference"), restored("base")
        lanes = {number: restored(f"flip{number}") for number in saved[1]["lanes"]}
    for index in tqdm(range(start, len(stream)), initial=start, total=len(stream),
                      desc=f"measure {len(flips)} flip(s)", unit="layer", disable=not progress):
        with stream.layer(index) as layer:
            modules = stream.layer_names(index, layer)
            reference = run_layer(layer, reference)
            layer_base = _layer_assignment(stream, base, index)
            encoded = encode_model(modules, layer_base, input_amax, stream.weight_dtype, stream.targets,
                                   stream.source)
            started = {}
            for number in starts.get(index, []):
                flip = flips[number]
                changed = {**layer_base, **dict.fromkeys(flip.unit, flip.format)}
                changed = {n: f for n, f in changed.items() if get_format(f).scheme() is not None}
                own = encode_model(modules, {n: changed[n] for n in flip.unit if n in changed}, input_amax,
                                   stream.weight_dtype, stream.targets, stream.source)
                copied = copy.deepcopy(layer)
                apply_fake_quant(stream.layer_names(index, copied), changed,
                                 {**{n: t for n, t in encoded.items() if n not in flip.unit}, **own},
                                 stream.weight_dtype, stream.targets)
                started[number] = run_layer(copied, base_lane)
                del copied
            apply_fake_quant(modules, layer_base, encoded, stream.weight_dtype, stream.targets)
            base_lane = run_layer(layer, base_lane)
            lanes = {number: run_layer(layer, hidden) for number, hidden in lanes.items()}
            lanes.update(started)
        if state is not None:
            tensors = {**pack("reference", [h for h, _ in reference]), **pack("base", [h for h, _ in base_lane])}
            for number, hidden in lanes.items():
                tensors.update(pack(f"flip{number}", [h for h, _ in hidden]))
            state.checkpoint(FLIPS, tensors, layer=index + 1, lanes=sorted(lanes))
    lanes_in_order = [base_lane, *(lanes[number] for number in range(len(flips)))]
    results = lanes_kl(stream, blocks, stream.final_states(reference), lanes_in_order, chunk_size, progress)
    return Measured(results[0], [paired(flip, result, results[0]) for flip, result in zip(flips, results[1:])])


def measure_lanes(stream: LayerStream, assignments: list[dict[str, str]], blocks: torch.Tensor,
                  input_amax: dict[str, torch.Tensor], chunk_size: int = DEFAULT_CHUNK,
                  progress: bool = True, state: WalkState | None = None,
                  ranks: Ranks | None = None) -> list[KLResult]:
    """The KL statistics of whole assignments (rounded to nearest, like the flips) on token `blocks`, each a lane
    of one streamed walk: every layer is read once, and each lane runs its own quantized copy of it. `state`: the
    lanes' hidden states are snapshotted there after a layer (`WalkState.checkpoint`), and a rerun with the same
    state resumes there. `ranks` (default: the initialized process group's, else one process): the assignments
    are divided among the processes and every rank gets every result, the same as one process measures."""
    ranks = ranks or Ranks.current()
    if ranks.world == 1:
        return _measure_lanes(stream, assignments, blocks, input_amax, chunk_size, progress, state)
    mine = [number for number in range(len(assignments)) if ranks.mine(number)]
    local = _measure_lanes(stream, [assignments[n] for n in mine], blocks, input_amax, chunk_size,
                           progress and ranks.leader, ranks.own(state))
    results = ranks.gather(dict(zip(mine, local)))
    return [results[number] for number in range(len(assignments))]


@torch.no_grad()
def _measure_lanes(stream: LayerStream, assignments: list[dict[str, str]], blocks: torch.Tensor,
                   input_amax: dict[str, torch.Tensor], chunk_size: int, progress: bool,
                   state: WalkState | None) -> list[KLResult]:
    """`measure_lanes` in one process."""
    reference = stream.first_inputs(blocks)
    lanes = [reference for _ in assignments]
    saved = state.load(CANDIDATES) if state is not None else None
    start = 0 if saved is None else saved[1]["layer"]
    if saved is not None:
        def restored(prefix: str) -> list[LayerInput]:
            hidden = unpack(saved[0], prefix, stream.device, stream.dtype)
            return [(h, kwargs) for h, (_, kwargs) in zip(hidden, reference)]

        lanes = [restored(f"lane{number}") for number in range(len(assignments))]
        reference = restored("reference")
    for index in tqdm(range(start, len(stream)), initial=start, total=len(stream),
                      desc=f"measure {len(assignments)} candidate(s)", unit="layer", disable=not progress):
        with stream.layer(index) as layer:
            for number, assignment in enumerate(assignments):
                copied = copy.deepcopy(layer)
                modules = stream.layer_names(index, copied)
                part = _layer_assignment(stream, assignment, index)
                encoded = encode_model(modules, part, input_amax, stream.weight_dtype, stream.targets,
                                       stream.source)
                apply_fake_quant(modules, part, encoded, stream.weight_dtype, stream.targets)
                lanes[number] = run_layer(copied, lanes[number])
                del copied
            reference = run_layer(layer, reference)
        if state is not None:
            tensors = pack("reference", [h for h, _ in reference])
            for number, lane in enumerate(lanes):
                tensors.update(pack(f"lane{number}", [h for h, _ in lane]))
            state.checkpoint(CANDIDATES, tensors, layer=index + 1)
    return lanes_kl(stream, blocks, stream.final_states(reference), lanes, chunk_size, progress)


def lanes_kl(stream: LayerStream, blocks: torch.Tensor, reference: list[torch.Tensor], lanes: list[list[LayerInput]],
             chunk_size: int, progress: bool) -> list[KLResult]:
    """Each lane's KL statistics, from its last decoder layer's outputs (final norm, head), against the reference's
    final hidden states."""
    return evaluate_states(HiddenStates(stream.head, blocks, reference),
                           [HiddenStates(stream.head, blocks, stream.final_states(lane)) for lane in lanes], blocks,
                           chunk_size, progress)
