"""The incremental shard writer against the safetensors library's own reader."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from prismq.export.shards import ShardWriter


def test_shards_read_back_through_safetensors(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.weight": torch.randn(33, 17, generator=g).to(torch.bfloat16),
        "a.weight_packed": torch.randint(0, 256, (33, 8), generator=g, dtype=torch.uint8),
        "a.weight_scale": torch.randn(33, 2, generator=g).to(torch.float8_e4m3fn),
        "a.weight_global_scale": torch.tensor([448.0]),
        "b.shape": torch.tensor([3, 5], dtype=torch.int64),
        "c.empty": torch.zeros(0, 4, dtype=torch.float16),
        "d.mask": torch.tensor([True, False, True]),
    }
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
