"""End-to-end KL of variants of the shipped rounding, each measured with exactly the tensors it would ship.

The base is what the round stage ships: an assignment and its tensors (GPTQ, scale sweep, clipped input ranges). A
variant gives a few decision units other formats. Its changed units are rounded as the round stage would round them
in that walk: by the same method, on the base's calibration hidden states at their layer (the outputs of the base's
already rounded layers), every Hessian taken on the layer as read; every other target keeps the base's tensors. So
what a variant measures is what it ships. Rounded units go to a store keyed by (name, format) (`variant_key`), where
a later walk of the same base and the export take them from instead of rounding again.

Lanes of one streamed walk: the unquantized reference and the base on the token blocks, the base's calibration
hidden states (when the method reads them, up to the last layer with a unit still to round), and per variant a lane
that starts at its first changed layer from the base lane's hidden states there (tail replay). Each layer is read
once; a variant changing a layer runs its own copy.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from prismq.engine.distributed import Ranks
from prismq.engine.layer_inputs import LayerInput
from prismq.engine.stream import LayerStream, run_layer, spill
from prismq.engine.walkstate import WalkState, pack, unpack
from prismq.errors import PrismqError
from prismq.export.encode import encode_model
from prismq.formats import Tensors, get_format
from prismq.measure.kl import DEFAULT_CHUNK, KLResult
from prismq.model.fake_quant import apply_fake_quant
from prismq.model.source import resolve_device
from prismq.model.siblings import sibling_groups
from prismq.rounding.gptq import GPTQSettings
from prismq.rounding.sequential import Method, RoundedModel, round_layer
from prismq.rounding.store import EncodedStore, PassingStore, variant_key
from prismq.select.measured import lanes_kl

VARIANTS = "variants"  # the walk's snapshot: every lane's hidden states before its next layer


class Overlay(Mapping[str, Tensors]):
    """The base's tensors with some targets' replaced by a variant's (read from the store when asked for)."""

    def __init__(self, base: Mapping[str, Tensors], store: Mapping[str, Tensors], changes: dict[str, str]) -> None:
        self.base, self.store, self.changes = base, store, changes

    def __getitem__(self, name: str) -> Tensors:
        if name in self.changes:
            return self.store[variant_key(name, self.changes[name])]
        return self.base[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)


class RoundedVariants(Mapping[str, Tensors]):
    """Variants' tensors rounded already, by store key (`variant_key`), read where they lie when asked for: a walk
    that rounds nothing (`measure_variants` with every variant's tensors here) copies none of them."""

    def __init__(self, tensors: dict[str, tuple[Mapping[str, Tensors], str]]) -> None:
        self.tensors = tensors  # store key -> (the mapping holding the tensors, their name there)

    def __getitem__(self, key: str) -> Tensors:
        holder, name = self.tensors[key]
        return holder[name]

    def __contains__(self, key: object) -> bool:
        return key in self.tensors  # without reading the tensors, as Mapping's would

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def update(self, tensors: Mapping[str, Tensors]) -> None:
        raise PrismqError("these variants' tensors were rounded already; nothing is added to them")

    def flush(self) -> None:
        """Nothing to write: the tensors stay where they are."""


@dataclass
class VariantsKL:
    """The KL statistics of the base and of each variant, in that order, and the reference's final hidden states per
    block (what a later comparison on the same blocks reuses instead of running the reference again)."""

    kl: list[KLResult]
    reference_hidden: list[torch.Tensor]


def _round_here(stream: LayerStream, index: int, layer: torch.nn.Module, needed: set[tuple[str, str]],
                base: dict[str, str], method: Method, calibration: list[LayerInput],
                input_amax: dict[str, torch.Tensor], settings: GPTQSettings,
                store: EncodedStore | RoundedVariants | PassingStore, ranks: Ranks) -> None:
    """Round the targets of layer `index` in `needed` ((name, format) pairs) as the round stage would, one format
    at a time on a scratch copy of the layer as read (their groups dealt to `ranks`), and add their tensors to the
    store."""
    for fmt in sorted({f for _, f in needed}):
        names = sorted(n for n, f in needed if f == fmt)
        scratch = copy.deepcopy(layer)
        modules = stream.layer_names(index, scratch)
        assignment = {**base, **dict.fromkeys(names, fmt)}
        if not get_format(fmt).rounds_weights:  # kept as read (BF16) or as stored (FP8_SOURCE): nothing to round
            tensors = encode_model(modules, dict.fromkeys(names, fmt), input_amax, stream.weight_dtype,
                                   stream.targets, stream.source)
        else:
            rounded = RoundedModel({})
            round_layer(scratch, modules, sibling_groups(names), assignment, method, calibration, input_amax,
                        settings, stream.weight_dtype, rounded, stream.targets, source=stream.source, ranks=ranks)
            tensors = rounded.encoded
        store.update({variant_key(n, fmt): tensors[n] for n in names})
        del scratch


@torch.no_grad()
def measure_variants(stream: LayerStream, base: dict[str, str], base_tensors: Mapping[str, Tensors],
                     variants: list[dict[str, str]], blocks: torch.Tensor, calibration: torch.Tensor | None,
                     method: Method, input_amax: dict[str, torch.Tensor], settings: GPTQSettings,
                     store: EncodedStore | RoundedVariants | PassingStore, chunk_size: int = DEFAULT_CHUNK,
                     progress: bool = True, state: WalkState | None = None, ranks: Ranks | None = None) -> VariantsKL:
    """KL statistics of the base and of each variant (`base` with the variant's formats) on token `blocks`, in
    that order (see the module docstring), and the reference's final hidden states. `calibration`: the blocks the
    round stage rounded on (in batches of 4, as it does; None when the method is rtn or every variant's tensors are
    in the store already). `state`: every lane's hidden states are snapshotted there after a layer
    (`WalkState.checkpoint`), and a rerun with the same state (and store) resumes after the last layer
    snapshotted. `ranks`: processes walking together (`variants_walk`), each measuring the variants dealt to it
    and rounding its share of every layer's units to round, none snapshotting (`Ranks.own`); every rank gets
    every KL (the store: see `variants_walk`)."""
    ranks = ranks or Ranks()
    state = ranks.own(state)
    mine = [number for number in range(len(variants)) if ranks.mine(number)]
    starts: dict[int, list[int]] = {}
    for number, variant in enumerate(variants):
        layers = [stream.layer_of(name) for name in variant]
        if not variant or any(index is None for index in layers):
            raise ValueError(f"variant {number} changes nothing or something outside the decoder layers")
        if number in mine:
            starts.setdefault(min(layers), []).append(number)  # type: ignore[type-var]
    reference = stream.first_inputs(blocks)
    # the base's calibration hidden states are needed up to the last layer with a unit to round (by GPTQ) yet
    to_round = [stream.layer_of(n) or 0 for variant in variants for n, f in variant.items()
                if variant_key(n, f) not in store and get_format(f).rounds_weights]
    last_rounded = max(to_round, default=-1)
    calibrating = method != "rtn" and last_rounded >= 0
    calib = stream.first_inputs(calibration, 4) if calibrating and calibration is not None else []
    if calibrating and not calib:
        raise ValueError("rounding by GPTQ needs the calibration blocks")
    lane_bytes = sum(h.numel() * h.element_size() for h, _ in [*reference, *calib])
    if stream.device.type != "cpu" and stream.layer_copies(reserved=(len(mine) + 2) * lane_bytes) < 2:
        reference, calib = spill(reference), spill(calib)
    base_lane, lanes = reference, {}
    saved = state.load(VARIANTS) if state is not None else None
    start = 0 if saved is None else saved[1]["layer"]
    if saved is not None:
        def restored(prefix: str, like: list[LayerInput]) -> list[LayerInput]:
            hidden = unpack(saved[0], prefix, like[0][0].device, stream.dtype)
            return [(h, kwargs) for h, (_, kwargs) in zip(hidden, like)]

        reference, base_lane = restored("reference", reference), restored("base", reference)
        calib = restored("calibration", calib) if calibrating and start <= last_rounded else []
        lanes = {number: restored(f"variant{number}", reference) for number in saved[1]["lanes"]}
    for index in tqdm(range(start, len(stream)), initial=start, total=len(stream),
                      desc=f"measure {len(variants)} variant(s) as shipped", unit="layer",
                      disable=not (progress and ranks.leader)):
        with stream.layer(index) as layer:
            modules = stream.layer_names(index, layer)
            reference = run_layer(layer, reference)
            layer_base = {n: f for n, f in base.items() if stream.layer_of(n) == index}
            here = {number: {n: f for n, f in variant.items() if stream.layer_of(n) == index}
                    for number, variant in enumerate(variants)}
            needed = {(n, f) for changes in here.values() for n, f in changes.items()
                      if variant_key(n, f) not in store}
            if needed:
                _round_here(stream, index, layer, needed, layer_base, method, calib, input_amax, settings, store,
                            ranks)
            lanes.update({number: base_lane for number in starts.get(index, [])})
            changed = {}
            for number, hidden in lanes.items():
                if here[number]:
                    copied = copy.deepcopy(layer)
                    apply_fake_quant(stream.layer_names(index, copied), {**layer_base, **here[number]},
                                     Overlay({n: base_tensors[n] for n in layer_base}, store, here[number]),
                                     stream.weight_dtype, stream.targets)
                    changed[number] = run_layer(copied, hidden)
                    del copied
            apply_fake_quant(modules, layer_base, {n: base_tensors[n] for n in layer_base}, stream.weight_dtype,
                             stream.targets)
            base_lane = run_layer(layer, base_lane)
            calib = run_layer(layer, calib) if calibrating and index < last_rounded else []
            lanes = {number: changed[number] if number in changed else run_layer(layer, hidden)
                     for number, hidden in lanes.items()}
        store.flush()
        if state is not None:
            tensors = {**pack("reference", [h for h, _ in reference]), **pack("base", [h for h, _ in base_lane])}
            if calib:
                tensors.update(pack("calibration", [h for h, _ in calib]))
            for number, hidden in lanes.items():
                tensors.update(pack(f"variant{number}", [h for h, _ in hidden]))
            state.checkpoint(VARIANTS, tensors, layer=index + 1, lanes=sorted(lanes))
    reference_hidden = stream.final_states(reference)
    base_kl, *own = lanes_kl(stream, blocks, reference_hidden, [base_lane, *(lanes[number] for number in mine)],
                             chunk_size, progress and ranks.leader)
    measured = ranks.gather(dict(zip(mine, own)))
    return VariantsKL([base_kl, *(measured[number] for number in range(len(variants)))], reference_hidden)


def variants_walk(model_dir: Path, dtype: torch.dtype, device: str, max_memory: int | None, base: dict[str, str],
                  base_tensors: Mapping[str, Tensors], variants: list[dict[str, str]], blocks: torch.Tensor,
                  calibration: torch.Tensor | None, method: Method, input_amax: dict[str, torch.Tensor],
                  settings: GPTQSettings, store: EncodedStore | RoundedVariants, state: WalkState) -> VariantsKL:
    """`measure_variants` on the model streamed on this rank's device: on every rank of a run on several processes
    (`run_everywhere`), each measuring its share of the variants. The leader alone writes `store` (and, walking
    alone, snapshots in `state`); another rank reads what the store held when the walk began and keeps what the
    walk rounds only until its layer is done (`PassingStore`)."""
    ranks = Ranks.current()
    kept = store if ranks.leader or isinstance(store, RoundedVariants) else PassingStore(store)  # the latter: read-only
    with LayerStream(model_dir, dtype, ranks.device(resolve_device(device)), max_memory) as stream:
        return measure_variants(stream, base, base_tensors, variants, blocks, calibration, method, input_amax,
                                settings, kept, state=state, ranks=ranks)
