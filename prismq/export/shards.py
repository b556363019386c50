"""Sharded safetensors written incrementally: each tensor goes to disk as it is added, so memory holds one tensor,
not one shard (a 5 GB shard of a large model would otherwise sit in memory until it is full).

A safetensors file is an 8-byte little-endian header length, a JSON header (dtype, shape and byte offsets of every
tensor, plus `__metadata__`), then the tensors' bytes. The bytes are appended to a scratch file while the shard
fills; closing the shard writes the header and then copies the bytes after it.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import BinaryIO

import torch

# torch dtype -> safetensors dtype name (the ones prismq writes)
_DTYPE_NAMES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float64: "F64",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """One safetensors file written tensor by tensor (the header first: every size is known), so memory holds one
    tensor's bytes at a time, not a serialized copy of them all."""
    entries, offset = {}, 0
    for name, tensor in tensors.items():
        if tensor.dtype not in _DTYPE_NAMES:
            raise ValueError(f"tensor {name}: dtype {tensor.dtype} has no safetensors name here")
        size = tensor.numel() * tensor.element_size()
        entries[name] = {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                         "data_offsets": [offset, offset + size]}
        offset += size
    header = json.dumps({"__metadata__": metadata or {"format": "pt"}, **entries}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(header)))
        out.write(header)
        for tensor in tensors.values():
            if tensor.numel():
                out.write(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data)


class ShardWriter:
    """Collect tensors in order and start a new shard whenever the current one would pass `max_shard_bytes`.

    `close()` names the shards like Hugging Face (model-00001-of-00003.safetensors, or model.safetensors when
    there is one) and writes model.safetensors.index.json; it returns the total bytes of tensor data."""

    def __init__(self, directory: Path, max_shard_bytes: int) -> None:
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes
        self.entries: dict[str, dict] = {}  # the current shard's header entries
        self.data: BinaryIO | None = None  # the current shard's bytes so far
        self.offset = 0
        self.shard_files: list[Path] = []
        self.shard_of: dict[str, int] = {}
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor into the current shard; starts a new shard first if it would overflow this one."""
        if name in self.shard_of or name in self.entries:
            raise ValueError(f"tensor {name} written twice")
        if tensor.dtype not in _DTYPE_NAMES:
            raise ValueError(f"tensor {name}: dtype {tensor.dtype} has no safetensors name here")
        size = tensor.numel() * tensor.element_size()
        if self.entries and self.offset + size > self.max_shard_bytes:
            self.flush()
        if self.data is None:
            self.data = open(self.directory / f"shard-{len(self.shard_files):05d}.bytes", "w+b")
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        if size:
            self.data.write(flat.view(torch.uint8).numpy().data)  # the tensor's own bytes, not a copy of them
        self.entries[name] = {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                              "data_offsets": [self.offset, self.offset + size]}
        self.offset += size

    def flush(self) -> None:
        """Finish the current shard: header, then its bytes, as the next shard file."""
        if self.data is None:
            return
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        path = self.directory / f"shard-{len(self.shard_files):05d}.safetensors"
        scratch = Path(self.data.name)
        with open(path, "wb") as out:
            out.write(struct.pack("<Q", len(header)))
            out.write(header)
            self.data.seek(0)
            shutil.copyfileobj(self.data, out, 16 << 20)
        self.data.close()
        scratch.unlink()
        for name in self.entries:
            self.shard_of[name] = len(self.shard_files)
        self.shard_files.append(path)
        self.total_bytes += self.offset
        self.entries, self.data, self.offset = {}, None, 0

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
