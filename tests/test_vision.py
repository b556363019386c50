"""Vision towers (`--vision-format`): a multimodal checkpoint's vision Linears are found, shipped in the asked
format (rounded to nearest) or kept BF16, and every one of them is named in the export's quantization config, as
vLLM requires of each Linear it builds with that config."""

from __future__ import annotations

import json
import re
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn

from prismq.engine.stream import LayerStream, final_hidden_states
from prismq.errors import PrismqError
from prismq.export.writer import write_checkpoint
from prismq.model.check import check_model
from prismq.model.checkpoint import SourceTensors
from prismq.model.targets import model_targets
from prismq.model.vision import vision_assignment, vision_linears
from test_layout import tiny_qwen3_5_moe

# Qwen3.5's vision Linears as vLLM 0.34's qwen3_5 vision tower builds them with the quantization config
TOWER = ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.linear_fc1", "blocks.0.mlp.linear_fc2",
         "merger.linear_fc1", "merger.linear_fc2"]


@pytest.fixture(scope="module")
def multimodal(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen3.5-MoE as released, its vision MLP 80 wide (its fc2 cannot take a 32-wide MX group)."""
    return tiny_qwen3_5_moe(tmp_path_factory.mktemp("qwen3_5_moe"), vision_intermediate=80)


def test_the_vision_linears_are_the_towers_as_vllm_builds_them(multimodal: Path, tiny_llama_dir: Path) -> None:
    linears = vision_linears(multimodal)
    assert sorted(linears) == sorted(f"model.visual.{name}" for name in TOWER)
    assert linears["model.visual.blocks.0.mlp.linear_fc2"] == (32, 80)
    assert vision_linears(tiny_llama_dir) == {}


def test_vision_formats_refused_in_one_line(multimodal: Path) -> None:
    with pytest.raises(PrismqError, match="static input scale"):
        vision_assignment(multimodal, "NVFP4")  # its input scale would need image activations
    with pytest.raises(PrismqError, match="unknown format"):
        vision_assignment(multimodal, "FP9")
    assert set(vision_assignment(multimodal, "MXFP8A16").values()) == {"MXFP8A16", "BF16"}
    assert vision_assignment(multimodal, "MXFP8A16")["model.visual.blocks.0.mlp.linear_fc2"] == "BF16"  # 80 % 32


def _matches(name: str, entries: list[str]) -> bool:
    """vLLM's rule for a config target or ignore entry: the name itself, or `re:` + a regex matched at its start."""
    return any(re.match(e[3:], name) if e.startswith("re:") else e == name for e in entries)


def _decompressed(directory: Path, stem: str, scheme: dict) -> torch.Tensor:
    """A weight as the compressed-tensors library decompresses it from the export's tensors."""
    from compressed_tensors.compressors.base import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    with ExitStack() as stack:
        written = SourceTensors(directory, stack)
        local = {key.removeprefix(stem + "."): written.get(key) for key in written.location
                 if key.startswith(stem + ".") and "." not in key.removeprefix(stem + ".")}
    compressor = BaseCompressor.get_value_from_registry(scheme["format"])
    return compressor.decompress(local, QuantizationScheme.model_validate(scheme))["weight"]


@pytest.mark.parametrize("vision_format", ["FP8", "NVFP4A16", "BF16"])
def test_a_quantized_tower_ships_in_its_format_and_every_linear_is_named(multimodal: Path, tmp_path: Path,
                                                                         vision_format: str) -> None:
    """Every Linear of the multimodal class is matched by a config target or by `ignore` (vLLM refuses one that
    is not); the vision weights decompress, by compressed-tensors, to the source rounded to nearest (the FP8
    codes: within half an E4M3 step); a BF16 tower is written byte for byte."""
    assignment = dict.fromkeys(model_targets(multimodal), "BF16")
    vision = vision_assignment(multimodal, vision_format)
    result = write_checkpoint(multimodal, assignment, tmp_path / "out", vision=vision, progress=False)
    qconfig = json.loads((result.path / "config.json").read_text())["quantization_config"]
    groups = {t: g for g in qconfig["config_groups"].values() for t in g["targets"]}
    config = transformers.AutoConfig.from_pretrained(multimodal)
    with torch.device("meta"):
        model = transformers.Qwen3_5MoeForConditionalGeneration(config)
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    # and vLLM's MTP model (Qwen3_5MoeMTP), built with the same config: its fc, attention shards, fused experts
    linears += ["mtp.fc", "mtp.layers.0.self_attn.q_proj", "mtp.layers.0.mlp.experts"]
    assert all(_matches(n, list(groups)) != _matches(n, qconfig["ignore"]) for n in linears)
    with ExitStack() as stack:
        source, written = SourceTensors(multimodal, stack), SourceTensors(result.path, stack)
        for name in TOWER:
            stem = f"model.visual.{name}"
            original = source.get(f"{stem}.weight").float()
            if vision_format == "BF16":
                assert stem in qconfig["ignore"]
                assert torch.equal(written.get(f"{stem}.weight"), source.get(f"{stem}.weight"))
                continue
            if vision[stem] == "BF16":  # NVFP4A16's per-tensor global scale: the fused qkv stays BF16
                assert vision_format == "NVFP4A16" and name == "blocks.0.attn.qkv" and stem in qconfig["ignore"]
                continue
            assert stem in groups and stem not in qconfig["ignore"]
            decoded = _decompressed(result.path, stem, groups[stem]).float()
            step = 2.0 ** -3 if vision_format == "FP8" else 0.5  # E4M3's relative step, E2M1's
            scale = original.abs().amax(dim=1, keepdim=True)
            assert torch.all((decoded - original).abs() <= step * scale / 2 + 1e-6), stem
            assert not torch.equal(decoded, original)
    assert result.vision_params == sum(r * c for r, c in vision_linears(multimodal).values())
    if vision_format != "BF16":
        assert result.vision_bytes < result.vision_params * 2  # fewer bytes than BF16
    # the read-back of the export (the text model, its Linears all BF16 here) computes what the source does
    blocks = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    with LayerStream(multimodal, torch.float32) as source_stream, LayerStream(result.path, torch.float32) as stream:
        assert torch.equal(final_hidden_states(stream, blocks, progress=False)[0],
                           final_hidden_states(source_stream, blocks, progress=False)[0])


def test_check_states_the_vision_policy(multimodal: Path) -> None:
    report = check_model(multimodal, ["NVFP4", "BF16"], "FP8")
    assert set(report.vision.values()) == {"FP8"} and len(report.vision) == len(TOWER)
    assert "vision tower: 6 Linears, 6 FP8" in report.table()
    assert not any(name.startswith("model.visual.") and name.endswith(".weight") and name.removesuffix(".weight")
                   in report.vision for name in report.passthrough)
    assert len(check_model(multimodal, ["NVFP4", "BF16"]).vision) == len(TOWER)  # BF16, named in ignore


def test_mtp_layers_are_ignored_by_root() -> None:
    """DeepSeek V3 stores its MTP layer as decoder layer 61 of 61 (vLLM builds its Linears under those names),
    Qwen3.5 under `mtp.`; the layers the model has are not ignored."""
    from prismq.export.qconfig import unloaded_roots

    keys = ["model.layers.60.mlp.experts.3.up_proj.weight", "model.layers.61.eh_proj.weight",
            "model.layers.61.mlp.experts.0.gate_proj.weight", "model.embed_tokens.weight", "mtp.fc.weight"]
    roots = unloaded_roots(keys, 61)
    assert roots == [r"re:^model\.layers\.61\.", r"re:^mtp\."]
    assert _matches("model.layers.61.self_attn.q_a_proj", roots)
    assert not _matches("model.layers.6.self_attn.q_a_proj", roots)
    assert unloaded_roots(keys, None) == [r"re:^mtp\."]


def test_cli_states_the_tower_and_refuses_a_bad_vision_format_in_one_line(multimodal: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    from prismq.cli import main

    assert main(["check", str(multimodal), "--vision-format", "fp8"]) == 0
    assert "vision tower: 6 Linears, 6 FP8" in capsys.readouterr().out
    assert main(["check", str(multimodal), "--vision-format", "NVFP4"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "static input scale" in err[0] and "Traceback" not in err[0]
