"""The uniform assignment and the input-range calibration that feed the exporter."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import build_tiny_llama

from prismq.errors import PrismqError
from prismq.measure.input_range import input_absmax
from prismq.pipeline import uniform_assignment

SHAPES = {
    "model.layers.0.self_attn.q_proj": (64, 256), "model.layers.0.self_attn.k_proj": (32, 256),
    "model.layers.0.self_attn.v_proj": (32, 256), "model.layers.0.self_attn.o_proj": (256, 64),
    "model.layers.0.mlp.gate_proj": (96, 256), "model.layers.0.mlp.up_proj": (96, 256),
    "model.layers.0.mlp.down_proj": (256, 96),
}


def test_uniform_falls_back_to_bf16_where_the_format_cannot_take_the_shape() -> None:
    assignment = uniform_assignment(SHAPES, "INT4_W4A16")
    assert assignment["model.layers.0.self_attn.q_proj"] == "INT4_W4A16"
    assert assignment["model.layers.0.self_attn.o_proj"] == "BF16"  # in=64 is not a multiple of 128
    assert assignment["model.layers.0.mlp.down_proj"] == "BF16"


def test_force_rules_pin_modules_and_may_not_split_siblings() -> None:
    rules = [(re.compile(r"mlp\.(gate|up)_proj"), "MXFP8"), (re.compile("proj"), "FP8")]
    assignment = uniform_assignment(SHAPES, "NVFP4A16", rules)
    assert assignment["model.layers.0.mlp.up_proj"] == "MXFP8" and assignment["model.layers.0.mlp.gate_proj"] == "MXFP8"
    assert assignment["model.layers.0.self_attn.q_proj"] == "FP8"
    with pytest.raises(PrismqError, match="split fused siblings"):
        uniform_assignment(SHAPES, "NVFP4A16", [(re.compile("k_proj"), "FP8")])
    with pytest.raises(PrismqError, match="--force INT4_W4A16.*divisible by 128.*o_proj"):
        uniform_assignment(SHAPES, "NVFP4A16", [(re.compile("o_proj"), "INT4_W4A16")])


def test_input_absmax_is_the_max_over_every_input_element() -> None:
    model = build_tiny_llama()
    blocks = torch.randint(0, 512, (3, 17), generator=torch.Generator().manual_seed(0))
    names = ["model.layers.1.mlp.down_proj", "model.layers.0.self_attn.q_proj"]
    got = input_absmax(model, blocks, names, progress=False)
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0])) for n in names]
    with torch.no_grad():
        model(blocks)  # one batch of all blocks: the same inputs, computed differently
    for h in handles:
        h.remove()
    for n in names:
        assert torch.allclose(got[n], seen[n][0].abs().amax().float(), rtol=2e-2)
        assert got[n] > 0
