"""Sharded safetensors written incrementally: at most one shard is held in memory at a time."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


class ShardWriter:
    """Collect tensors in order and flush a shard whenever it would pass `max_shard_bytes`.

    `close()` names the shards like Hugging Face (model-00001-of-00003.safetensors, or model.safetensors when
    there is one) and writes model.safetensors.index.json; it returns the total bytes of tensor data."""

    def __init__(self, directory: Path, max_shard_bytes: int) -> None:
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shard_files: list[Path] = []
        self.shard_of: dict[str, int] = {}
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue one tensor; flushes the current shard first if this tensor would overflow it."""
        if name in self.shard_of or name in self.pending:
            raise ValueError(f"tensor {name} written twice")
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_shard_bytes:
            self.flush()
        self.pending[name] = tensor.detach().to("cpu").contiguous()
        self.pending_bytes += size

    def flush(self) -> None:
        """Write the pending tensors as the next shard."""
        if not self.pending:
            return
        path = self.directory / f"shard-{len(self.shard_files):05d}.safetensors"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        for name in self.pending:
            self.shard_of[name] = len(self.shard_files)
        self.shard_files.append(path)
        self.total_bytes += self.pending_bytes
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> int:
        """Flush, give the shards their final names, and write the index (when there is more than one shard)."""
        self.flush()
        count = len(self.shard_files)
        names = (["model.safetensors"] if count == 1
                 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)])
        for path, final in zip(self.shard_files, names):
            path.rename(self.directory / final)
        if count > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": {name: names[i] for name, i in sorted(self.shard_of.items())}}
            (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return self.total_bytes

