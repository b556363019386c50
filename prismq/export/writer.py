"""Write a compressed-tensors checkpoint from a source Hugging Face directory and an assignment {Linear -> format}.

The source is streamed tensor by tensor from its safetensors; output shards are flushed as they fill, so peak
memory is about one shard plus one sibling group. Everything is written into a temporary directory beside the
target and renamed into place only when complete: an interrupted export leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
from collections import Counter
import shutil
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from prismq.errors import PrismqError
from prismq.export.encode import encode_group, source_block_scales
from prismq.export.qconfig import quantization_config, unloaded_roots
from prismq.export.shards import ShardWriter
from prismq.formats import Tensors, get_format
from prismq.model.assignment import check_assignment
from prismq.model.targets import Target, model_targets
from prismq.model.checkpoint import SourceTensors
from prismq.model.check import mtp_as_stored
from prismq.model.siblings import EXPERT, fused_name

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
@dataclass(frozen=True)
class ExportResult:
    """What was written: where, how many bytes of tensors, the bytes of the assigned Linears alone, and those of the
    vision tower's Linears (`--vision-format`)."""

    path: Path
    checkpoint_bytes: int
    linear_bytes: int
    linear_params: int
    vision_bytes: int = 0
    vision_params: int = 0

    @property
    def linear_bits_per_param(self) -> float:
        """8 * bytes / weights over the assigned Linears (every scale counted)."""
        return 8 * self.linear_bytes / max(self.linear_params, 1)


def _group_tensors(group: list[str], assignment: dict[str, str], source: SourceTensors, targets: dict[str, Target],
                   encoded: Mapping[str, Tensors], input_amax: dict[str, torch.Tensor]) -> dict[str, Tensors]:
    """The tensors of one sibling group: pre-encoded ones checked against the format's specs, the rest encoded."""
    fmt = get_format(assignment[group[0]])
    for name in group:
        if name in encoded:
            expected = fmt.tensor_specs(targets[name].shape, source.dtype(targets[name].key))
            got = {k: (t.dtype, tuple(t.shape)) for k, t in encoded[name].items()}
            if got != expected:
                raise PrismqError(f"{name}: pre-encoded tensors {got} do not match what {fmt.name} ships: {expected}")
    if all(name in encoded for name in group):
        return {name: encoded[name] for name in group}
    fresh = encode_group(fmt.name, {name: targets[name].read(source) for name in group}, input_amax,
                         block_scales=source_block_scales(fmt.name, {n: targets[n] for n in group}, source))
    return {name: encoded.get(name, fresh[name]) for name in group}


def _kept_fused(groups: list[list[str]], assignment: dict[str, str], targets: dict[str, Target]) -> bool:
    """Whether a checkpoint tensor holding several experts' matrices is written whole, as stored: all of them stay in
    the model dtype (vLLM loads a fused unquantized expert tensor; a quantized one only per expert)."""
    names = [name for group in groups for name in group]
    return targets[names[0]].stored_fused and all(get_format(assignment[n]).scheme() is None for n in names)


@contextmanager
def atomic_directory(target: Path, overwrite: bool) -> Iterator[Path]:
    """A fresh temporary directory beside `target` that replaces it only if the block completes."""
    if target.exists() and not overwrite:
        raise PrismqError(f"output {target} already exists (pass --overwrite to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        if target.exists():
            retired = target.parent / f".{target.name}.old-{os.getpid()}"
            target.rename(retired)
            staging.rename(target)
            shutil.rmtree(retired)
        else:
            staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_checkpoint(source_dir: Path, assignment: dict[str, str], out_dir: Path, *,
                     encoded: Mapping[str, Tensors] | None = None, input_amax: dict[str, torch.Tensor] | None = None,
                     max_shard_bytes: int = 5 * 10**9, overwrite: bool = False,
                     progress: bool = True, vision: dict[str, str] | None = None) -> ExportResult:
    """Write `source_dir` with each Linear of `assignment` encoded in its format, as a compressed-tensors checkpoint.

    encoded: tensors already produced by a codec (e.g. by GPTQ) for some Linears; checked against the format's
    tensor specs and written as they are. input_amax: calibrated input absolute maxima, needed by formats with a
    static input scale (NVFP4 W4A4); fused siblings use their joint maximum. vision: the vision tower's Linears
    (stored name -> format, `prismq.model.vision`), rounded to nearest; BF16 ones pass through as stored. An MTP
    head's Linears a block-FP8 source stores so ship as stored (FP8_SOURCE, targets of the config) when their
    shape allows, other tensors the model does not load as stored (FP8 ones dequantized).
    """
    encoded, input_amax, vision = encoded or {}, input_amax or {}, vision or {}
    source_dir, out_dir = Path(source_dir), Path(out_dir)
    config = json.loads((source_dir / "config.json").read_text())
    with ExitStack() as stack:
        source = SourceTensors(source_dir, stack)
        targets = {name: t for name, t in model_targets(source_dir, head=True).items() if t.key in source.location}
        shapes = {name: target.shape for name, target in targets.items()}
        check_assignment(assignment, shapes)  # errors reported in the caller's order
        order = {name: position for position, name in enumerate(source.names())}
        # written in the checkpoint's own order, not the assignment's: a resumed run (its assignment read back from
        # JSON) writes the same bytes as an uninterrupted one
        assignment = dict(sorted(assignment.items(), key=lambda item: (order[targets[item[0]].key], item[0])))
        groups = check_assignment(assignment, shapes)
        for name, format_name in assignment.items():
            if get_format(format_name).needs_input_amax and name not in input_amax and name not in encoded:
                raise PrismqError(f"{name}: {format_name} needs the calibrated input absmax of this Linear")
        staging = stack.enter_context(atomic_directory(out_dir, overwrite))
        shards = ShardWriter(staging, max_shard_bytes)
        replaced: dict[str, list[list[str]]] = {}  # checkpoint tensor -> the groups whose targets it holds
        for group in groups:
            for key in dict.fromkeys(targets[name].key for name in group):
                replaced.setdefault(key, []).append(group)
        holders = Counter(target.key for target in targets.values())
        assigned = Counter(targets[name].key for name in assignment)
        for key in replaced:
            if assigned[key] != holders[key]:
                raise PrismqError(f"{key} holds {holders[key]} experts' matrices: the assignment must give all of them "
                                  "a format (one per layer's experts), not some")
        linear_bytes = linear_params = vision_bytes = vision_params = 0
        written_groups: set[int] = set()
        layers = (config.get("text_config") or config).get("num_hidden_layers")
        mtp_fp8 = mtp_as_stored(source, [key for key in source.names() if key not in replaced], layers)
        for key in tqdm(source.names(), desc="export", unit="tensor", disable=not progress):
            stem = key.removesuffix(".weight")
            if stem in mtp_fp8:  # an MTP head's Linear stored in block FP8: shipped as stored (FP8_SOURCE's layout)
                stored = get_format("FP8_SOURCE").stored_tensors(source.stored(key), source.block_scales(key))
                for suffix, tensor in stored.items():
                    shards.add(f"{stem}.{suffix}", tensor)
                continue
            if key not in replaced and get_format(vision.get(stem, "BF16")).scheme() is not None:
                weight = source.get(key)
                for suffix, tensor in encode_group(vision[stem], {stem: weight}, {})[stem].items():
                    shards.add(f"{stem}.{suffix}", tensor)
                    vision_bytes += tensor.numel() * tensor.element_size()
                vision_params += weight.numel()
                continue
            if key not in replaced:
                tensor = source.get(key)
                shards.add(key, tensor)
                if stem in vision:  # a vision Linear kept BF16
                    vision_bytes += tensor.numel() * tensor.element_size()
                    vision_params += tensor.numel()
                continue
            if _kept_fused(replaced[key], assignment, targets):  # a fused expert tensor kept whole, as stored
                shards.add(key, source.get(key))
                linear_bytes += source.nbytes(key)
                linear_params += sum(targets[name].params for group in replaced[key] for name in group)
                continue
            for group in replaced[key]:
                if id(group) in written_groups:
                    continue
                written_groups.add(id(group))
                for name, tensors in _group_tensors(group, assignment, source, targets, encoded, input_amax).items():
                    for suffix, tensor in tensors.items():
                        shards.add(f"{name}.{suffix}", tensor)
                        linear_bytes += tensor.numel() * tensor.element_size()
                    linear_params += targets[name].params
        total = shards.close()
        # vLLM asks about a fused layer by its members' names where the model maps them, else by its own: both named
        fused = {fused_name(name): "FP8_SOURCE" for name in mtp_fp8 if EXPERT.match(name) is None}
        kept = {**mtp_fp8, **fused}
        unloaded = unloaded_roots([key for key in source.names() if key not in replaced], layers, kept)
        config["quantization_config"] = quantization_config({**assignment, **vision, **kept}, unloaded)
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for item in source_dir.iterdir():
            if item.is_file() and item.name != "config.json" and not item.name.endswith(WEIGHT_SUFFIXES) \
                    and item.name not in WEIGHT_INDEXES:
                shutil.copy2(item, staging / item.name)
    return ExportResult(out_dir, total, linear_bytes, linear_params, vision_bytes, vision_params)
