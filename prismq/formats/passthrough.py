"""BF16 passthrough: the weight ships unchanged, as a plain `weight` in the model dtype (module in `ignore`)."""

from __future__ import annotations

import torch

from prismq.formats.base import Format, Rounding, Tensors, TensorSpec


class Passthrough(Format):
    """Keep the Linear in the model dtype (bf16 for the models prismq targets)."""

    name = "BF16"
    summary = "unquantized: the weight ships in the model dtype (bf16); module listed in `ignore`"
    vllm_since = "0.13.0"
    rounds_weights = False

    def tensor_specs(self, shape: tuple[int, int], dtype: torch.dtype = torch.bfloat16) -> dict[str, TensorSpec]:
        return {"weight": (dtype, tuple(shape))}

    def encode(self, weight: torch.Tensor, *, shared_amax: torch.Tensor | None = None,
               input_amax: torch.Tensor | None = None, name: str = "weight",
               rounding: Rounding | None = None, block_scales: torch.Tensor | None = None) -> Tensors:
        self.check(weight, name)
        return {"weight": weight}

    def decode(self, tensors: Tensors, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return tensors["weight"].to(dtype)

    def qdq(self, weight: torch.Tensor, *, shared_amax: torch.Tensor | None = None,
            name: str = "weight") -> torch.Tensor:
        self.check(weight, name, batched=True)
        return weight

    def scheme(self) -> None:
        return None
