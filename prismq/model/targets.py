"""Quantization targets: the weight matrices prismq gives formats to, and what every stage needs to know about one.

A target is one [out, in] matrix with a format of its own: an nn.Linear's weight, or one routed expert's projection
inside a fused 3-D expert parameter (transformers 5 MoE: `experts.gate_up_proj` [E, 2I, H] holds every expert's
gate and up, `experts.down_proj` [E, H, I] every expert's down). A target is named as its checkpoint stores it
(`...mlp.experts.3.gate_proj`, Mixtral's `...block_sparse_moe.experts.3.w1`), which is also the name the export
writes and vLLM reads. So no stage builds a checkpoint key or reaches into a module by itself: it asks the target
where its weight lies on disk (`key`, `read`), where it lives in a materialized model (`module`, `parameter_name`,
`expert`, `rows`: `weight`, `parameter`) and how to put a fake-quantized weight there (`install`); its fused vLLM
layer (`fused`) decides which targets share one format (`prismq.model.siblings`).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from prismq.model.checkpoint import SourceTensors
from prismq.model.layout import CheckpointLayout
from prismq.model.linears import LM_HEAD, decoder_layers, meta_model
from prismq.model.siblings import fused_name


@dataclass(frozen=True)
class Target:
    """One quantized weight matrix: `name` (how assignments, cost rows and exported tensors call it), its [out, in]
    `shape`, the checkpoint tensor `key` holding it, and where it lives in the model: parameter `parameter_name` of
    module `module`, for a routed expert its slice `expert` (and rows `rows` of that expert's matrix, when the
    parameter concatenates gate and up)."""

    name: str
    shape: tuple[int, int]
    key: str
    module: str
    parameter_name: str = "weight"
    expert: int | None = None
    rows: tuple[int, int] | None = None
    stored_fused: bool = False  # `key` is the whole 3-D expert tensor on disk too (Gemma 4), not this matrix alone

    @classmethod
    def linear(cls, name: str, shape: tuple[int, int]) -> Target:
        """An nn.Linear's weight, stored as NAME.weight."""
        return cls(name, (int(shape[0]), int(shape[1])), f"{name}.weight", name)

    @property
    def fused(self) -> str:
        """The vLLM layer it is loaded into (q/k/v -> qkv_proj, a layer's routed experts -> experts, ...): targets
        of one take one format together."""
        return fused_name(self.name)

    @property
    def params(self) -> int:
        """Weights in the matrix."""
        return self.shape[0] * self.shape[1]

    def read(self, source: SourceTensors) -> torch.Tensor:
        """The weight as the checkpoint stores it (an expert's rows of a fused tensor: only those bytes read)."""
        if not self.stored_fused:
            return source.get(self.key)
        matrix = source.get_rows(self.key, self.expert, self.expert + 1)[0]  # type: ignore[operator]
        return matrix if self.rows is None else matrix[self.rows[0]:self.rows[1]]

    def _slice(self, tensor: torch.Tensor) -> torch.Tensor:
        """This target's [out, in] view of its module's parameter."""
        view = tensor if self.expert is None else tensor[self.expert]
        return view if self.rows is None else view[self.rows[0]:self.rows[1]]

    def parameter(self, modules: Mapping[str, nn.Module]) -> torch.Tensor:
        """The live weight in a materialized model (`modules`: its modules by name; a view of the fused parameter
        for an expert), to write decoded shipped values into (under no_grad)."""
        return self._slice(getattr(modules[self.module], self.parameter_name))

    def weight(self, modules: Mapping[str, nn.Module], dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight in a materialized model, detached, in `dtype` (the checkpoint's, in which the codecs see
        weights; None: as the model holds it)."""
        weight = self.parameter(modules).detach()
        return weight if dtype is None else weight.to(dtype)

    def install(self, modules: Mapping[str, nn.Module], value: torch.Tensor) -> None:
        """Replace the weight in a materialized model by `value` (decoded shipped values), cast to the model's dtype."""
        with torch.no_grad():
            self.parameter(modules).copy_(value)


def targets_of(model: nn.Module, layout: CheckpointLayout, head: bool = False) -> dict[str, Target]:
    """Every quantization target of `model` (meta or materialized) whose checkpoint tensors `layout` describes, by
    name, in model order: each nn.Linear (lm_head only with `head`: it is policy, kept BF16, DESIGN.md §5), and each
    routed expert's projections (stored per expert, or in transformers' own fused layout: `_stored_fused`). Expert
    tensors stored fused in another layout (GPT-OSS's) are not targets: they stay in the model dtype, as do Linears
    outside the decoder layers other than lm_head (Gemma 4's per-layer input projection)."""
    prefix = decoder_layers(model)[0] + "."
    targets: dict[str, Target] = {}
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            if module_name == LM_HEAD and not head or module_name != LM_HEAD and not module_name.startswith(prefix):
                continue
            parts = layout.parts(f"{module_name}.weight", (module.out_features, module.in_features))
            key = parts[0].key if parts and len(parts) == 1 and parts[0].index is None else f"{module_name}.weight"
            name = key.removesuffix(".weight")
            targets[name] = Target(name, (module.out_features, module.in_features), key, module_name)
            continue
        for parameter_name, parameter in module.named_parameters(recurse=False):
            parts = layout.parts(f"{module_name}.{parameter_name}", tuple(parameter.shape)) \
                if parameter.ndim == 3 else None
            if parts and parts[0].index is None:
                targets.update(_stored_fused(module, module_name, parameter_name, parameter.shape, parts[0].key))
            if not parts or parts[0].index is None or not parts[0].key.endswith(".weight"):
                continue
            for part in parts:
                rows = part.rows or (0, parameter.shape[1])
                name = part.key.removesuffix(".weight")
                targets[name] = Target(name, (rows[1] - rows[0], int(parameter.shape[2])), part.key, module_name,
                                       parameter_name, part.index, part.rows)
    return targets


def _stored_fused(module: nn.Module, module_name: str, parameter_name: str, shape: torch.Size,
                  key: str) -> dict[str, Target]:
    """Per-expert targets of a 3-D expert tensor stored whole on disk as the model holds it (Gemma 4:
    `experts.gate_up_proj` [E, 2I, H], gate rows first, and `experts.down_proj` [E, H, I]), named as vLLM reads a
    quantized one: per expert, `experts.{e}.gate_proj` ...; none for other layouts (GPT-OSS's transposed,
    interleaved gate/up with biases: stock vLLM loads no compressed-tensors scheme for those experts)."""
    standard = getattr(module, "is_transposed", None) is False and getattr(module, "is_concatenated", None) is True \
        and not getattr(module, "has_bias", False)
    stem, _, leaf = key.rpartition(".")
    if not standard or leaf != parameter_name or leaf not in ("gate_up_proj", "down_proj"):
        return {}
    experts, rows, columns = int(shape[0]), int(shape[1]), int(shape[2])
    halves = [("gate_proj", (0, rows // 2)), ("up_proj", (rows // 2, rows))] if leaf == "gate_up_proj" \
        else [("down_proj", None)]
    found = {}
    for expert in range(experts):
        for projection, span in halves:
            name = f"{stem}.{expert}.{projection}"
            height = rows if span is None else span[1] - span[0]
            found[name] = Target(name, (height, columns), key, module_name, parameter_name, expert, span, True)
    return found


def model_targets(model_dir: Path, head: bool = False) -> dict[str, Target]:
    """Every quantization target of the checkpoint in `model_dir` (see `targets_of`). The architecture is built on
    the meta device and only the safetensors headers are read: no weights."""
    model = meta_model(Path(model_dir))
    with ExitStack() as stack:
        layout = CheckpointLayout(model, SourceTensors(Path(model_dir), stack).location)
    return targets_of(model, layout, head)


def targets_named(names: list[str], modules: Mapping[str, nn.Module],
                  known: Mapping[str, Target] | None = None) -> dict[str, Target]:
    """Targets for `names` in a materialized model or layer (`modules`: its modules by name): from `known` (the
    model's targets, which routed experts need) where it has them, else the named nn.Linear's weight."""
    known = known or {}
    return {name: known[name] if name in known else Target.linear(name, tuple(modules[name].weight.shape))
            for name in names}  # type: ignore[arg-type]
