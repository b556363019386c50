"""Natively block-FP8 checkpoints (DeepSeek V3, MiniMax M2 and Qwen3-FP8 ship their weights so): read dequantized,
exactly as transformers dequantizes them, by every stage."""

from __future__ import annotations

import json
import re
import shutil
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import build_tiny_llama
from prismq.errors import PrismqError
from prismq.model.checkpoint import SourceTensors

BLOCK = 128


def block_quantize(weight: torch.Tensor, block: tuple[int, int] = (BLOCK, BLOCK)) -> tuple[torch.Tensor, torch.Tensor]:
    """E4M3 codes and float32 block scales (amax / 448 per block, a partial last block where a dimension is not a
    multiple of the block) of a 2-D weight, as DeepSeek V3's checkpoints hold them."""
    rows, columns = weight.shape
    row_block, column_block = torch.arange(rows) // block[0], torch.arange(columns) // block[1]
    shape = (int(row_block[-1]) + 1, int(column_block[-1]) + 1)
    flat_block = (row_block[:, None] * shape[1] + column_block[None, :]).flatten()
    amax = torch.zeros(shape[0] * shape[1]).scatter_reduce(0, flat_block, weight.float().abs().flatten(), "amax")
    scales = torch.where(amax == 0, 1.0, amax / 448).reshape(shape)  # an all-zero block: any scale
    return (weight.float() / scales[row_block[:, None], column_block[None, :]]).to(torch.float8_e4m3fn), scales


def write_block_fp8(bf16_dir: Path, out_dir: Path, block: tuple[int, int] = (BLOCK, BLOCK)) -> None:
    """`bf16_dir`'s decoder-layer projections (`*_proj.weight`, routed experts' included) as E4M3 codes with one
    float32 scale (amax / 448) per block, as DeepSeek V3 stores them (`weight` + `weight_scale_inv`); every other
    tensor (routers, norms, embeddings, head) and file as it is."""
    out_dir.mkdir(parents=True)
    tensors = {}
    for name, weight in load_file(bf16_dir / "model.safetensors").items():
        if not (name.startswith("model.layers.") and weight.ndim == 2 and name.endswith("_proj.weight")
                or name.endswith((".w1.weight", ".w2.weight", ".w3.weight"))):
            tensors[name] = weight
            continue
        tensors[name], tensors[name + "_scale_inv"] = block_quantize(weight, block)
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    for file in bf16_dir.iterdir():
        if file.name != "model.safetensors":
            shutil.copy2(file, out_dir / file.name)
    config = json.loads((bf16_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(block)}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))


@pytest.fixture(scope="module")
def fp8_llama(default_model_dir: Path, tmp_path_factory) -> Path:
    """A 2-layer Llama (hidden 256, intermediate 384: whole 128 x 128 blocks) with the default model's tokenizer,
    stored in block FP8."""
    bf16 = tmp_path_factory.mktemp("fp8-src-bf16")
    build_tiny_llama(hidden_size=256, intermediate_size=384, vocab_size=49152, num_attention_heads=2,
                     num_key_value_heads=1).save_pretrained(bf16)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(default_model_dir / name, bf16 / name)
    out = tmp_path_factory.mktemp("fp8-llama") / "model"
    write_block_fp8(bf16, out)
    return out


def test_block_fp8_weights_read_as_transformers_dequantizes_them(fp8_llama: Path) -> None:
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    reference = AutoModelForCausalLM.from_pretrained(fp8_llama, dtype=torch.bfloat16,
                                                     quantization_config=FineGrainedFP8Config(dequantize=True))
    expected = reference.state_dict()
    with ExitStack() as stack:
        source = SourceTensors(fp8_llama, stack)
        assert not any(name.endswith("_scale_inv") for name in source.names())
        fp8_weights = [name for name in source.names() if source.block_scales(name) is not None]
        assert len(fp8_weights) == 14
        for name in source.names():
            assert torch.equal(source.get(name), expected[name]), name
            assert source.dtype(name) == expected[name].dtype
        name = "model.layers.1.mlp.down_proj.weight"  # rows read in pieces that cut blocks
        assert torch.equal(torch.cat([source.get_rows(name, 0, 100), source.get_rows(name, 100, 250),
                                      source.get_rows(name, 250, 256)]), expected[name])


def test_partial_blocks_take_their_blocks_scale(tmp_path: Path) -> None:
    """A dimension that is not a multiple of the block (DeepSeek's kv_a_proj_with_mqa: 576 rows) ends in a partial
    block: element (r, c) is code (r, c) times scale (r // 128, c // 128)."""
    bf16 = tmp_path / "bf16"
    build_tiny_llama(hidden_size=192, intermediate_size=320, num_attention_heads=2,
                     num_key_value_heads=1).save_pretrained(bf16)
    write_block_fp8(bf16, tmp_path / "fp8")
    stored = load_file(tmp_path / "fp8" / "model.safetensors")
    with ExitStack() as stack:
        source = SourceTensors(tmp_path / "fp8", stack)
        for name in ("model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight"):
            codes, scales = stored[name].float(), stored[name + "_scale_inv"]
            rows, columns = torch.meshgrid(torch.arange(codes.shape[0]), torch.arange(codes.shape[1]),
                                           indexing="ij")
            expected = (codes * scales[rows // BLOCK, columns // BLOCK]).to(torch.bfloat16)
            assert torch.equal(source.get(name), expected)
            assert torch.equal(source.get_rows(name, 130, 300), expected[130:300])
            assert torch.equal(source.block_scales(name), scales)


@pytest.mark.parametrize("family", ["deepseek_v3", "minimax_m2"])
def test_a_block_fp8_moe_streams_like_transformers_dequantizes_it(family: str, tmp_path: Path) -> None:
    """Routed experts stored per expert in block FP8 (as DeepSeek V3 and MiniMax M2 ship them) fill the fused
    expert parameters dequantized: the streamed model computes what transformers' dequantizing load computes."""
    from test_layout import tiny_moe

    from prismq.engine.stream import BATCH_BLOCKS, LayerStream, final_hidden_states
    from prismq.model.source import load_model

    write_block_fp8(tiny_moe(family, tmp_path / "bf16"), tmp_path / "fp8", block=(16, 16))
    blocks = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    whole = load_model(tmp_path / "fp8", torch.float32)  # transformers + FineGrainedFP8Config(dequantize=True)
    with torch.no_grad():
        expected = [row for batch in blocks.split(BATCH_BLOCKS)  # the blocks the stream runs together
                    for row in whole.model(batch, use_cache=False).last_hidden_state]
    with LayerStream(tmp_path / "fp8", torch.float32) as stream:
        assert sum(".experts.3." in key for key in stream.source.scales) >= 3  # gate, up, down per MoE layer
        streamed = final_hidden_states(stream, blocks, progress=False)
    assert all(torch.equal(got, want) for got, want in zip(streamed, expected))


def test_a_scale_of_the_wrong_shape_is_a_clear_error(fp8_llama: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(fp8_llama, broken)
    tensors = load_file(broken / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight_scale_inv"] = torch.ones(2, 2)
    save_file(tensors, broken / "model.safetensors")
    with ExitStack() as stack, pytest.raises(PrismqError, match="up_proj.weight_scale_inv has shape"):
        SourceTensors(broken, stack)


def test_quantizing_a_block_fp8_source_ships_what_its_dequantized_copy_ships(fp8_llama: Path,
                                                                              tmp_path: Path) -> None:
    """Every stage (probe, cost, ranges, rounding by GPTQ, export, eval) on the FP8 checkpoint gives the bytes and
    KL of the same run on the bf16 copy transformers dequantizes it to."""
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    from prismq.cli import main

    copy = tmp_path / "dequantized"
    AutoModelForCausalLM.from_pretrained(fp8_llama, dtype=torch.bfloat16,
                                         quantization_config=FineGrainedFP8Config(dequantize=True)).save_pretrained(copy)
    config = json.loads((copy / "config.json").read_text())
    config.pop("quantization_config", None)
    (copy / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(fp8_llama / name, copy / name)
    results = []
    for model in (fp8_llama, copy):
        out = tmp_path / f"out-{model.name}"
        assert main(["quantize", str(model), "--out", str(out), "--uniform", "NVFP4", "--rounding", "gptq",
                     "--calib-blocks", "4", "--calib-seqlen", "32", "--heldout-blocks", "2", "--device", "cpu"]) == 0
        evaluation = json.loads((Path(f"{out}.work") / "eval.json").read_text())
        tensors = {name: tensor for p in out.glob("*.safetensors") for name, tensor in load_file(p).items()}
        results.append((tensors, evaluation["mean_kl"]))
    (fp8_tensors, fp8_kl), (copy_tensors, copy_kl) = results
    assert fp8_kl == copy_kl
    assert fp8_tensors.keys() == copy_tensors.keys()
    for name, tensor in fp8_tensors.items():  # the same bytes, tensor by tensor (the files order them differently)
        assert tensor.dtype == copy_tensors[name].dtype, name
        assert torch.equal(tensor.view(torch.uint8), copy_tensors[name].view(torch.uint8)), name
    exported = json.loads((tmp_path / f"out-{fp8_llama.name}" / "config.json").read_text())
    assert exported["quantization_config"]["quant_method"] == "compressed-tensors"


def _hard_block_fp8() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes and scales of a [256, 384] weight whose blocks span 1e-3 .. 10 (with an all-zero block), and the
    weight read from them in bf16."""
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(256, 384, generator=g) * torch.logspace(-3, 1, 384)
    weight[128:, 256:] = 0.0
    codes, scales = block_quantize(weight.to(torch.bfloat16))
    rows, columns = torch.meshgrid(torch.arange(256), torch.arange(384), indexing="ij")
    read = (codes.float() * scales[rows // BLOCK, columns // BLOCK]).to(torch.bfloat16)
    return codes, scales, read


def test_fp8_source_ships_the_sources_bytes_as_compressed_tensors_compresses_and_reads_them() -> None:
    from compressed_tensors.compressors.base import BaseCompressor
    from compressed_tensors.quantization import preset_name_to_scheme

    from prismq.formats import FormatError, get_format

    codes, scales, read = _hard_block_fp8()
    fmt = get_format("FP8_SOURCE")
    tensors = fmt.encode(read, block_scales=scales, name="w")
    assert torch.equal(tensors["weight"].view(torch.uint8), codes.view(torch.uint8))
    assert torch.equal(tensors["weight_scale"], scales)
    assert {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()} == fmt.tensor_specs((256, 384))
    assert fmt.nbytes((256, 384)) == 256 * 384 + 4 * 2 * 3
    scheme = preset_name_to_scheme("FP8_BLOCK", ["Linear"])
    compressor = BaseCompressor.get_value_from_registry("float-quantized")
    theirs = compressor.compress({"weight": read, "weight_scale": scales,
                                  "weight_zero_point": torch.zeros_like(scales)}, scheme)
    # the same codes (compressed-tensors adds its zero point, writing the source's -0 codes as +0: same values)
    assert torch.equal(theirs["weight"].float(), codes.float())
    assert torch.equal(compressor.decompress(dict(tensors), scheme)["weight"].to(torch.bfloat16), read)
    assert torch.equal(fmt.decode(tensors), read)
    out = torch.full((256, 384), float("nan"))
    fmt.decode_into(tensors, out, torch.bfloat16)
    assert torch.equal(out, read.float())
    with pytest.raises(FormatError, match="not stored in block FP8"):
        fmt.encode(read, name="w")
    with pytest.raises(FormatError, match="not its block-FP8 source's"):
        fmt.encode(read * 1.01, block_scales=scales, name="w")
    assert fmt.legal((576, 7168)) and fmt.legal((512, 7168)) and not fmt.legal((512, 7100))


def test_fp8_source_keeps_a_partial_block_of_rows_last_in_a_fusion() -> None:
    """DeepSeek's 576-row `kv_a_proj_with_mqa` ends on a partial block of rows: compressed-tensors decompresses it
    as prismq decodes it, and vLLM takes it last in its fused q_a / kv_a layer (its merged block-FP8 check lets only
    the last member end on a partial block), so the fused unit keeps its bytes; a partial block first does not."""
    from compressed_tensors.compressors.base import BaseCompressor
    from compressed_tensors.quantization import preset_name_to_scheme

    from prismq.formats import get_format
    from prismq.model.units import formats_legal_for

    g = torch.Generator().manual_seed(3)
    read = (torch.randn(576, 256, generator=g) * 0.02).to(torch.bfloat16)
    codes, scales = block_quantize(read)
    rows, columns = torch.meshgrid(torch.arange(576), torch.arange(256), indexing="ij")
    read = (codes.float() * scales[rows // BLOCK, columns // BLOCK]).to(torch.bfloat16)
    fmt = get_format("FP8_SOURCE")
    tensors = fmt.encode(read, block_scales=scales, name="kv_a_proj_with_mqa")
    assert torch.equal(tensors["weight"].view(torch.uint8), codes.view(torch.uint8)) and scales.shape == (5, 2)
    compressor = BaseCompressor.get_value_from_registry("float-quantized")
    theirs = compressor.decompress(dict(tensors), preset_name_to_scheme("FP8_BLOCK", ["Linear"]))["weight"]
    assert torch.equal(theirs.to(torch.bfloat16), read) and torch.equal(fmt.decode(tensors), read)
    q_a, kv_a = (1536, 7168), (576, 7168)
    assert formats_legal_for([q_a, kv_a], ["FP8_SOURCE", "NVFP4"], block_fp8=True) == ["FP8_SOURCE", "NVFP4"]
    assert formats_legal_for([kv_a, q_a], ["FP8_SOURCE", "NVFP4"], block_fp8=True) == ["NVFP4"]
    assert formats_legal_for([q_a, kv_a], ["FP8_SOURCE", "NVFP4"], block_fp8=False) == ["NVFP4"]


def test_fp8_source_activations_are_quantized_as_compressed_tensors_does() -> None:
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    from prismq.formats import get_format

    g = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 7, 256, generator=g) * torch.logspace(-3, 1, 256)).to(torch.bfloat16)
    x[0, 3] = 0.0
    args = preset_name_to_scheme("FP8_BLOCK", ["Linear"]).input_activations
    scale, _ = compute_dynamic_scales_and_zp(x, args, module=None)
    expected = fake_quantize(x, scale, None, args)
    ours = get_format("FP8_SOURCE").qdq_activation(x)
    assert torch.equal(ours, expected.to(x.dtype)) and not torch.equal(ours, x)


def test_fp8_source_exports_the_sources_bytes_and_reads_back_as_measured(fp8_llama: Path, tmp_path: Path,
                                                                         capsys) -> None:
    """`--uniform FP8_SOURCE` writes every projection as the source stores it (its `weight_scale_inv` renamed
    `weight_scale`, in compressed-tensors' block-FP8 group) and compressed-tensors' read-back measures the KL the
    round stage measured on the same text; `prismq check` offers FP8_SOURCE beside the listed formats. MTP heads
    (a layer past the decoder's, as DeepSeek V3's layer 61, and `mtp.`) pass through: their Linears stored in block
    FP8 as stored, each a target of the block-FP8 group that their root's ignore entry spares (vLLM builds them with
    the checkpoint's config, under these names), a BF16 one in `ignore`, an FP8 one whose columns fill no whole
    block dequantized."""
    from prismq.cli import main

    model = tmp_path / "model"
    shutil.copytree(fp8_llama, model)
    tensors = load_file(model / "model.safetensors")
    g = torch.Generator().manual_seed(5)
    layer = "model.layers.2"
    experts = {f"{layer}.mlp.experts.{e}.{p}": (256, 128) if p == "down_proj" else (128, 256)
               for e in range(2) for p in ("gate_proj", "up_proj", "down_proj")}
    kept = {f"{layer}.self_attn.q_a_proj": (256, 256), f"{layer}.self_attn.kv_a_proj_with_mqa": (192, 256),
            **experts}
    dequantized = {"mtp.fc": (128, 200),  # columns in no whole block
                   f"{layer}.mlp.shared_experts.gate_proj": (128, 256),  # its fused partner (up) is BF16
                   f"{layer}.eh_proj": (256, 512)}  # vLLM builds DeepSeek's eh_proj as a plain nn.Linear
    for stem, shape in {**kept, **dequantized}.items():
        weight = (torch.randn(shape, generator=g) * 0.05).to(torch.bfloat16)
        tensors[f"{stem}.weight"], tensors[f"{stem}.weight_scale_inv"] = block_quantize(weight)
    tensors[f"{layer}.mlp.shared_experts.up_proj.weight"] = torch.randn(128, 256, generator=g).to(torch.bfloat16)
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    assert main(["check", str(model)]) == 0
    report = capsys.readouterr().out
    assert "NVFP4,MXFP8,BF16,FP8_SOURCE" in report
    assert ("MTP head (vLLM builds it from the source tensors), 12 tensors, e.g. model.layers.2.eh_proj.weight; 8 of "
            "them stored in block FP8, shipped so (FP8_SOURCE); 3 of them stored in block FP8, written dequantized"
            in report)
    out = tmp_path / "out"
    assert main(["quantize", str(model), "--out", str(out), "--uniform", "FP8_SOURCE", "--calib-blocks", "4",
                 "--calib-seqlen", "32", "--heldout-blocks", "2", "--device", "cpu"]) == 0
    source = load_file(model / "model.safetensors")
    shipped = load_file(out / "model.safetensors")
    stored = [name for name in source if name.endswith("_scale_inv") and name.startswith("model.layers.")
              and name.removesuffix(".weight_scale_inv") not in dequantized]
    assert len(stored) == 14 + len(kept)
    for scale_name in stored:
        weight = scale_name.removesuffix("_scale_inv")
        assert torch.equal(shipped[weight].view(torch.uint8), source[weight].view(torch.uint8)), weight
        assert torch.equal(shipped[weight.removesuffix("weight") + "weight_scale"], source[scale_name])
    for stem, (rows, columns) in dequantized.items():
        codes, scale = tensors[f"{stem}.weight"], tensors[f"{stem}.weight_scale_inv"]
        expanded = scale.repeat_interleave(BLOCK, 0)[:rows].repeat_interleave(BLOCK, 1)[:, :columns]
        assert torch.equal(shipped[f"{stem}.weight"], (codes.float() * expanded).bfloat16()), stem
    up = f"{layer}.mlp.shared_experts.up_proj.weight"
    assert torch.equal(shipped[up], tensors[up])
    assert not any(name.endswith("_scale_inv") for name in shipped)
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    group = qconfig["config_groups"]["group_0"]
    assert group["weights"]["strategy"] == "block" and group["weights"]["block_structure"] == [BLOCK, BLOCK]
    assert group["input_activations"]["strategy"] == "group" and group["input_activations"]["dynamic"]
    # the names vLLM asks the config about: a fused layer by its shards' names (or its own where the model maps
    # none), a MoE layer by expert 0's projections
    served = ["model.layers.0.self_attn.q_proj", f"{layer}.self_attn.q_a_proj", f"{layer}.self_attn.kv_a_proj_with_mqa",
              f"{layer}.self_attn.fused_qkv_a_proj", *[f"{layer}.mlp.experts.0.{p}" for p in ("gate_proj", "up_proj",
                                                                                               "down_proj")]]
    assert all(_matches(n, group["targets"]) and not _matches(n, qconfig["ignore"]) for n in served)
    unquantized = [f"{layer}.eh_proj", "mtp.fc", f"{layer}.mlp.shared_experts.gate_proj",
                   f"{layer}.mlp.shared_experts.up_proj", f"{layer}.mlp.shared_experts.gate_up_proj"]
    assert all(_matches(n, qconfig["ignore"]) and not _matches(n, group["targets"]) for n in unquantized)
    work = Path(f"{out}.work")
    measured = json.loads((work / "rounding.json").read_text())["rounding"]["mix_report"]["mean_kl"]
    evaluation = json.loads((work / "eval.json").read_text())["mean_kl"]
    assert 0 < evaluation == pytest.approx(measured, rel=1e-6)


def _matches(name: str, entries: list[str]) -> bool:
    """vLLM's rule for a config target or ignore entry: the name itself, or `re:` + a regex matched at its start."""
    return any(re.match(e[3:], name) if e.startswith("re:") else e == name for e in entries)


def test_fp8_source_routed_experts_ship_as_stored_and_read_back_as_measured(default_model_dir: Path,
                                                                             tmp_path: Path) -> None:
    """A Qwen3-MoE stored in block FP8, experts per expert (as the FP8 releases of MoE models store them): under
    `--uniform FP8_SOURCE` every expert's matrices ship as stored, and the read-back measures the round stage's KL."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    from prismq.cli import main

    config = Qwen3MoeConfig(hidden_size=128, intermediate_size=256, moe_intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=128, num_experts=4,
                            num_experts_per_tok=2, vocab_size=49152)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(default_model_dir / name, tmp_path / "bf16" / name)
    write_block_fp8(tmp_path / "bf16", tmp_path / "fp8")
    out = tmp_path / "out"
    assert main(["quantize", str(tmp_path / "fp8"), "--out", str(out), "--uniform", "FP8_SOURCE", "--calib-blocks",
                 "4", "--calib-seqlen", "32", "--heldout-blocks", "2", "--device", "cpu"]) == 0
    source, shipped = load_file(tmp_path / "fp8" / "model.safetensors"), load_file(out / "model.safetensors")
    experts = [name for name in source if ".experts." in name and name.endswith("_scale_inv")]
    assert len(experts) == 2 * 4 * 3
    for scale_name in experts:
        weight = scale_name.removesuffix("_scale_inv")
        assert torch.equal(shipped[weight].view(torch.uint8), source[weight].view(torch.uint8)), weight
        assert torch.equal(shipped[weight.removesuffix("weight") + "weight_scale"], source[scale_name])
    work = Path(f"{out}.work")
    measured = json.loads((work / "rounding.json").read_text())["rounding"]["mix_report"]["mean_kl"]
    assert 0 < json.loads((work / "eval.json").read_text())["mean_kl"] == pytest.approx(measured, rel=1e-6)


def test_fp8_source_on_a_model_not_stored_in_block_fp8_is_refused_before_any_work(tiny_llama_dir: Path,
                                                                                  tmp_path: Path, capsys) -> None:
    from prismq.cli import main

    for flags in (["--uniform", "FP8_SOURCE"], ["--target-bits", "6", "--force", "q_proj=FP8_SOURCE"]):
        assert main(["quantize", str(tiny_llama_dir), "--out", str(tmp_path / "out"), *flags]) == 1
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith("prismq: error: FP8_SOURCE keeps a block-FP8 checkpoint's own bytes"), error
        assert not (tmp_path / "out.work" / "probe.json").exists()


def test_an_fp8_tensor_without_its_scales_is_a_clear_error(fp8_llama: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(fp8_llama, broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.self_attn.v_proj.weight_scale_inv"]
    save_file(tensors, broken / "model.safetensors")
    with ExitStack() as stack, pytest.raises(PrismqError, match="v_proj.weight is stored in FP8 without"):
        SourceTensors(broken, stack)


def test_an_in_memory_model_fake_quantized_with_fp8_source_keeps_the_source_weights(fp8_llama: Path,
                                                                                   tmp_path: Path) -> None:
    """The whole-model path (`load_quantized`, for scripts) ships FP8_SOURCE's bytes too: the weights it installs
    are the source's, read dequantized."""
    from prismq.measure.evaluate import load_quantized

    names = [f"model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("gate", "up", "down")]
    (tmp_path / "assignment.json").write_text(json.dumps({"assignment": dict.fromkeys(names, "FP8_SOURCE")}))
    model = load_quantized(str(tmp_path / "assignment.json"), fp8_llama, "cpu", progress=False)
    with ExitStack() as stack:
        source = SourceTensors(fp8_llama, stack)
        for name in names:
            assert torch.equal(model.get_submodule(name).weight, source.get(f"{name}.weight")), name
