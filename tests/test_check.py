"""`prismq check`: what prismq will do with a checkpoint, from its config and tensor headers, before any compute."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file, save_file

from prismq.cli import main
from test_layout import tiny_moe


def test_check_lists_units_kept_weights_and_passthrough_tensors(tmp_path: Path, capsys) -> None:
    model_dir = tiny_moe("qwen3_moe", tmp_path / "moe")
    tensors = load_file(model_dir / "model.safetensors")
    tensors["mtp.layers.0.eh_proj.weight"] = tensors["model.layers.0.self_attn.o_proj.weight"].clone()  # an MTP head
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    assert main(["check", str(model_dir), "--formats", "NVFP4,MXFP8"]) == 0
    out = capsys.readouterr().out
    assert "4 decision units (8 quantization targets)" in out  # q/k/v and o per layer: experts are 3-D parameters
    assert "qkv_proj                      2  NVFP4,MXFP8" in out
    assert "routed experts (3-D parameters; expert quantization is not built yet) (49,152 weights)" in out
    assert "1 tensors, e.g. mtp.layers.0.eh_proj.weight" in out and out.rstrip().endswith("ok")


def test_check_and_quantize_refuse_a_checkpoint_missing_an_expert(tmp_path: Path, capsys) -> None:
    model_dir = tiny_moe("mixtral", tmp_path / "mixtral")
    tensors = load_file(model_dir / "model.safetensors")
    del tensors["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    assert main(["check", str(model_dir)]) == 1
    assert "problem: model.layers.1.mlp.experts.gate_up_proj: the checkpoint has no tensor " \
           "model.layers.1.block_sparse_moe.experts.2.w3.weight" in capsys.readouterr().out
    assert main(["quantize", str(model_dir), "--target-bits", "6", "--out", str(tmp_path / "out")]) == 1
    assert "experts.2.w3.weight (per-expert tensors" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
