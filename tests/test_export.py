"""The checkpoint writer: CT-identical bytes, transformers + compressed-tensors load it to exactly our decode(),
a mixed checkpoint's logits equal the in-memory fake-quantized model's, and bad requests lose nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_llama
from ct_reference import PRESETS, ct_encode
from safetensors import safe_open
from safetensors.torch import load_file

from prismq.errors import PrismqError
from prismq.export.encode import encode_model
from prismq.export.writer import write_checkpoint
from prismq.formats import get_format
from prismq.model.fake_quant import apply_fake_quant
from prismq.model.linears import linear_shapes, quantizable
from prismq.model.siblings import sibling_groups

SERVABLE = list(PRESETS)


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def load_quantized(path: Path):
    """Load through transformers + compressed-tensors and run one forward (which decompresses the weights)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
    return model


def input_amax_for(names) -> dict[str, torch.Tensor]:
    return {name: torch.tensor(3.0 + i % 5) for i, name in enumerate(names)}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A 3-layer tiny Llama with a tokenizer config and generation config beside its weights."""
    path = tmp_path_factory.mktemp("src")
    model = build_tiny_llama(num_hidden_layers=3)
    model.generation_config.max_new_tokens = 7
    model.save_pretrained(path)
    (path / "tokenizer_config.json").write_text('{"model_max_length": 256}')
    return path


@pytest.mark.parametrize("name", SERVABLE)
def test_uniform_export_is_ct_identical_and_loads_to_our_decode(name: str, source: Path, tmp_path: Path) -> None:
    linears = quantizable(linear_shapes(source))
    assignment = {n: name for n in linears}
    amax = input_amax_for(linears)
    result = write_checkpoint(source, assignment, tmp_path / "out", input_amax=amax, progress=False)
    written = read_checkpoint(result.path)
    src = load_file(source / "model.safetensors")
    fmt = get_format(name)
    expected_linear_bytes = 0
    for group in sibling_groups(linears):
        joint = torch.stack([src[f"{n}.weight"].abs().amax() for n in group]).amax()
        joint_input = torch.stack([amax[n] for n in group]).amax()
        for n in group:
            ref = ct_encode(name, src[f"{n}.weight"], shared_amax=joint, input_amax=joint_input)
            for suffix, tensor in ref.items():
                ours = written[f"{n}.{suffix}"]
                assert ours.dtype == tensor.dtype and torch.equal(ours.view(torch.uint8) if ours.element_size() == 1
                                                                  else ours, tensor.view(torch.uint8)
                                                                  if tensor.element_size() == 1 else tensor), (n, suffix)
            assert f"{n}.weight" not in written or fmt.scheme()["format"] in ("float-quantized", "mxfp8-quantized")
            expected_linear_bytes += fmt.nbytes(linears[n])
    assert result.linear_bytes == expected_linear_bytes
    assert result.checkpoint_bytes == sum(t.numel() * t.element_size() for t in written.values())
    assert (result.path / "tokenizer_config.json").exists() and (result.path / "generation_config.json").exists()

    from compressed_tensors.quantization import QuantizationConfig

    qconfig = json.loads((result.path / "config.json").read_text())["quantization_config"]
    QuantizationConfig.model_validate(qconfig)
    assert qconfig["ignore"] == ["lm_head"] and qconfig["format"] == fmt.scheme()["format"]

    model = load_quantized(result.path)
    modules = dict(model.named_modules())
    for n in linears:
        tensors = {k.removeprefix(f"{n}."): v for k, v in written.items() if k.startswith(f"{n}.")}
        assert torch.equal(modules[n].weight.data, fmt.decode(tensors, torch.bfloat16)), n


MIXED = ["NVFP4", "NVFP4A16", "MXFP4", "MXFP4A16", "MXFP8", "MXFP8A16", "FP8", "INT8_W8A16", "INT4_W4A16", "BF16",
         "NVFP4A16", "NVFP4"]


def mixed_assignment(linears) -> dict[str, str]:
    groups = sibling_groups(linears)
    assert len(groups) == len(MIXED)
    return {n: fmt for group, fmt in zip(groups, MIXED) for n in group}


def test_mixed_checkpoint_logits_equal_in_memory_fake_quant(source: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    linears = quantizable(linear_shapes(source))
    assignment = mixed_assignment(linears)
    amax = input_amax_for(linears)
    result = write_checkpoint(source, assignment, tmp_path / "mixed", input_amax=amax, max_shard_bytes=400_000,
                              progress=False)
    assert len(list(result.path.glob("model-*-of-*.safetensors"))) > 1
    index = json.loads((result.path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == result.checkpoint_bytes
    qconfig = json.loads((result.path / "config.json").read_text())["quantization_config"]
    assert qconfig["format"] == "mixed-precision"
    assert all("format" in g for g in qconfig["config_groups"].values())
    bf16_linears = [n for n, f in assignment.items() if f == "BF16"]
    assert qconfig["ignore"] == ["lm_head", *bf16_linears]
    for group in sibling_groups(linears):  # fused partners sit in the same config group
        owners = {k for k, g in qconfig["config_groups"].items() for n in group if n in g["targets"]}
        assert len(owners) <= 1

    loaded = load_quantized(result.path)
    reference = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).eval()
    apply_fake_quant(reference, assignment, encode_model(reference, assignment, amax))
    tokens = torch.randint(0, 512, (2, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = reference(tokens).logits, loaded(tokens).logits
    assert torch.equal(ours, theirs)
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).eval()(tokens).logits
    assert not torch.equal(ours, plain)


def test_fused_siblings_must_share_a_format(source: Path, tmp_path: Path) -> None:
    linears = quantizable(linear_shapes(source))
    assignment = {n: "NVFP4A16" for n in linears}
    assignment["model.layers.1.self_attn.k_proj"] = "MXFP8"
    with pytest.raises(PrismqError, match="fused siblings.*k_proj=MXFP8"):
        write_checkpoint(source, assignment, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("change, message", [
    ({"lm_head": "NVFP4A16"}, "lm_head must stay BF16"),
    ({"model.layers.0.mlp.down_proj": "MXFP6_E2M3"}, "research format"),
    ({"model.layers.0.mlp.nothing": "FP8"}, "names model.layers.0.mlp.nothing, which is not a Linear layer"),
    ({"model.layers.0.mlp.down_proj": "NVFP4"}, "needs the calibrated input absmax"),
])
def test_bad_assignments_are_refused_clearly(change, message, source: Path, tmp_path: Path) -> None:
    assignment = {n: "INT8_W8A16" for n in quantizable(linear_shapes(source))} | change
    with pytest.raises(PrismqError, match=message):
        write_checkpoint(source, assignment, tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_shape_a_format_cannot_take_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "odd"
    build_tiny_llama(hidden_size=96, intermediate_size=200, num_attention_heads=2, num_key_value_heads=1,
                     head_dim=48).save_pretrained(path)
    assignment = {n: "INT4_W4A16" for n in quantizable(linear_shapes(path))}
    with pytest.raises(PrismqError, match="INT4_W4A16 needs in_features divisible by 128, got 96"):
        write_checkpoint(path, assignment, tmp_path / "out", progress=False)


def test_existing_output_needs_overwrite_and_interrupts_leave_it_intact(source: Path, tmp_path: Path,
                                                                        monkeypatch) -> None:
    linears = quantizable(linear_shapes(source))
    out = tmp_path / "out"
    write_checkpoint(source, {n: "FP8" for n in linears}, out, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(PrismqError, match="already exists.*--overwrite"):
        write_checkpoint(source, {n: "MXFP8" for n in linears}, out, progress=False)

    from prismq.export import shards

    calls = {"n": 0}
    original = shards.ShardWriter.add

    def interrupted_add(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 9:
            raise KeyboardInterrupt
        return original(self, name, tensor)

    monkeypatch.setattr(shards.ShardWriter, "add", interrupted_add)
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(source, {n: "MXFP8" for n in linears}, out, overwrite=True, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    monkeypatch.setattr(shards.ShardWriter, "add", original)
    write_checkpoint(source, {n: "MXFP8" for n in linears}, out, overwrite=True, progress=False)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight").dtype == torch.float8_e4m3fn


def test_pre_encoded_tensors_are_written_as_given_and_checked(source: Path, tmp_path: Path) -> None:
    linears = quantizable(linear_shapes(source))
    name = "model.layers.2.mlp.down_proj"
    w = load_file(source / "model.safetensors")[f"{name}.weight"]
    custom = get_format("INT4_W4A16").encode(w * 0.5)
    result = write_checkpoint(source, {n: "INT4_W4A16" for n in linears}, tmp_path / "a",
                              encoded={name: custom}, progress=False)
    assert torch.equal(read_checkpoint(result.path)[f"{name}.weight_scale"], custom["weight_scale"])
    bad = dict(custom, weight_scale=custom["weight_scale"].float())
    with pytest.raises(PrismqError, match="do not match what INT4_W4A16 ships"):
        write_checkpoint(source, {n: "INT4_W4A16" for n in linears}, tmp_path / "b", encoded={name: bad},
                         progress=False)
