"""Quantization targets: the weight matrices prismq gives formats to, and what every stage needs to know about one.

A target is one [out, in] matrix with a format of its own. Today every target is an nn.Linear's weight; routed
experts held as fused 3-D parameters (transformers 5 MoE) will be targets too, each expert's slice of the parameter,
stored on disk under its own per-expert name. So no stage builds a checkpoint key or reaches into a module by itself:
it asks the target where its weight lies on disk (`key`, `read`), where it lives in a materialized model (`module`,
`weight`) and how to put a fake-quantized weight there (`install`); its fused vLLM layer (`fused`) decides which
targets share one format and one global scale (`prismq.model.siblings`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from prismq.model.checkpoint import SourceTensors
from prismq.model.linears import linear_shapes, quantizable
from prismq.model.siblings import fused_name


@dataclass(frozen=True)
class Target:
    """One quantized weight matrix: `name` (how assignments, cost rows and exported tensors call it), its [out, in]
    `shape`, the checkpoint tensor `key` holding it, and the `module` computing with it (its `weight`)."""

    name: str
    shape: tuple[int, int]
    key: str
    module: str

    @classmethod
    def linear(cls, name: str, shape: tuple[int, int]) -> Target:
        """An nn.Linear's weight, stored as NAME.weight."""
        return cls(name, (int(shape[0]), int(shape[1])), f"{name}.weight", name)

    @property
    def fused(self) -> str:
        """The vLLM layer it is loaded into (q/k/v -> qkv_proj, ...): targets of one take one format together."""
        return fused_name(self.name)

    @property
    def params(self) -> int:
        """Weights in the matrix."""
        return self.shape[0] * self.shape[1]

    def read(self, source: SourceTensors) -> torch.Tensor:
        """The weight as the checkpoint stores it."""
        return source.get(self.key)

    def weight(self, modules: Mapping[str, nn.Module], dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight in a materialized model (`modules`: its modules by name), detached, in `dtype` (the
        checkpoint's, in which the codecs see weights; None: as the model holds it)."""
        weight = modules[self.module].weight.detach()
        return weight if dtype is None else weight.to(dtype)

    def parameter(self, modules: Mapping[str, nn.Module]) -> torch.Tensor:
        """The live weight in a materialized model, to write decoded shipped values into (under no_grad)."""
        return modules[self.module].weight

    def install(self, modules: Mapping[str, nn.Module], value: torch.Tensor) -> None:
        """Replace the weight in a materialized model by `value` (decoded shipped values), cast to the model's dtype."""
        with torch.no_grad():
            self.parameter(modules).copy_(value)


def model_targets(model_dir: Path, head: bool = False) -> dict[str, Target]:
    """Every quantization target of the checkpoint in `model_dir`, by name, in model order; lm_head only with `head`
    (it is policy, not a decision: kept BF16, DESIGN.md §5). The architecture is built on the meta device: no
    weights are read."""
    shapes = linear_shapes(Path(model_dir))
    return {name: Target.linear(name, shape) for name, shape in (shapes if head else quantizable(shapes)).items()}


def targets_named(names: list[str], modules: Mapping[str, nn.Module]) -> dict[str, Target]:
    """Targets for the named Linears of a materialized model or layer (`modules`: its modules by name)."""
    return {name: Target.linear(name, tuple(modules[name].weight.shape)) for name in names}  # type: ignore[arg-type]
