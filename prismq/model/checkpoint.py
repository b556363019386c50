"""Read a safetensors checkpoint lazily: one tensor at a time, by name, without loading the model.

The files are read with plain positioned reads, not memory-mapped: a mapped file's pages count as the process's
resident memory once touched, so streaming a large checkpoint through a map would look (and, under a memory limit,
act) like holding it whole. A safetensors file is an 8-byte little-endian header length, a JSON header of each
tensor's dtype, shape and byte range, then the bytes.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from prismq.errors import PrismqError

_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


@dataclass(frozen=True)
class _Entry:
    """Where one tensor lies: its file descriptor, the absolute byte range, dtype and shape."""

    fd: int
    start: int
    end: int
    dtype: torch.dtype
    shape: tuple[int, ...]


class SourceTensors:
    """Lazy access to every tensor of a safetensors checkpoint (single file or sharded with an index)."""

    def __init__(self, model_dir: Path, stack: ExitStack) -> None:
        files = sorted(Path(model_dir).glob("*.safetensors"))
        if not files:
            raise PrismqError(f"{model_dir}: no .safetensors files (prismq reads safetensors checkpoints only)")
        self.location: dict[str, _Entry] = {}
        for file in files:
            fd = os.open(file, os.O_RDONLY)
            stack.callback(os.close, fd)
            self.location.update(_read_header(file, fd))

    def names(self) -> list[str]:
        """All tensor names, in file order (each file's tensors by offset)."""
        return list(self.location)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape without reading the data."""
        return self.location[name].shape

    def dtype(self, name: str) -> torch.dtype:
        """Dtype without reading the data."""
        return self.location[name].dtype

    def nbytes(self, name: str) -> int:
        """Bytes of one tensor's data, without reading it."""
        return math.prod(self.shape(name)) * self.dtype(name).itemsize

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (a fresh CPU tensor of its own)."""
        return _read(self.location[name], name)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Read rows [start, stop) of one tensor (along its first dimension): a slice of the bytes, not the whole."""
        entry = self.location[name]
        row = math.prod(entry.shape[1:]) * entry.dtype.itemsize
        stop = min(stop, entry.shape[0])
        part = _Entry(entry.fd, entry.start + start * row, entry.start + stop * row, entry.dtype,
                      (stop - start, *entry.shape[1:]))
        return _read(part, name)


class TensorFile(Mapping[str, torch.Tensor]):
    """One safetensors file as a read-only mapping name -> tensor, each read from disk when asked for (a large
    artifact is never loaded whole to use a few of its tensors)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            self.location = _read_header(self.path, fd)
            (length,) = struct.unpack("<Q", os.pread(fd, 8, 0))
            self.metadata: dict[str, str] = json.loads(os.pread(fd, length, 8)).get("__metadata__") or {}
        finally:
            os.close(fd)

    def __getitem__(self, name: str) -> torch.Tensor:
        entry = self.location[name]
        fd = os.open(self.path, os.O_RDONLY)
        try:
            return _read(_Entry(fd, entry.start, entry.end, entry.dtype, entry.shape), name)
        finally:
            os.close(fd)

    def __contains__(self, name: object) -> bool:  # without reading the tensor (Mapping's default would)
        return name in self.location

    def __iter__(self) -> Iterator[str]:
        return iter(self.location)

    def __len__(self) -> int:
        return len(self.location)


def _read(entry: _Entry, name: str) -> torch.Tensor:
    """The bytes of one tensor, read with positioned reads into a fresh CPU tensor."""
    size = entry.end - entry.start
    if size == 0:
        return torch.empty(entry.shape, dtype=entry.dtype)
    data = bytearray(size)
    view, done = memoryview(data), 0
    while done < size:  # pread may return less than asked for
        chunk = os.preadv(entry.fd, [view[done:]], entry.start + done)
        if chunk <= 0:
            raise PrismqError(f"{name}: the file ends early (truncated download?)")
        done += chunk
    return torch.frombuffer(data, dtype=torch.uint8).view(entry.dtype).reshape(entry.shape)


def _read_header(file: Path, fd: int) -> dict[str, _Entry]:
    """The tensors listed in one safetensors file's header, in data order; a malformed header is a clear error."""
    try:
        (length,) = struct.unpack("<Q", os.pread(fd, 8, 0))
        header = json.loads(os.pread(fd, length, 8))
        base = 8 + length
        entries = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in _SAFETENSORS_DTYPES:
                raise PrismqError(f"{file}: tensor {name} has dtype {info['dtype']}, which prismq does not read")
            start, end = info["data_offsets"]
            entries[name] = _Entry(fd, base + start, base + end, _SAFETENSORS_DTYPES[info["dtype"]],
                                   tuple(info["shape"]))
    except (struct.error, ValueError, KeyError, TypeError) as exc:
        raise PrismqError(f"{file} is not a valid safetensors file ({exc})") from None
    return dict(sorted(entries.items(), key=lambda item: item[1].start))
