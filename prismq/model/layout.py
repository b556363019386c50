"""Where a model's parameters lie in its checkpoint: transformers' own conversion mapping, read backwards.

transformers 5 holds some weights differently from how checkpoints store them, and converts on load: a MoE layer's
routed experts become two 3-D parameters (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I]) built
from per-expert tensors (`experts.{e}.gate_proj.weight`, `...up_proj.weight`, `...down_proj.weight`, or Mixtral's
`w1` / `w3` / `w2`), and some modules are renamed (`block_sparse_moe` -> `mlp`). The streaming engine reads one layer
at a time without transformers' loader, so it asks this map where each parameter's bytes are: the tensor of the
same name, a renamed tensor, or one slice per expert (and per concatenated half). The same slices are the routed
experts' quantization targets (`prismq.model.targets`).
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass

from torch import nn

from prismq.errors import PrismqError


TEXT_PREFIX = "model.layers."
MULTIMODAL_TEXT_PREFIX = "model.language_model."  # Qwen3.5 / Qwen3-VL / Gemma 3-4 multimodal releases


@dataclass(frozen=True)
class Part:
    """One checkpoint tensor holding part of a parameter: expert `index` of it (None: the whole parameter), rows
    `rows` of that expert's matrix (None: all of them)."""

    key: str
    index: int | None = None
    rows: tuple[int, int] | None = None


@dataclass(frozen=True)
class _Merge:
    """Per-expert tensors stacked into a 3-D parameter, concatenated along rows when several (gate, up)."""

    target: str  # the parameter's name suffix, e.g. "experts.gate_up_proj"
    sources: tuple[str, ...]  # per-expert name suffixes with "*" for the expert index


# transformers' standard fused experts, stored per expert by an export (vLLM reads quantized experts per expert)
DEFAULT_MERGES = [_Merge("experts.gate_up_proj", ("experts.*.gate_proj.weight", "experts.*.up_proj.weight")),
                  _Merge("experts.down_proj", ("experts.*.down_proj.weight",))]


def _clean(pattern: str) -> str:
    """A conversion pattern as a plain dotted suffix (transformers writes some with leading dots or escapes)."""
    return pattern.replace("\\", "").strip(".^$")


class CheckpointLayout:
    """The parts of each parameter of `model` among the checkpoint tensor names `keys`."""

    def __init__(self, model: nn.Module, keys: Collection[str]) -> None:
        from transformers.conversion_mapping import extract_weight_conversions_for_model

        self.keys = keys
        self.renamings: list[tuple[str, str]] = []  # (checkpoint substring, model substring)
        # a multimodal release read as its text model: the language model's weights under `model.language_model.`
        text_only = not any(key.startswith(TEXT_PREFIX) for key in keys)
        self.prefix = (MULTIMODAL_TEXT_PREFIX, "model.") if text_only and any(
            key.startswith(MULTIMODAL_TEXT_PREFIX) for key in keys) else None
        self.merges: list[_Merge] = []
        for conversion in extract_weight_conversions_for_model(model) or []:
            operations = [type(op).__name__ for op in getattr(conversion, "operations", [])]
            sources, targets = conversion.source_patterns, conversion.target_patterns
            if not operations and len(sources) == 1 and len(targets) == 1 and "*" not in sources[0]:
                self.renamings.append((sources[0].replace("\\", ""), targets[0].replace("\\", "")))
            elif operations in (["MergeModulelist"], ["MergeModulelist", "Concatenate"]) and len(targets) == 1:
                self.merges.append(_Merge(_clean(targets[0]), tuple(_clean(s) for s in sources)))
        self.merges += DEFAULT_MERGES  # tried last: a fused parameter exported per expert (Gemma 4's experts)

    def stored_name(self, name: str) -> str:
        """`name` with the renamings undone (the checkpoint's spelling of a model name)."""
        for stored, model_side in self.renamings:
            name = name.replace(model_side, stored)
        if self.prefix is not None and name.startswith(self.prefix[1]):
            name = self.prefix[0] + name[len(self.prefix[1]):]
        return name

    def model_name(self, stored: str) -> str:
        """The model's spelling of checkpoint name `stored` (or of a compressed-tensors `re:` target over such
        names): the inverse of `stored_name`."""
        regex = stored.startswith("re:")
        if self.prefix is not None:
            old, new = (re.escape(p) for p in self.prefix) if regex else self.prefix
            at = stored.find(old)
            if at in (0, 3, 4):  # the start of the name, after "re:" and an optional "^"
                stored = stored[:at] + new + stored[at + len(old):]
        for stored_side, model_side in self.renamings:
            stored = stored.replace(re.escape(stored_side) if regex else stored_side,
                                    re.escape(model_side) if regex else model_side)
        return stored

    def parts(self, name: str, shape: tuple[int, ...]) -> list[Part] | None:
        """The checkpoint tensors holding parameter `name` of `shape`; None when the checkpoint lacks it."""
        for candidate in (name, self.stored_name(name)):
            if candidate in self.keys:
                return [Part(candidate)]
        for merge in self.merges:
            if not (name == merge.target or name.endswith("." + merge.target)):
                continue
            prefix = name[: len(name) - len(merge.target)]
            experts, rows = shape[0], shape[1] // len(merge.sources)
            parts = [Part(self.stored_name(prefix + source.replace("*", str(expert))), expert,
                          (k * rows, (k + 1) * rows) if len(merge.sources) > 1 else None)
                     for expert in range(experts) for k, source in enumerate(merge.sources)]
            missing = [part.key for part in parts if part.key not in self.keys]
            if missing:
                raise PrismqError(f"{name}: the checkpoint has no tensor {missing[0]} (per-expert tensors of a "
                                  "fused expert parameter)")
            return parts
        return None
