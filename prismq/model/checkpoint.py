"""Read a safetensors checkpoint lazily: one tensor at a time, by name, without loading the model.

The files are read with plain positioned reads, not memory-mapped: a mapped file's pages count as the process's
resident memory once touched, so streaming a large checkpoint through a map would look (and, under a memory limit,
act) like holding it whole. A safetensors file is an 8-byte little-endian header length, a JSON header of each
tensor's dtype, shape and byte range, then the bytes.

A natively block-FP8 checkpoint (DeepSeek V3, MiniMax M2, Qwen3-FP8: `quant_method` "fp8" with a
`weight_block_size`) stores a weight as E4M3 codes `NAME.weight` and one float scale per block of rows and columns
`NAME.weight_scale_inv` (the multiplier, despite its name). Such a weight is read dequantized, as transformers
dequantizes it: `(codes * scale).to(model dtype)`, each element under the scale of its block. The last block of a
dimension that is not a multiple of the block size is partial and takes its block's scale, as DeepSeek's reference
dequantization does (transformers refuses such shapes, e.g. DeepSeek V3's 576-row kv_a_proj_with_mqa). Every stage
sees that weight; the scale tensors are not names of their own, and `block_scales` gives them to formats that keep
the source's bytes.
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
from prismq.formats.fp8_source import BLOCK, block_expand
from prismq.model.linears import model_dtype

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


def fp8_block_size(model_dir: Path) -> tuple[int, int] | None:
    """The [rows, columns] of one scale block of a natively block-FP8 checkpoint (config.json's quantization_config
    with quant_method "fp8" and a weight_block_size); None for any other checkpoint."""
    try:
        quantization = json.loads((Path(model_dir) / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return None
    block = quantization.get("weight_block_size") if quantization.get("quant_method") == "fp8" else None
    if block is None:
        return None
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise PrismqError(f"{model_dir}: config.json's weight_block_size {block!r} is not two positive integers")
    return block[0], block[1]


def source_formats(model_dir: Path) -> list[str]:
    """Formats that keep the checkpoint's own bytes, offered beside the listed ones: FP8_SOURCE for a block-FP8
    checkpoint in 128 x 128 blocks (the block compressed-tensors and vLLM serve); none for any other."""
    return ["FP8_SOURCE"] if fp8_block_size(model_dir) == (BLOCK, BLOCK) else []


class SourceTensors:
    """Lazy access to every tensor of a safetensors checkpoint (single file or sharded with an index); a block-FP8
    checkpoint's weights read dequantized (see the module docstring)."""

    def __init__(self, model_dir: Path, stack: ExitStack) -> None:
        files = sorted(Path(model_dir).glob("*.safetensors"))
        if not files:
            raise PrismqError(f"{model_dir}: no .safetensors files (prismq reads safetensors checkpoints only)")
        self.location: dict[str, _Entry] = {}
        for file in files:
            fd = os.open(file, os.O_RDONLY)
            stack.callback(os.close, fd)
            self.location.update(_read_header(file, fd))
        self.block = fp8_block_size(model_dir)
        self.scales: dict[str, _Entry] = {}  # block-FP8 weight -> its block scales
        self.dequantized_dtype = model_dtype(model_dir) if self.block is not None else None
        if self.block is not None:
            self._split_scales(Path(model_dir))

    def _split_scales(self, model_dir: Path) -> None:
        """Pair each FP8 weight with its block scales, checking their shapes, and drop the scales from the names."""
        assert self.block is not None
        for name in [n for n in self.location if n + "_scale_inv" in self.location]:
            weight, scales = self.location[name], self.location.pop(name + "_scale_inv")
            if weight.dtype != torch.float8_e4m3fn or len(weight.shape) != 2 or not scales.dtype.is_floating_point:
                raise PrismqError(f"{model_dir}: {name} is {weight.dtype} {list(weight.shape)} with "
                                  f"{scales.dtype} scales; prismq reads block-FP8 weights as 2-D E4M3 codes with "
                                  "float scales")
            expected = tuple(-(-size // block) for size, block in zip(weight.shape, self.block))
            if scales.shape != expected:
                raise PrismqError(f"{model_dir}: {name}_scale_inv has shape {list(scales.shape)}, expected "
                                  f"{list(expected)} for {list(weight.shape)} in blocks of {list(self.block)}")
            self.scales[name] = scales
        unscaled = next((n for n, e in self.location.items() if e.dtype.itemsize == 1 and e.dtype.is_floating_point
                         and n not in self.scales), None)
        if unscaled is not None:
            raise PrismqError(f"{model_dir}: {unscaled} is stored in FP8 without a {unscaled}_scale_inv beside it")

    def names(self) -> list[str]:
        """All tensor names, in file order (each file's tensors by offset)."""
        return list(self.location)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape without reading the data."""
        return self.location[name].shape

    def dtype(self, name: str) -> torch.dtype:
        """Dtype without reading the data (a block-FP8 weight's: the model dtype it is read in)."""
        if name in self.scales:
            return self.dequantized_dtype  # type: ignore[return-value]
        return self.location[name].dtype

    def nbytes(self, name: str) -> int:
        """Bytes of one tensor's data, without reading it."""
        return math.prod(self.shape(name)) * self.dtype(name).itemsize

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (a fresh CPU tensor of its own)."""
        return self.get_rows(name, 0, self.location[name].shape[0]) if name in self.scales \
            else _read(self.location[name], name)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Read rows [start, stop) of one tensor (along its first dimension): a slice of the bytes, not the whole."""
        stop = min(stop, self.location[name].shape[0])
        rows = _read(_rows(self.location[name], start, stop), name)
        if name not in self.scales:
            return rows
        assert self.block is not None and self.dequantized_dtype is not None
        first, last = start // self.block[0], -(-stop // self.block[0])
        scales = _read(_rows(self.scales[name], first, last), name + "_scale_inv").float()
        per_element = block_expand(scales, tuple(rows.shape), self.block, start - first * self.block[0])
        return (rows.float() * per_element).to(self.dequantized_dtype)

    def stored(self, name: str) -> torch.Tensor:
        """One tensor as the file stores it (a block-FP8 weight: its E4M3 codes, not dequantized)."""
        return _read(self.location[name], name)

    def block_scales(self, name: str) -> torch.Tensor | None:
        """The block scales of a block-FP8 weight as stored (float, [ceil(rows / block), ceil(columns / block)]);
        None for any other tensor."""
        return _read(self.scales[name], name + "_scale_inv") if name in self.scales else None


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


def _rows(entry: _Entry, start: int, stop: int) -> _Entry:
    """Rows [start, stop) of a tensor's entry (along its first dimension)."""
    row = math.prod(entry.shape[1:]) * entry.dtype.itemsize
    return _Entry(entry.fd, entry.start + start * row, entry.start + stop * row, entry.dtype,
                  (stop - start, *entry.shape[1:]))


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
