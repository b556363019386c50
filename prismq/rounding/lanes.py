"""Round several candidates in one walk of the streamed layer stack, and measure them on held-out text as they go.

A candidate ("lane") is an assignment rounded by one method (`--rounding best` builds rtn, gptq and gptq+sweep of
the same assignment). Each decoder layer is read from disk once; every lane gets its own copy of it, rounds it on the
lane's own calibration hidden states (the outputs of the lane's already rounded layers, exactly as `round_model` does
on a whole model), then advances its calibration and held-out hidden states through it. The unquantized reference
advances its held-out hidden states through the layer as read. Memory: a few copies of one layer plus each lane's
hidden states, never a model copy.

A variant of a lane (the alternatives the round stage measures: the knapsack's own mix, uniform formats; the same
assignment rounded by another method) differs from it on some units: where its format differs, and everywhere a
format rounds weights when its method differs. Those are rounded on the lane's calibration hidden states and the
same Hessians (no calibration pass of its own; each Hessian factorized once for every format and method), every
other target keeps the lane's tensors, and its held-out hidden states branch off the lane's at its first changed
layer (tail replay). What a variant measures is what it would ship: the lane's tensors with its own in place.

At the end the held-out hidden states of every lane and variant go through the final norm and the output head,
chunk by chunk, and are compared with the reference's by full-vocabulary KL (`prismq.measure.kl`).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from prismq.engine.distributed import Ranks
from prismq.engine.layer_inputs import LayerInput
from prismq.engine.stream import LayerStream, run_layer, spill
from prismq.engine.walkstate import WalkState, pack, unpack
from prismq.errors import PrismqError
from prismq.formats import get_format
from prismq.measure.kl import DEFAULT_CHUNK, HiddenStates, KLResult, evaluate_states
from prismq.model.fake_quant import apply_fake_quant
from prismq.model.source import resolve_device
from prismq.model.siblings import sibling_groups
from prismq.rounding.gptq import GPTQSettings
from prismq.rounding.sequential import METHODS, Method, RoundedModel, round_layer
from prismq.rounding.store import EncodedStore, PassingStore, variant_key

logger = logging.getLogger(__name__)
LANES = "lanes"  # the walk's snapshot: hidden states and details before its next layer
# a variant of lane k: (k, assignment), rounded by the lane's method, or (k, assignment, method)
VariantSpec = tuple[int, dict[str, str]] | tuple[int, dict[str, str], Method]


@dataclass
class Lane:
    """One candidate walking the stack: what it ships so far and where its hidden states are."""

    assignment: dict[str, str]
    method: Method
    calibration: list[LayerInput] = field(default_factory=list)
    heldout: list[LayerInput] = field(default_factory=list)
    rounded: RoundedModel = field(default_factory=lambda: RoundedModel({}))
    calibrated: bool = True  # its calibration hidden states advance (GPTQ, its own or a variant's, reads them)


@dataclass
class Variant:
    """A lane's variant walking the stack (see the module docstring): the units it changes per decoder layer, its
    held-out hidden states once it has branched off (None before its first changed layer) and its own tensors."""

    lane: int
    method: Method
    changes: dict[int, dict[str, str]]  # decoder layer -> target name -> format, where it differs from the lane
    heldout: list[LayerInput] | None = None
    rounded: RoundedModel = field(default_factory=lambda: RoundedModel({}))


@dataclass
class LaneResults:
    """The exact tensors each lane ships and its held-out KL against the reference, lanes first, then variants in
    the order given (a variant's `rounded` holds only the targets it changes: the lane's tensors ship for the rest);
    the reference's final hidden states per held-out block, for later comparisons against the same text."""

    rounded: list[RoundedModel]
    kl: list[KLResult]
    reference_hidden: list[torch.Tensor]


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


def _changes(stream: LayerStream, lane: dict[str, str], variant: dict[str, str],
             method_differs: bool) -> dict[int, dict[str, str]]:
    """Where `variant`'s tensors differ from its lane's, per decoder layer (both assign the same targets): where
    the format differs, and, when `method_differs`, wherever the format rounds weights."""
    if variant.keys() != lane.keys():
        raise PrismqError("a variant must assign the same targets as its lane")
    changes: dict[int, dict[str, str]] = {}
    for name, fmt in variant.items():
        if fmt != lane[name] or method_differs and get_format(fmt).rounds_weights:
            index = stream.layer_of(name)
            if index is None:
                raise PrismqError(f"{name}: a variant can change only targets inside the decoder layers")
            changes.setdefault(index, {})[name] = fmt
    return changes


@torch.no_grad()
def round_lanes(stream: LayerStream, candidates: list[tuple[dict[str, str], Method]],
                calibration: torch.Tensor | None,
                heldout: torch.Tensor, input_amax: dict[str, torch.Tensor], settings: GPTQSettings | None = None,
                *, batch_size: int = 4, reference_hidden: list[torch.Tensor] | None = None,
                spill_dir: Path | None = None, state: WalkState | None = None, chunk_size: int = DEFAULT_CHUNK,
                progress: bool = True, variants: list[VariantSpec] | None = None,
                ranks: Ranks | None = None) -> LaneResults:
    """Round every (assignment, method) candidate layer by layer in one streamed walk and measure its held-out KL.

    The tensors shipped for each candidate equal `round_model`'s on a whole model with the same inputs (calibration
    blocks in batches of `batch_size`, None when every method is rtn; held-out blocks one at a time, as the KL
    evaluator runs them). `variants`: (lane index, assignment) pairs, or (lane index, assignment, method) triples,
    each rounded (by the lane's method unless one is given) and measured as a variant of that lane (see the module
    docstring).
    `reference_hidden`, from an earlier walk over the same held-out blocks, spares the reference's forward.
    `spill_dir`: each candidate's tensors go to a subdirectory of it layer by layer (`EncodedStore`) instead of
    staying in memory. `state` (with `spill_dir`): the walk snapshots its hidden states there after a layer
    (`WalkState.checkpoint`), and a rerun with the same state resumes after the last layer snapshotted.
    `ranks`: processes walking together (`rounding_walk`), each encoding its share of every layer's groups
    (`round_layer`); a rank other than the leader keeps no tensors past their layer (`PassingStore`), and none
    snapshots (`Ranks.own`)."""
    ranks = ranks or Ranks()
    state = ranks.own(state)
    specs = [(spec[0], spec[1], spec[2] if len(spec) == 3 else candidates[spec[0]][1])  # type: ignore[misc]
             for spec in variants or []]
    methods = [m for _, m in candidates] + [m for _, _, m in specs]
    for method in methods:
        if method not in METHODS:
            raise PrismqError(f"unknown rounding {method!r} (choose from {', '.join(METHODS)})")
    if calibration is None and any(m != "rtn" for m in methods):
        raise PrismqError("GPTQ needs calibration blocks")
    settings = settings or GPTQSettings()
    groups = [_by_layer(stream, assignment) for assignment, _ in candidates]
    first_calibration = [] if calibration is None else stream.first_inputs(calibration, batch_size)
    first_heldout = stream.first_inputs(heldout)
    if state is not None and spill_dir is None:
        raise PrismqError("a resumable rounding walk needs a spill directory for its tensors")
    saved = state.load(LANES) if state is not None else None
    start = 0 if saved is None else saved[1]["layer"]

    def store(name: str) -> RoundedModel:
        if not ranks.leader:
            return RoundedModel(PassingStore())
        return RoundedModel({} if spill_dir is None else EncodedStore(Path(spill_dir) / name, fresh=saved is None))

    lanes = [Lane(assignment, method, first_calibration, first_heldout, store(f"candidate-{k}"))
             for k, (assignment, method) in enumerate(candidates)]
    branches = [Variant(k, method, _changes(stream, candidates[k][0], assignment, method != candidates[k][1]),
                        rounded=store(f"variant-{j}"))
                for j, (k, assignment, method) in enumerate(specs)]
    for k, lane in enumerate(lanes):
        lane.calibrated = any(m != "rtn" for m in [lane.method, *(b.method for b in branches if b.lane == k)])
    reference = None if reference_hidden is not None else first_heldout
    if saved is not None:
        reference = _restore(saved, lanes, branches, reference, stream)
    hidden_bytes = sum(h.numel() * h.element_size() for lane in lanes for h, _ in [*lane.calibration, *lane.heldout])
    hidden_bytes += len(branches) * sum(h.numel() * h.element_size() for h, _ in first_heldout)
    if stream.device.type != "cpu" and stream.layer_copies(reserved=hidden_bytes) < 1:
        logger.info("the candidates' hidden states (%.2f GB) do not fit on %s beside a layer: kept in host memory",
                    hidden_bytes / 1e9, stream.device)
        for lane in lanes:
            lane.calibration, lane.heldout = spill(lane.calibration), spill(lane.heldout)
        for branch in branches:
            branch.heldout = None if branch.heldout is None else spill(branch.heldout)
        hidden_bytes = 0
    share = stream.layer_copies(reserved=hidden_bytes) > 2  # the layer as read, a lane's copy, a variant's
    desc = f"round {len(lanes)} candidate(s)" + (f" + {len(branches)} variant(s)" if branches else "")
    for index in tqdm(range(start, len(stream)), initial=start, total=len(stream), desc=desc, unit="layer",
                      disable=not progress):
        with ExitStack() as files:
            original = files.enter_context(stream.layer(index)) if share else None

            def as_read(original: nn.Module | None = original, index: int = index) -> AbstractContextManager:
                """A copy of the layer as read: from the one held, else read again."""
                return nullcontext(copy.deepcopy(original)) if original is not None else stream.layer(index)

            if reference is not None:
                with nullcontext(original) if original is not None else stream.layer(index) as layer:
                    reference = run_layer(layer, reference)
            for k, lane in enumerate(lanes):
                with as_read() as layer:
                    _advance(stream, index, layer, lane, groups[k].get(index, []),
                             [b for b in branches if b.lane == k], input_amax, settings, as_read, ranks)
        if state is not None:
            _save(state, index + 1, lanes, branches, reference)
    _encode_outside(stream, lanes)
    if reference is not None:
        reference_hidden = stream.final_states(reference)
    assert reference_hidden is not None
    walked = [lane.heldout for lane in lanes]
    walked += [lanes[b.lane].heldout if b.heldout is None else b.heldout for b in branches]
    candidates_hidden = [stream.final_states(inputs) for inputs in walked]
    kl = evaluate_states(HiddenStates(stream.head, heldout, reference_hidden),
                         [HiddenStates(stream.head, heldout, hidden) for hidden in candidates_hidden], heldout,
                         chunk_size, progress)
    return LaneResults([lane.rounded for lane in lanes] + [b.rounded for b in branches], kl, reference_hidden)


def _save(state: WalkState, layer: int, lanes: list[Lane], branches: list[Variant],
          reference: list[LayerInput] | None) -> None:
    """Snapshot the walk before decoder layer `layer`: every lane's hidden states and GPTQ details (its tensors so
    far are already in its store), the variants' held-out hidden states once branched off, and the reference's
    held-out hidden states."""
    tensors: dict[str, torch.Tensor] = {}
    for number, lane in enumerate(lanes):
        if lane.calibrated:  # round-to-nearest alone never advances its calibration inputs
            tensors.update(pack(f"lane{number}.calibration", [h for h, _ in lane.calibration]))
        tensors.update(pack(f"lane{number}.heldout", [h for h, _ in lane.heldout]))
    for number, branch in enumerate(branches):
        if branch.heldout is not None:
            tensors.update(pack(f"variant{number}.heldout", [h for h, _ in branch.heldout]))
    if reference is not None:
        tensors.update(pack("reference", [h for h, _ in reference]))
    state.checkpoint(LANES, tensors, layer=layer, details=[lane.rounded.details for lane in lanes],
                     branched=[n for n, b in enumerate(branches) if b.heldout is not None],
                     variant_details=[b.rounded.details for b in branches])


def _restore(saved: tuple, lanes: list[Lane], branches: list[Variant], reference: list[LayerInput] | None,
             stream: LayerStream) -> list[LayerInput] | None:
    """Put a snapshot's hidden states and details back into the lanes and variants (their keyword arguments are
    the first layer's, recomputed); returns the reference's hidden states."""
    stored, meta = saved

    def restored(prefix: str, inputs: list[LayerInput]) -> list[LayerInput]:
        hidden = unpack(stored, prefix, stream.device, stream.dtype)
        return [(h, kwargs) for h, (_, kwargs) in zip(hidden, inputs)]

    for number, (lane, details) in enumerate(zip(lanes, meta["details"])):
        if lane.calibrated:
            lane.calibration = restored(f"lane{number}.calibration", lane.calibration)
        lane.heldout = restored(f"lane{number}.heldout", lane.heldout)
        lane.rounded.details = {name: tuple(value) for name, value in details.items()}
    for number in meta.get("branched", []):
        branches[number].heldout = restored(f"variant{number}.heldout", lanes[0].heldout)
    for branch, details in zip(branches, meta.get("variant_details", [])):
        branch.rounded.details = {name: tuple(value) for name, value in details.items()}
    return None if reference is None else restored("reference", reference)


def _advance(stream: LayerStream, index: int, layer: nn.Module, lane: Lane, groups: list[list[str]],
             branches: list[Variant], input_amax: dict[str, torch.Tensor], settings: GPTQSettings,
             as_read: Callable[[], AbstractContextManager], ranks: Ranks) -> None:
    """Round the lane's copy of layer `index` (and its variants' changes there, on the same Hessians) and move the
    lane's and its variants' hidden states through it."""
    for branch in branches:
        if branch.heldout is None and index == min(branch.changes, default=-1):
            branch.heldout = lane.heldout  # the variant branches off here
    others: dict[str, set[tuple[str, Method]]] = {}
    for branch in branches:
        for name, fmt in branch.changes.get(index, {}).items():
            others.setdefault(name, set()).add((fmt, branch.method))
    extra: dict = {}
    details: dict[str, tuple[str, float, float]] = {}
    if groups:
        extra = round_layer(layer, stream.layer_names(index, layer), groups, lane.assignment, lane.method,
                            lane.calibration, input_amax, settings, stream.weight_dtype, lane.rounded, stream.targets,
                            others=others, source=stream.source, variant_details=details, ranks=ranks)
    here = {name: lane.assignment[name] for group in groups for name in group}
    for branch in branches:
        if branch.heldout is None:
            continue
        changed = branch.changes.get(index)
        if not changed:
            branch.heldout = run_layer(layer, branch.heldout)
            continue
        keys = {name: variant_key(name, fmt, branch.method) for name, fmt in changed.items()}
        branch.rounded.encoded.update({name: extra[key] for name, key in keys.items()})
        branch.rounded.details.update({name: details[key] for name, key in keys.items() if key in details})
        tensors = {name: branch.rounded.encoded[name] if name in changed else lane.rounded.encoded[name]
                   for name in here}
        with as_read() as copied:
            apply_fake_quant(stream.layer_names(index, copied), {**here, **changed}, tensors, stream.weight_dtype,
                             stream.targets)
            branch.heldout = run_layer(copied, branch.heldout)
        if not isinstance(branch.rounded.encoded, dict):
            branch.rounded.encoded.flush()
    if lane.calibrated:  # round-to-nearest alone never looks at its inputs
        lane.calibration = run_layer(layer, lane.calibration)
    lane.heldout = run_layer(layer, lane.heldout)
    if not isinstance(lane.rounded.encoded, dict):
        lane.rounded.encoded.flush()


def _encode_outside(stream: LayerStream, lanes: list[Lane]) -> None:
    """The BF16 tensors of assigned Linears outside the decoder layers (lm_head), from the resident modules."""
    from prismq.export.encode import encode_model

    for lane in lanes:
        outside = {n: f for n, f in lane.assignment.items() if n not in lane.rounded.encoded}
        lane.rounded.encoded.update(encode_model(stream.model, outside, {}, stream.weight_dtype))
        if not isinstance(lane.rounded.encoded, dict):
            lane.rounded.encoded.flush()


def rounding_walk(model_dir: Path, dtype: torch.dtype, device: str, max_memory: int | None,
                  candidates: list[tuple[dict[str, str], Method]], calibration: torch.Tensor | None,
                  heldout: torch.Tensor, input_amax: dict[str, torch.Tensor], settings: GPTQSettings,
                  spill_dir: Path, state: WalkState, variants: list[VariantSpec]) -> LaneResults:
    """`round_lanes` on the model streamed on this rank's device: on every rank of a run on several processes
    (`run_everywhere`), each encoding its share of every layer's groups; the leader alone keeps the tensors (in
    `spill_dir`) and, walking alone, snapshots in `state`."""
    ranks = Ranks.current()
    with LayerStream(model_dir, dtype, ranks.device(resolve_device(device)), max_memory) as stream:
        return round_lanes(stream, candidates, calibration, heldout, input_amax, settings, spill_dir=spill_dir,
                           state=state, progress=ranks.leader, variants=variants, ranks=ranks)
