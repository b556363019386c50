"""The incremental shard writer against the safetensors library's own reader."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from prismq.export.shards import ShardWriter, write_safetensors
from prismq.model.checkpoint import TensorFile


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(33, 17, generator=g).to(torch.bfloat16),
        "a.weight_packed": torch.randint(0, 256, (33, 8), generator=g, dtype=torch.uint8),
        "a.weight_scale": torch.randn(33, 2, generator=g).to(torch.float8_e4m3fn),
        "a.weight_global_scale": torch.tensor([448.0]),
        "b.shape": torch.tensor([3, 5], dtype=torch.int64),
        "c.empty": torch.zeros(0, 4, dtype=torch.float16),
        "d.mask": torch.tensor([True, False, True]),
        "e.scalar": torch.tensor(2.5, dtype=torch.float64),
    }


def test_shards_read_back_through_safetensors(tmp_path: Path) -> None:
    tensors = _tensors()
    writer = ShardWriter(tmp_path, max_shard_bytes=1200)
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    total = writer.close()
    assert total == sum(t.numel() * t.element_size() for t in tensors.values())
    files = sorted(tmp_path.glob("*.safetensors"))
    assert len(files) > 1 and not list(tmp_path.glob("*.bytes"))
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    loaded = {}
    for file in files:
        loaded.update(load_file(file))
        with safe_open(str(file), framework="pt") as handle:
            assert handle.metadata() == {"format": "pt"}
    assert set(index["weight_map"]) == set(tensors) == set(loaded)
    for name, tensor in tensors.items():
        got = loaded[name]
        assert got.dtype == tensor.dtype and got.shape == tensor.shape
        if tensor.dtype == torch.float8_e4m3fn:  # compared by their bytes
            got, tensor = got.view(torch.uint8), tensor.view(torch.uint8)
        assert torch.equal(got, tensor)
        assert index["weight_map"][name] in {f.name for f in files}


def test_one_file_written_tensor_by_tensor_reads_back_through_safetensors_and_our_reader(tmp_path: Path) -> None:
    tensors = _tensors()
    write_safetensors(tmp_path / "one.safetensors", tensors)
    theirs, ours = load_file(tmp_path / "one.safetensors"), TensorFile(tmp_path / "one.safetensors")
    assert list(theirs) == list(tensors) == list(ours)  # the order written is the data order
    for name, tensor in tensors.items():
        for got in (theirs[name], ours[name]):
            assert got.dtype == tensor.dtype and got.shape == tensor.shape
            assert torch.equal(got.view(torch.uint8) if got.dtype.itemsize == 1 else got,
                               tensor.view(torch.uint8) if tensor.dtype.itemsize == 1 else tensor), name
