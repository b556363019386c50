"""Reading back a compressed-tensors export the way vLLM runs it, where transformers and compressed-tensors alone
do not.

Routed experts: an export stores each expert matrix under its per-expert name in its format's tensors
(`...experts.3.gate_proj.weight_packed`, `weight_scale`, ...), which no module loads into a fused 3-D expert
parameter. `CompressedExperts` decompresses each one with compressed-tensors' own compressor for the scheme its
config group gives it (the library's code, not prismq's codec: the read-back stays an independent check of the
bytes), for the streaming engine to copy into the expert's slice of the fused parameter; `quantize_inputs` then
quantizes each expert's input as the runtime does, with the input scale the export stores.

Per-token activation scales: compressed-tensors' fake quantization takes dimensions 0 and 1 of a Linear's input as
batch and sequence, so a Linear called on [tokens, hidden] rows (a MoE block's shared expert) would get one FP8
scale per element; vLLM computes one per token row. `tokens_as_sequence` presents such inputs as [1, tokens,
hidden].
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
import re
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from prismq.errors import PrismqError
from prismq.formats import FORMATS, Format
from prismq.export.qconfig import is_experts_target
from prismq.model.checkpoint import SourceTensors
from prismq.model.experts import quantize_expert_inputs
from prismq.model.siblings import EXPERT
from prismq.model.targets import Target

WEIGHT = ".weight"


class CompressedExperts:
    """The quantized matrices of an export (`source`, its `quantization` config as a dict) that no module loads."""

    def __init__(self, source: SourceTensors, quantization: Mapping[str, Any]) -> None:
        from compressed_tensors.quantization import QuantizationConfig

        self.source = source
        self.config = QuantizationConfig.model_validate(dict(quantization))
        self._tensors: dict[str, list[str]] = {}  # expert matrix -> the names of its stored tensors
        for key in source.location:
            stem = key.rpartition(".")[0]
            if EXPERT.match(stem):
                self._tensors.setdefault(stem, []).append(key)
        # FP8 and MXFP8 keep the name `weight` for their codes: stored beside a scale, it is compressed all the same
        self.compressed = {stem + WEIGHT for stem, keys in self._tensors.items()
                           if any(k.endswith((".weight_packed", ".weight_scale")) for k in keys)}
        self._formats: dict[int, Format | None] = {}  # id(scheme) -> the prismq format it is
        self._named: dict[str, Any] = {}  # config target name -> its scheme; `re:` targets apart, compiled
        self._patterns: list[tuple[re.Pattern[str], Any]] = []
        for scheme in self.config.config_groups.values():
            for target in scheme.targets:
                if target.startswith("re:"):
                    self._patterns.append((re.compile(target.removeprefix("re:")), scheme))
                else:
                    self._named[target] = scheme

    def module_config(self, model_name: Callable[[str], str]) -> dict[str, Any]:
        """The quantization config for compressed-tensors to apply to the model's modules: without the targets only
        these experts match (no warning about targets that match no module), every target and ignored name in the
        model's spelling (`model_name`: a multimodal release's `model.language_model.` is the text model's
        `model.`)."""
        stems = {key.removesuffix(WEIGHT) for key in self._tensors}

        def experts_only(target: str) -> bool:  # a per-expert name, or prismq's regex over a layer's experts
            return target in stems or is_experts_target(target)

        config = self.config.model_dump()
        for name, group in list(config["config_groups"].items()):
            group["targets"] = [model_name(t) for t in group["targets"] if not experts_only(t)]
            if not group["targets"]:
                del config["config_groups"][name]
        config["ignore"] = [model_name(t) for t in config.get("ignore") or [] if not experts_only(t)]
        return config

    def keys(self, stored: Collection[str]) -> set[str]:
        """The checkpoint's tensor names plus the `.weight` names of the matrices stored compressed."""
        return set(stored) | self.compressed

    def _scheme(self, stem: str) -> Any:
        """The config group's scheme of the matrix stored under `stem` (matched as compressed-tensors matches: a
        name, or a `re:` target by re.match)."""
        if stem in self._named:
            return self._named[stem]
        found = next((scheme for pattern, scheme in self._patterns if pattern.match(stem)), None)
        if found is None:
            raise PrismqError(f"{stem} is stored compressed but no quantization_config group targets it")
        return found

    def decompressed(self, key: str) -> torch.Tensor:
        """The matrix `key` (a `.weight` name among `compressed`) as compressed-tensors decompresses it."""
        from compressed_tensors.compressors.base import BaseCompressor

        stem = key.removesuffix(WEIGHT)
        scheme = self._scheme(stem)
        local = {name.removeprefix(stem + "."): self.source.get(name) for name in self._tensors[stem]}
        compressor = BaseCompressor.get_value_from_registry(str(scheme.format or self.config.format))
        return compressor.decompress(local, scheme)["weight"]

    def format_of(self, stem: str) -> Format:
        """The prismq format whose compressed-tensors scheme is `stem`'s config group (both validated by the
        library, compared without their targets)."""
        from compressed_tensors.quantization import QuantizationScheme

        scheme = self._scheme(stem)
        if id(scheme) not in self._formats:  # one comparison per config group, not per matrix
            stored = scheme.model_copy(update={"targets": []})
            self._formats[id(scheme)] = next(
                (fmt for fmt in FORMATS.values() if fmt.scheme() is not None
                 and QuantizationScheme.model_validate({**fmt.scheme(), "targets": []}) == stored), None)
        found = self._formats[id(scheme)]
        if found is None:
            raise PrismqError(f"{stem}: its quantization scheme is none of prismq's formats")
        return found

    def quantize_inputs(self, modules: Mapping[str, nn.Module], targets: Mapping[str, Target]) -> list[RemovableHandle]:
        """Hooks quantizing each stored expert's input as the runtime does (formats with quantized activations,
        under the input scale stored beside the weight)."""
        inputs: dict[tuple[str, str, int], tuple[Format, torch.Tensor | None]] = {}
        for target in targets.values():
            if target.expert is None or target.module not in modules or target.key not in self.compressed:
                continue
            fmt = self.format_of(target.name)
            if fmt.quantizes_activations:
                scale = f"{target.name}.input_global_scale"
                inputs[(target.module, target.parameter_name, target.expert)] = (
                    fmt, self.source.get(scale) if scale in self.source.location else None)
        return quantize_expert_inputs(modules, inputs)


class _TokensAsSequence:
    """The two hooks of one module: widen a 2-D input before its forward, narrow the output after it."""

    def __init__(self) -> None:
        self.widened = False

    def before(self, _module: nn.Module, args: tuple) -> tuple | None:
        self.widened = bool(args) and args[0].ndim == 2
        return (args[0].unsqueeze(0), *args[1:]) if self.widened else None

    def after(self, _module: nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if not self.widened:
            return None
        self.widened = False
        return output.squeeze(0)


def tokens_as_sequence(modules: list[nn.Module]) -> list[RemovableHandle]:
    """Hooks presenting a 2-D [tokens, features] input of each module as [1, tokens, features] (and its output back
    as 2-D), so compressed-tensors' per-token activation scales are per token row, as vLLM's are."""
    handles = []
    for module in modules:
        hooks = _TokensAsSequence()
        handles.append(module.register_forward_pre_hook(hooks.before))
        handles.append(module.register_forward_hook(hooks.after))
    return handles
