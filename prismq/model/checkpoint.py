"""Read a safetensors checkpoint lazily: one tensor at a time, by name, without loading the model."""

from __future__ import annotations

import math
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

from prismq.errors import PrismqError

_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn}


class SourceTensors:
    """Lazy access to every tensor of a safetensors checkpoint (single file or sharded with an index)."""

    def __init__(self, model_dir: Path, stack: ExitStack) -> None:
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise PrismqError(f"{model_dir}: no .safetensors files (prismq reads safetensors checkpoints only)")
        self.handles = [stack.enter_context(safe_open(str(f), framework="pt")) for f in files]
        self.location = {key: handle for handle in self.handles for key in handle.keys()}

    def names(self) -> list[str]:
        """All tensor names, in file order."""
        return [key for handle in self.handles for key in handle.keys()]

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape without reading the data."""
        return tuple(self.location[name].get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        """Dtype without reading the data."""
        return _SAFETENSORS_DTYPES[self.location[name].get_slice(name).get_dtype()]

    def nbytes(self, name: str) -> int:
        """Bytes of one tensor's data, without reading it."""
        return math.prod(self.shape(name)) * self.dtype(name).itemsize

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor."""
        return self.location[name].get_tensor(name)
