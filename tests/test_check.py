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
    # per layer: q/k/v, o, and the routed experts (4 experts' gate, up, down) as one unit
    assert "6 decision units (32 quantization targets)" in out
    assert "qkv_proj                      2  NVFP4,MXFP8" in out
    assert "experts                       2  NVFP4,MXFP8" in out
    assert "routed experts" not in out  # none kept: every expert is quantized
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


def test_a_moe_run_quantizes_and_counts_every_expert(default_model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    import json
    import shutil

    import test_layout

    monkeypatch.setitem(test_layout.COMMON, "vocab_size", 49152)  # the default model's tokenizer
    model_dir = tiny_moe("qwen3_moe", tmp_path / "moe")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(default_model_dir / name, model_dir / name)
    assert main(["quantize", str(model_dir), "--out", str(tmp_path / "out"), "--calib-blocks", "2",
                 "--calib-seqlen", "32", "--heldout-blocks", "2", "--selection-blocks", "2", "--target-bits", "6",
                 "--rounding", "rtn", "--device", "cpu"]) == 0
    summary = json.loads((tmp_path / "out.work" / "summary.json").read_text())
    attention = 64 * 64 + 32 * 64 + 32 * 64 + 64 * 64
    experts = 4 * 64 * 64 + 4 * 64 * 32  # 4 experts' gate_up [64, 64] and down [64, 32]
    assert summary["linear_params"] == summary["all_weights_params"] == 2 * (attention + experts)
    assert summary["routed_experts"]["matrices"] == 2 * 4 * 3
    report = (tmp_path / "out.work" / "report.md").read_text()
    assert "routed experts: 24 expert matrices quantized" in report
    assert set(summary["peak_memory_gb"]) == set(summary["seconds"])  # every stage's time and peak memory
    assert all(0.1 < peak["host"] < 20 for peak in summary["peak_memory_gb"].values())
    assert "| stage | seconds | peak host GB |" in report
    assignment = json.loads((tmp_path / "out.work" / "rounding.json").read_text())["rounding"]["assignment"]
    for layer in range(2):
        formats = {assignment[f"model.layers.{layer}.mlp.experts.{e}.{p}"] for e in range(4)
                   for p in ("gate_proj", "up_proj", "down_proj")}
        assert len(formats) == 1 and formats != {"BF16"}  # one format per layer's experts, and quantized


def test_a_natively_quantized_source_is_refused_in_one_line(tmp_path: Path, capsys) -> None:
    import json

    model_dir = tiny_moe("qwen3_moe", tmp_path / "fp8")
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "static"}  # per-tensor FP8
    (model_dir / "config.json").write_text(json.dumps(config))
    assert main(["check", str(model_dir)]) == 1
    assert "problem: its weights are quantized (quant_method 'fp8')" in capsys.readouterr().out
    assert main(["quantize", str(model_dir), "--target-bits", "6", "--out", str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith("prismq: error: ") and "quant_method 'fp8'" in error[-1]
    assert not (tmp_path / "out").exists()
