"""Conformance: prismq's codecs write exactly the bytes compressed-tensors writes, and fake-quantize activations
exactly as compressed-tensors' forward pass does."""

from __future__ import annotations

import pytest
import torch
from ct_reference import PRESETS, ct_decode, ct_encode, ct_fake_quantize_activation
from safetensors.torch import load_file

from prismq.formats import base, get_format

SERVABLE = list(PRESETS)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def assert_same_tensors(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], label: str) -> None:
    assert sorted(ours) == sorted(ref), f"{label}: tensor names differ"
    for key in ref:
        assert ours[key].dtype == ref[key].dtype, f"{label}.{key}: dtype {ours[key].dtype} != {ref[key].dtype}"
        assert ours[key].shape == ref[key].shape, f"{label}.{key}: shape {ours[key].shape} != {ref[key].shape}"
        diff = (as_bytes(ours[key]) != as_bytes(ref[key])).nonzero()
        assert len(diff) == 0, f"{label}.{key}: {len(diff)} bytes differ, first at {diff[0].tolist()}"


def hard_weight(out: int = 64, inp: int = 512, seed: int = 0) -> torch.Tensor:
    """Rows spanning 6 decades of magnitude, all-zero groups, -0.0, and rows of exact E2M1/E4M3 ties."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 10 ** torch.empty(out, 1).uniform_(-5, 1, generator=g)
    w[1, :128] = 0.0
    w[2, 5] = -0.0
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0]).repeat(inp // 8)
    w[3] = ties * torch.where(torch.arange(inp) % 3 == 0, -1.0, 1.0)
    w[4] = ties * 2.0 ** -10
    w[5] = torch.linspace(-1, 1, inp) * 448
    return w.to(torch.bfloat16)


@pytest.mark.parametrize("chunk", [None, 512, 1600])  # whole; one row at a time; 3 rows (a short last chunk)
@pytest.mark.parametrize("name", SERVABLE)
def test_encode_bytes_equal_compressed_tensors_on_hard_weights(name: str, chunk: int | None,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Large matrices are encoded a few rows at a time; forced here onto a small one, the bytes do not change."""
    if chunk is not None:
        monkeypatch.setattr(base, "CHUNK_ELEMENTS", chunk)
    w = hard_weight()
    input_amax = torch.tensor(13.7)
    assert_same_tensors(get_format(name).encode(w, input_amax=input_amax), ct_encode(name, w, input_amax=input_amax),
                        name)


@pytest.mark.parametrize("name", SERVABLE)
def test_encode_bytes_equal_compressed_tensors_on_tiny_llama(name: str, tiny_llama_dir) -> None:
    state = load_file(tiny_llama_dir / "model.safetensors")
    linears = [k for k in state if k.endswith("_proj.weight")]
    assert len(linears) == 14
    fmt = get_format(name)
    for key in linears:
        w = state[key]
        assert_same_tensors(fmt.encode(w, input_amax=torch.tensor(2.5)), ct_encode(name, w, input_amax=torch.tensor(2.5)),
                            f"{name}:{key}")


def test_nvfp4_shared_global_scale_equals_compressed_tensors_fused_observer(tiny_llama_dir) -> None:
    state = load_file(tiny_llama_dir / "model.safetensors")
    siblings = [state[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"]
    joint = torch.stack([w.abs().amax() for w in siblings]).amax()
    for w in siblings:
        ours = get_format("NVFP4A16").encode(w, shared_amax=joint)
        assert_same_tensors(ours, ct_encode("NVFP4A16", w, shared_amax=joint), "shared")
        assert torch.equal(ours["weight_global_scale"], get_format("NVFP4A16").encode(siblings[0], shared_amax=joint)[
            "weight_global_scale"])


@pytest.mark.parametrize("name", ["NVFP4", "MXFP4", "MXFP8", "FP8"])
def test_activation_fake_quant_equals_compressed_tensors_forward(name: str) -> None:
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 7, 256, generator=g) * torch.logspace(-3, 1, 256)).to(torch.bfloat16)
    x[0, 3] = 0.0
    fmt = get_format(name)
    igs = None
    if name == "NVFP4":
        from prismq.formats.nvfp4 import global_scale

        igs = global_scale(x.abs().amax())
    ours = fmt.qdq_activation(x, igs)
    ref = ct_fake_quantize_activation(name, x, igs)
    assert ours.dtype == x.dtype
    assert torch.equal(ours, ref.to(x.dtype))
    assert not torch.equal(ours, x)


@pytest.mark.parametrize("name", SERVABLE)
def test_decoding_a_few_rows_at_a_time_gives_compressed_tensors_weights(name: str,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """decode_into (how fake quantization installs shipped weights) writes compressed-tensors' decompressed weight."""
    w = hard_weight()
    tensors = get_format(name).encode(w, input_amax=torch.tensor(13.7))
    expected = ct_decode(name, tensors, torch.bfloat16)
    monkeypatch.setattr(base, "CHUNK_ELEMENTS", 1600)
    out = torch.full(w.shape, float("nan"), dtype=torch.float32)
    get_format(name).decode_into(tensors, out, torch.bfloat16)
    assert torch.equal(out, expected.float())
