"""Quantization targets: where each weight lies on disk and in the model, checked against the safetensors library's
reader and the model's own parameters."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from conftest import build_tiny_llama
from prismq.model.source import load_model
from prismq.model.targets import model_targets


def test_every_target_names_its_checkpoint_tensor_and_model_weight(tiny_llama_dir: Path) -> None:
    targets = model_targets(tiny_llama_dir)
    expected = [n for n, m in build_tiny_llama().named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    assert list(targets) == expected  # model order, lm_head left out
    assert "lm_head" in model_targets(tiny_llama_dir, head=True)
    model = load_model(tiny_llama_dir, torch.float32)
    modules = dict(model.named_modules())
    with safe_open(str(tiny_llama_dir / "model.safetensors"), framework="pt") as handle:
        for name, target in targets.items():
            stored = handle.get_tensor(target.key)
            assert tuple(stored.shape) == target.shape and target.params == stored.numel()
            assert torch.equal(target.weight(modules, torch.bfloat16), stored)
    assert targets["model.layers.1.self_attn.k_proj"].fused == "model.layers.1.self_attn.qkv_proj"
    assert targets["model.layers.0.mlp.up_proj"].fused == "model.layers.0.mlp.gate_up_proj"
    assert targets["model.layers.0.mlp.down_proj"].fused == "model.layers.0.mlp.down_proj"


def test_installing_a_weight_changes_that_weight_only(tiny_llama_dir: Path) -> None:
    model = load_model(tiny_llama_dir, torch.float32)
    modules = dict(model.named_modules())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    target = model_targets(tiny_llama_dir)["model.layers.1.mlp.down_proj"]
    value = torch.randn(target.shape).to(torch.bfloat16)
    target.install(modules, value)
    assert torch.equal(modules[target.module].weight, value.float())
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert changed == [f"{target.module}.weight"]
