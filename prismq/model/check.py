"""`prismq check MODEL`: what prismq will do with a checkpoint, and whether it can, before any compute.

Built from the config and the safetensors headers alone (the architecture on the meta device, no weight read):
every parameter of the model is found among the checkpoint's tensors (directly, renamed, or as per-expert slices of
a fused expert parameter, `prismq.model.layout`); every quantization target lies in exactly one decision unit; each
unit's offered formats; what stays in the model dtype and why (routers, lm_head, embeddings, routed experts a
checkpoint stores fused); the vision tower's Linears and their format (`prismq.model.vision`); and checkpoint
tensors the model does not load (MTP heads, a vision tower kept BF16), which the exporter passes through byte for
byte (an MTP head's Linears a block-FP8 checkpoint stores in FP8: as stored, FP8_SOURCE; other FP8 tensors:
dequantized).
"""

from __future__ import annotations

import json
import re
import warnings
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch

from prismq.errors import PrismqError
from prismq.formats.fp8_source import keeps_stored, partial_rows_last
from prismq.model.checkpoint import SourceTensors
from prismq.model.layout import CheckpointLayout
from prismq.model.linears import meta_model, unloaded_root, unsupported_quantization
from prismq.model.targets import model_targets, targets_of
from prismq.model.siblings import stacking_order, unit_groups
from prismq.model.units import UNQUANTIZED_LEAVES, Unit, decision_units, legal_formats
from prismq.model.vision import VISION_PART, vision_assignment


@dataclass
class CheckReport:
    """The outcome of `check_model`: the units with their offered formats, and every finding."""

    model_type: str
    units: list[tuple[Unit, list[str]]]
    kept: Counter[str] = field(default_factory=Counter)  # what stays in the model dtype -> weights
    passthrough: list[str] = field(default_factory=list)  # checkpoint tensors the model does not load
    fp8_as_stored: set[str] = field(default_factory=set)  # those of them stored in block FP8, shipped as stored
    dequantized: set[str] = field(default_factory=set)  # those of them stored in block FP8, written dequantized
    num_layers: int | None = None  # decoder layers the model has (a layer past them is an MTP head)
    vision: dict[str, str] = field(default_factory=dict)  # the vision tower's Linears -> format (`--vision-format`)
    problems: list[str] = field(default_factory=list)  # what makes quantization impossible

    def table(self) -> str:
        """The report as text: units by kind, what is kept and passed through, problems."""
        kinds = Counter(unit.name.rsplit(".", 1)[-1] for unit, _ in self.units)
        lines = [f"model_type {self.model_type}: {len(self.units)} decision units "
                 f"({sum(len(u.members) for u, _ in self.units)} quantization targets)",
                 f"{'unit kind':<24} {'units':>6}  offered formats"]
        for kind, count in sorted(kinds.items(), key=lambda item: -item[1]):
            offered = next(f for u, f in self.units if u.name.rsplit(".", 1)[-1] == kind)
            lines.append(f"{kind:<24} {count:>6}  {','.join(offered) or '-'}")
        for what, params in self.kept.items():
            lines.append(f"kept in the model dtype: {what} ({params:,} weights)")
        if self.vision:
            counts = Counter(self.vision.values())
            lines.append(f"vision tower: {len(self.vision)} Linears, " + ", ".join(
                f"{count} {fmt}" + (" (rounded to nearest, not measured)" if fmt != "BF16" else "")
                for fmt, count in counts.items()) + "; each named in the export's quantization config")
        for part, names in _passthrough_parts(self.passthrough, self.num_layers).items():
            kept, dequantized = (sum(name in fp8 for name in names) for fp8 in (self.fp8_as_stored, self.dequantized))
            lines.append(f"passed through byte for byte (the model does not load them): {part}, {len(names)} "
                         f"tensors, e.g. {names[0]}"
                         + (f"; {kept} of them stored in block FP8, shipped so (FP8_SOURCE)" if kept else "")
                         + (f"; {dequantized} of them stored in block FP8, written dequantized" if dequantized
                            else ""))
        lines += [f"problem: {problem}" for problem in self.problems]
        lines.append("ok" if not self.problems else f"{len(self.problems)} problem(s)")
        return "\n".join(lines)


MTP_PART = "MTP head (vLLM builds it from the source tensors)"
PASSTHROUGH_PARTS = (  # (what, how its tensors are recognized), first match wins; MTP heads: `unloaded_root`
    ("vision tower", VISION_PART),
    ("audio tower (BF16)", re.compile(r"(^|\.)(audio_tower|audio_model|audio)\.")),
)


def _passthrough_parts(names: list[str], num_layers: int | None) -> dict[str, list[str]]:
    """Passed-through tensor names by the part of the model they belong to (MTP head, vision tower, ..., other)."""
    parts: dict[str, list[str]] = {}
    for name in names:
        part = MTP_PART if unloaded_root(name, num_layers) is not None else \
            next((what for what, pattern in PASSTHROUGH_PARTS if pattern.search(name)), "other tensors")
        parts.setdefault(part, []).append(name)
    return parts


MTP_UNQUANTIZED_LEAVES = frozenset({"eh_proj", "head", "embed_tokens"})  # DeepSeek's MTP: plain nn.Linear, heads


def mtp_as_stored(source: SourceTensors, keys: list[str], layers: int | None) -> dict[str, str]:
    """The MTP heads' Linears (among `keys`, the tensors no unit replaces) that ship as stored in block FP8 ->
    "FP8_SOURCE", decided per vLLM layer: all of a layer's members (a fused q_a / kv_a, every routed expert of a
    layer) stored in 128 x 128 block FP8 in shapes FP8_SOURCE takes, a partial block of rows only last, and a layer
    vLLM builds quantized (not a router, DeepSeek's `eh_proj` or a head); any other is written as read
    (dequantized where stored in FP8)."""
    linears = [key.removesuffix(".weight") for key in keys if key.endswith(".weight")
               and len(source.shape(key)) == 2 and unloaded_root(key, layers) is not None]
    kept: dict[str, str] = {}
    for group in unit_groups(linears):
        group = sorted(group, key=stacking_order)  # the file's order may not be vLLM's (kv_a before q_a)
        shapes = [source.shape(f"{name}.weight") for name in group]
        if all(f"{name}.weight" in source.scales and keeps_stored(source.block, shape)
               and name.rpartition(".")[2] not in UNQUANTIZED_LEAVES | MTP_UNQUANTIZED_LEAVES
               for name, shape in zip(group, shapes)) and partial_rows_last(shapes):
            kept.update(dict.fromkeys(group, "FP8_SOURCE"))
    return kept


def check_model(model_dir: Path, formats: list[str], vision_format: str = "BF16") -> CheckReport:
    """Check the checkpoint in `model_dir` against its architecture, the offered `formats` and the vision tower's
    format (see the module docstring); reading problems are in the report, an unbuildable architecture or a vision
    format the tower cannot ship in is an error."""
    model_dir = Path(model_dir)
    model = meta_model(model_dir)
    config = model.config
    model_type = str(json.loads((model_dir / "config.json").read_text()).get("model_type"))
    with ExitStack() as stack:
        source = SourceTensors(model_dir, stack)
        keys, block_fp8_keys = set(source.location), set(source.scales)
        num_layers = getattr(getattr(config, "text_config", None) or config, "num_hidden_layers", None)
        as_stored = mtp_as_stored(source, source.names(), num_layers)
    layout = CheckpointLayout(model, keys)
    report = CheckReport(model_type, [])
    quantization = getattr(config, "quantization_config", None)
    unsupported = unsupported_quantization(quantization if quantization is None or isinstance(quantization, dict)
                                           else quantization.to_dict())
    if unsupported:
        report.problems.append(unsupported)
        return report
    used: set[str] = set()
    tied = bool(getattr(config, "tie_word_embeddings", False))
    try:  # expert tensors stored fused that are quantized all the same, per expert (Gemma 4)
        fused = {f"{t.module}.{t.parameter_name}" for t in targets_of(model, layout).values() if t.stored_fused}
    except PrismqError:  # a missing tensor: the loop below reports it
        fused = set()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        try:
            parts = layout.parts(name, tuple(tensor.shape))
        except PrismqError as exc:
            report.problems.append(str(exc))
            continue
        if parts is None:
            if isinstance(tensor, torch.nn.Parameter) and not (tied and name.startswith("lm_head")):
                report.problems.append(f"the checkpoint has no tensor for parameter {name}")
            continue
        used.update(part.key for part in parts)
        if tensor.ndim == 3 and parts[0].index is None and isinstance(tensor, torch.nn.Parameter) \
                and name not in fused:
            what = "routed experts stored fused in a layout vLLM loads only unquantized (GPT-OSS's: transposed, " \
                "gate/up interleaved, biases)" if ".experts." in name \
                else f"{name.rpartition('.')[0].rpartition('.')[2]} weights that are not Linear layers (convolutions)"
            report.kept[what] += tensor.numel()
    report.vision = vision_assignment(model_dir, vision_format)
    quantized_vision = {f"{name}.weight" for name, fmt in report.vision.items() if fmt != "BF16"}
    report.passthrough = sorted(keys - used - quantized_vision)
    report.num_layers = num_layers
    report.fp8_as_stored = {f"{name}.weight" for name in as_stored} & set(report.passthrough)
    report.dequantized = set(report.passthrough) & block_fp8_keys - report.fp8_as_stored
    if report.problems:  # the targets cannot be read from a checkpoint that lacks parameters
        return report
    targets = model_targets(model_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the notices become report lines here
        units = decision_units({name: target.shape for name, target in targets.items()}, model_type)
    covered = {f"{t.module}.{t.parameter_name}" for t in model_targets(model_dir, head=True).values()}
    embeddings = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    for name, parameter in model.named_parameters():
        if parameter.ndim == 2 and name not in covered and id(parameter) not in embeddings:
            owner, leaf = name.rpartition(".")[0].rpartition(".")[2], name.rpartition(".")[2]
            what = "biases" if "bias" in leaf else "weights that are not Linear layers (MoE routers and the like)"
            if isinstance(model.get_submodule(name.rpartition(".")[0]), torch.nn.Linear):
                what = "Linear outside the decoder layers"
            report.kept[f"{owner} {what}"] += parameter.numel()
    members = Counter(member for unit in units for member in unit.members)
    report.problems += [f"{name} is in {count} decision units" for name, count in members.items() if count != 1]
    report.problems += [f"{name} is in no decision unit" for name in targets if name not in members]
    block_fp8 = {name for name, target in targets.items() if target.key in block_fp8_keys}
    for unit in units:
        offered = legal_formats(unit, formats, block_fp8)
        report.units.append((unit, offered))
        if unit.pinned:
            report.kept[f"{unit.name.rsplit('.', 1)[-1]} (vLLM builds it unquantized)"] += unit.params
    return report
