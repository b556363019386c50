"""Round several candidates in one walk of the streamed layer stack, and measure them on held-out text as they go.

A candidate ("lane") is an assignment rounded by one method (`--rounding best` builds rtn, gptq and gptq+sweep of
the same assignment; the uniform baselines are other assignments). Each decoder layer is read from disk once; every
lane gets its own copy of it, rounds it on the lane's own calibration hidden states (the outputs of the lane's
already rounded layers, exactly as `round_model` does on a whole model), then advances its calibration and held-out
hidden states through it; a lane equal to an earlier one on the first layers (same method and formats) takes that
lane's results there (`shared_prefixes`). The unquantized reference advances its held-out hidden states through the
layer as read. Memory: one layer per lane at a time plus each lane's hidden states, never a model copy.

At the end the held-out hidden states of every lane go through the final norm and the output head, chunk by chunk,
and are compared with the reference's by full-vocabulary KL (`prismq.measure.kl`).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from prismq.engine.layer_inputs import LayerInput
from prismq.engine.stream import LayerStream, run_layer, spill
from prismq.engine.walkstate import WalkState, pack, unpack
from prismq.errors import PrismqError
from prismq.formats import get_format
from prismq.measure.kl import DEFAULT_CHUNK, HiddenStates, KLResult, evaluate_states
from prismq.model.siblings import sibling_groups
from prismq.rounding.gptq import GPTQSettings
from prismq.rounding.sequential import METHODS, Method, RoundedModel, round_layer
from prismq.rounding.store import EncodedStore

logger = logging.getLogger(__name__)
LANES = "lanes"  # the walk's snapshot: hidden states and details before its next layer


@dataclass
class Lane:
    """One candidate walking the stack: what it ships so far and where its hidden states are."""

    assignment: dict[str, str]
    method: Method
    calibration: list[LayerInput] = field(default_factory=list)
    heldout: list[LayerInput] = field(default_factory=list)
    rounded: RoundedModel = field(default_factory=lambda: RoundedModel({}))


@dataclass
class LaneResults:
    """The exact tensors each lane ships and its held-out KL against the reference (on the held-out blocks, and
    apart on the report blocks when given), in the order given; the reference's final hidden states per block
    (held-out then report), for later comparisons against the same text."""

    rounded: list[RoundedModel]
    kl: list[KLResult]
    reference_hidden: list[torch.Tensor]
    report_kl: list[KLResult] = field(default_factory=list)


def _by_layer(stream: LayerStream, assignment: dict[str, str]) -> dict[int, list[list[str]]]:
    """The assignment's sibling groups per decoder layer; only BF16 may lie outside the layers (lm_head)."""
    by_layer: dict[int, list[list[str]]] = {}
    for group in sibling_groups(assignment):
        index = stream.layer_of(group[0])
        if index is None:
            if get_format(assignment[group[0]]).scheme() is not None:
                raise PrismqError(f"{group[0]} lies outside the decoder layers; only BF16 can be assigned there")
            continue
        by_layer.setdefault(index, []).append(group)
    return by_layer


@torch.no_grad()
def round_lanes(stream: LayerStream, candidates: list[tuple[dict[str, str], Method]],
                calibration: torch.Tensor | None,
                heldout: torch.Tensor, input_amax: dict[str, torch.Tensor], settings: GPTQSettings | None = None,
                *, batch_size: int = 4, reference_hidden: list[torch.Tensor] | None = None,
                spill_dir: Path | None = None, state: WalkState | None = None, chunk_size: int = DEFAULT_CHUNK,
                progress: bool = True, report: torch.Tensor | None = None) -> LaneResults:
    """Round every (assignment, method) candidate layer by layer in one streamed walk and measure its held-out KL.

    The tensors shipped for each candidate equal `round_model`'s on a whole model with the same inputs (calibration
    blocks in batches of `batch_size`, None when every method is rtn; held-out blocks one at a time, as the KL
    evaluator runs them).
    `reference_hidden`, from an earlier walk over the same held-out blocks, spares the reference's forward.
    `spill_dir`: each candidate's tensors go to a subdirectory of it layer by layer (`EncodedStore`) instead of
    staying in memory. `state` (with `spill_dir`): the walk saves its hidden states after every layer there, and a
    rerun with the same state resumes after the last layer saved. `report`: more blocks walked beside the held-out
    ones and measured apart (`LaneResults.report_kl`): numbers to state, not to decide on."""
    for _, method in candidates:
        if method not in METHODS:
            raise PrismqError(f"unknown rounding {method!r} (choose from {', '.join(METHODS)})")
    if calibration is None and any(method != "rtn" for _, method in candidates):
        raise PrismqError("GPTQ needs calibration blocks")
    settings = settings or GPTQSettings()
    groups = [_by_layer(stream, assignment) for assignment, _ in candidates]
    first_calibration = [] if calibration is None else stream.first_inputs(calibration, batch_size)
    measured = heldout if report is None else torch.cat([heldout, report])
    first_heldout = stream.first_inputs(measured, 1)
    if state is not None and spill_dir is None:
        raise PrismqError("a resumable rounding walk needs a spill directory for its tensors")
    saved = state.load(LANES) if state is not None else None
    start = 0 if saved is None else saved[1]["layer"]
    lanes = [Lane(assignment, method, first_calibration, first_heldout,
                  RoundedModel({} if spill_dir is None else
                               EncodedStore(Path(spill_dir) / f"candidate-{k}", fresh=saved is None)))
             for k, (assignment, method) in enumerate(candidates)]
    reference = None if reference_hidden is not None else first_heldout
    if saved is not None:
        reference = _restore(saved, lanes, reference, stream)
    hidden_bytes = sum(h.numel() * h.element_size() for lane in lanes for h, _ in [*lane.calibration, *lane.heldout])
    if stream.device.type != "cpu" and stream.layer_copies(reserved=hidden_bytes) < 1:
        logger.info("the candidates' hidden states (%.2f GB) do not fit on %s beside a layer: kept in host memory",
                    hidden_bytes / 1e9, stream.device)
        for lane in lanes:
            lane.calibration, lane.heldout = spill(lane.calibration), spill(lane.heldout)
        hidden_bytes = 0
    prefixes = shared_prefixes(candidates, groups, len(stream))
    share = stream.layer_copies(reserved=hidden_bytes) > len(lanes)  # else each lane reads the layer itself
    for index in tqdm(range(start, len(stream)), initial=start, total=len(stream),
                      desc=f"round {len(lanes)} candidate(s)", unit="layer", disable=not progress):
        computing = [k for k, (_, until) in enumerate(prefixes) if index >= until]
        if share:
            with stream.layer(index) as original:
                if reference is not None:
                    reference = run_layer(original, reference)
                for k in computing:
                    layer = original if k == computing[-1] else copy.deepcopy(original)
                    _advance(stream, index, layer, lanes[k], groups[k].get(index, []), input_amax, settings)
                    del layer
        else:
            if reference is not None:
                with stream.layer(index) as original:
                    reference = run_layer(original, reference)
            for k in computing:
                with stream.layer(index) as layer:
                    _advance(stream, index, layer, lanes[k], groups[k].get(index, []), input_amax, settings)
        for k, (leader, until) in enumerate(prefixes):
            if index < until:
                _follow(lanes[k], lanes[leader], groups[k].get(index, []))
        if state is not None:
            _save(state, index + 1, lanes, reference)
    _encode_outside(stream, lanes)
    if reference is not None:
        reference_hidden = [stream.final_hidden(hidden)[0] for hidden, _ in reference]
    assert reference_hidden is not None
    candidates_hidden = [[stream.final_hidden(hidden.to(stream.device))[0] for hidden, _ in lane.heldout]
                         for lane in lanes]
    split = len(heldout)

    def measure(blocks: torch.Tensor, part: slice) -> list[KLResult]:
        return evaluate_states(HiddenStates(stream.head, blocks, reference_hidden[part]),
                               [HiddenStates(stream.head, blocks, hidden[part]) for hidden in candidates_hidden],
                               blocks, chunk_size, progress)

    return LaneResults([lane.rounded for lane in lanes], measure(heldout, slice(0, split)), reference_hidden,
                       [] if report is None else measure(report, slice(split, None)))


def shared_prefixes(candidates: list[tuple[dict[str, str], Method]], groups: list[dict[int, list[list[str]]]],
                    layers: int) -> list[tuple[int, int]]:
    """Per lane, an earlier lane it equals on the first decoder layers (same method, same formats in each) and how
    many layers that is, (-1, 0) when none: on those layers it takes that lane's hidden states and tensors instead of
    computing them again, since the same arithmetic on the same inputs gives the same bits. A selected mix and the
    knapsack's own differ from the first changed unit on; everything before it is rounded once."""

    def formats(lane: int, index: int) -> list[tuple[tuple[str, ...], str]]:
        return sorted((tuple(g), candidates[lane][0][g[0]]) for g in groups[lane].get(index, []))

    prefixes = []
    for lane, (_, method) in enumerate(candidates):
        best = (-1, 0)
        for earlier in range(lane):
            if candidates[earlier][1] != method:
                continue
            count = 0
            while count < layers and formats(earlier, count) == formats(lane, count):
                count += 1
            if count > best[1]:
                best = (earlier, count)
        prefixes.append(best)
    return prefixes


def _follow(lane: Lane, leader: Lane, groups: list[list[str]]) -> None:
    """The lane takes the leader's results for the layer just walked (equal by `shared_prefixes`)."""
    lane.calibration, lane.heldout = leader.calibration, leader.heldout
    names = [name for group in groups for name in group]
    lane.rounded.encoded.update({name: leader.rounded.encoded[name] for name in names})
    details = leader.rounded.details
    lane.rounded.details.update({name: details[name] for name in names if name in details})
    if isinstance(lane.rounded.encoded, EncodedStore):
        lane.rounded.encoded.flush()


def _save(state: WalkState, layer: int, lanes: list[Lane], reference: list[LayerInput] | None) -> None:
    """Snapshot the walk before decoder layer `layer`: every lane's hidden states and GPTQ details (its tensors so
    far are already in its store), and the reference's held-out hidden states."""
    tensors: dict[str, torch.Tensor] = {}
    for number, lane in enumerate(lanes):
        if lane.method != "rtn":  # round-to-nearest never advances its calibration inputs
            tensors.update(pack(f"lane{number}.calibration", [h for h, _ in lane.calibration]))
        tensors.update(pack(f"lane{number}.heldout", [h for h, _ in lane.heldout]))
    if reference is not None:
        tensors.update(pack("reference", [h for h, _ in reference]))
    state.save(LANES, tensors, layer=layer, details=[lane.rounded.details for lane in lanes])


def _restore(saved: tuple, lanes: list[Lane], reference: list[LayerInput] | None,
             stream: LayerStream) -> list[LayerInput] | None:
    """Put a snapshot's hidden states and details back into the lanes (their keyword arguments are the first
    layer's, recomputed); returns the reference's hidden states."""
    stored, meta = saved

    def restored(prefix: str, inputs: list[LayerInput]) -> list[LayerInput]:
        hidden = unpack(stored, prefix, stream.device, stream.dtype)
        return [(h, kwargs) for h, (_, kwargs) in zip(hidden, inputs)]

    for number, (lane, details) in enumerate(zip(lanes, meta["details"])):
        if lane.method != "rtn":
            lane.calibration = restored(f"lane{number}.calibration", lane.calibration)
        lane.heldout = restored(f"lane{number}.heldout", lane.heldout)
        lane.rounded.details = {name: tuple(value) for name, value in details.items()}
    return None if reference is None else restored("reference", reference)


def _advance(stream: LayerStream, index: int, layer: torch.nn.Module, lane: Lane, groups: list[list[str]],
             input_amax: dict[str, torch.Tensor], settings: GPTQSettings) -> None:
    """Round the lane's copy of layer `index` and move the lane's hidden states through it."""
    if groups:
        round_layer(layer, stream.layer_names(index, layer), groups, lane.assignment, lane.method, lane.calibration,
                    input_amax, settings, stream.weight_dtype, lane.rounded, stream.targets)
    if lane.method != "rtn":  # round-to-nearest never looks at its inputs
        lane.calibration = run_layer(layer, lane.calibration)
    lane.heldout = run_layer(layer, lane.heldout)
    if isinstance(lane.rounded.encoded, EncodedStore):
        lane.rounded.encoded.flush()


def _encode_outside(stream: LayerStream, lanes: list[Lane]) -> None:
    """The BF16 tensors of assigned Linears outside the decoder layers (lm_head), from the resident modules."""
    from prismq.export.encode import encode_model

    for lane in lanes:
        outside = {n: f for n, f in lane.assignment.items() if n not in lane.rounded.encoded}
        lane.rounded.encoded.update(encode_model(stream.model, outside, {}, stream.weight_dtype))
        if isinstance(lane.rounded.encoded, EncodedStore):
            lane.rounded.encoded.flush()
