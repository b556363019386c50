"""The fake-quantized model quantizes each distinct Linear input once: fused siblings (q/k/v, gate/up) read the same
tensor under one input scale, so they share one quantization per forward and hold nothing afterwards."""

from __future__ import annotations

import pytest
import torch

from conftest import build_tiny_llama
from prismq.export.encode import encode_model
from prismq.formats import get_format
from prismq.model.fake_quant import apply_fake_quant


def test_siblings_share_one_input_quantization(monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_tiny_llama().float()
    modules = dict(model.named_modules())
    names = [n for n, m in modules.items() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    raw: dict[str, torch.Tensor] = {}
    quantized: dict[str, torch.Tensor] = {}
    for name in names:  # registered before the fake-quant hooks: sees each Linear's unquantized input
        modules[name].register_forward_pre_hook(lambda m, args, name=name: raw.__setitem__(name, args[0]))
    assignment = {n: "NVFP4" for n in names}
    amax = {n: torch.tensor(4.0 + i) for i, n in enumerate(names)}  # siblings get their joint maximum
    encoded = encode_model(model, assignment, amax, torch.bfloat16)
    apply_fake_quant(model, assignment, encoded, torch.bfloat16)
    for name in names:  # registered after them: sees the input the Linear computes with
        modules[name].register_forward_pre_hook(lambda m, args, name=name: quantized.__setitem__(name, args[0]))
    fmt = get_format("NVFP4")
    calls = []
    original = type(fmt).qdq_activation
    monkeypatch.setattr(type(fmt), "qdq_activation", lambda self, x, igs=None: calls.append(x) or original(self, x, igs))
    tokens = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(tokens)
    assert len(calls) == 4 * 2  # per layer: q/k/v once, o_proj, gate/up once, down_proj
    for name in names:  # each input quantized exactly as on its own, under the Linear's own shipped input scale
        expected = original(fmt, raw[name], encoded[name]["input_global_scale"])
        assert torch.equal(quantized[name], expected)
    assert not torch.equal(raw[names[0]], quantized[names[0]])
    held = [h for m in modules.values() for h in m._forward_pre_hooks.values() if hasattr(h, "quantized")]
    assert held and all(h.source is None and h.quantized is None for h in held)  # nothing kept between forwards


def _kernel_contract(grid, x: torch.Tensor, check_finite: bool = True):
    """What the fused NVFP4 kernel computes, by its indexing (group g reads gs[g // per_matrix], one matrix per
    leading index of a 3-D input, the whole input one matrix in 2-D), written with the torch codec: for the routing
    of activations into it to be checked on a CPU."""
    from prismq.formats.nvfp4 import NVFP4Grid

    gs = grid.gs.reshape(-1)
    matrices = x if x.ndim == 3 else x.unsqueeze(0)
    rounded = torch.stack([NVFP4Grid(gs[m % gs.numel()].reshape(1)).round(matrix, NVFP4Grid(
        gs[m % gs.numel()].reshape(1)).fit(matrix)) for m, matrix in enumerate(matrices)])
    return rounded.reshape(x.shape), False


def test_activations_routed_to_the_fused_kernel_keep_one_global_scale_per_batch_entry(monkeypatch) -> None:
    """The cost stage and the input-range search quantize a batch [B, T, in] under scales [B, 1, 1]: routed to the
    kernel (one gs per matrix), each entry keeps its own scale, as the torch path's broadcast gives (a flattened
    batch would read the first scale for all)."""
    import prismq.formats.fused as fused

    fmt = get_format("NVFP4")
    x = (torch.randn(3, 8, 64, generator=torch.Generator().manual_seed(1)) * 2).to(torch.bfloat16)
    scales = fmt.input_scale(torch.tensor([3.0, 0.5, 40.0], dtype=torch.bfloat16)).reshape(-1, 1, 1)
    expected = fmt.qdq_activation(x, scales)
    one_scale = fmt.qdq_activation(x, scales[:1])
    monkeypatch.setattr(fused, "fused_qdq", _kernel_contract)
    assert torch.equal(fmt.qdq_activation(x, scales), expected)
    assert torch.equal(fmt.qdq_activation(x, scales[:1]), one_scale)
    assert not torch.equal(expected, one_scale)  # the scales matter here
    assert fused.fused_activation_qdq(fmt.grid(x[0]), x.requires_grad_()) is None  # a graph stays on torch
