"""The KL evaluator: exact against a float64 direct computation, right statistics, chunking that changes nothing
and bounds the head's work, an exported checkpoint and the same in-memory assignment measured alike, and the
`prismq eval` command end to end."""

from __future__ import annotations

import copy
import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_tiny_llama

from prismq.cli import main
from prismq.errors import PrismqError
from prismq.export.writer import write_checkpoint
from prismq.measure.evaluate import fake_quantized, load_quantized, read_assignment
from prismq.measure.kl import LogitSource, evaluate_candidates, evaluate_kl, kl_result, quantile
from prismq.model.linears import linear_shapes, quantizable
from prismq.model.siblings import sibling_groups

FORMATS = ["NVFP4", "NVFP4A16", "MXFP4", "MXFP8", "FP8", "INT4_W4A16", "INT8_W8A16"]


def random_blocks(n: int, length: int, seed: int = 0, vocab: int = 512) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def perturbed(model: torch.nn.Module, scale: float = 0.02, seed: int = 1) -> torch.nn.Module:
    """A copy with every Linear weight moved by noise: a stand-in 'quantized' model with a visible KL."""
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in other.modules():
            if isinstance(module, torch.nn.Linear):
                noise = torch.randn(module.weight.shape, generator=generator, dtype=torch.float32)
                module.weight.add_((noise * scale * module.weight.float().std()).to(module.weight.dtype))
    return other


def direct_float64(reference, quantized, blocks):
    """KL, top-1 agreement and NLLs per position from each model's full-forward logits, in float64."""
    with torch.no_grad():
        lr = torch.log_softmax(reference(blocks).logits.double(), -1)
        lq = torch.log_softmax(quantized(blocks).logits.double(), -1)
    kl = (lr.exp() * (lr - lq)).sum(-1)
    nll = lambda lp: -lp[:, :-1].gather(2, blocks[:, 1:, None])[..., 0]  # noqa: E731
    return kl, lr.argmax(-1) == lq.argmax(-1), nll(lr), nll(lq)


def test_kl_equals_a_float64_direct_computation() -> None:
    """fp32 tiny Llama vs a perturbed copy, 3 blocks x 40 positions, chunks of 16: every per-position KL equals the
    float64 value to 1e-6 absolute + 1e-4 relative (fp32 rounding of the logits and the log-softmax; measured:
    max error 5.5e-7 absolute, 3.1e-5 relative, on KLs of 0.013-0.033; mean KL off by 8.6e-7 relative), the
    perplexities to 1e-5 relative, and top-1 agreement exactly."""
    reference = build_tiny_llama().float()
    quantized = perturbed(reference, scale=0.3)
    blocks = random_blocks(3, 40)
    result = evaluate_kl(reference, quantized, blocks, chunk_size=16, progress=False)
    kl, same, nll_ref, nll_quant = direct_float64(reference, quantized, blocks)
    assert result.kl.shape == (3, 40) and result.tokens == 120
    assert float(kl.mean()) > 1e-3  # the comparison is not between two identical models
    assert torch.allclose(result.kl.double(), kl, atol=1e-6, rtol=1e-4)
    assert result.mean_kl == pytest.approx(float(kl.mean()), rel=1e-5)
    assert result.max_kl == pytest.approx(float(kl.max()), rel=1e-4)
    assert result.same_top1 == pytest.approx(float(same.double().mean()))
    assert result.ppl_ref == pytest.approx(float(nll_ref.mean().exp()), rel=1e-5)
    assert result.ppl_quant == pytest.approx(float(nll_quant.mean().exp()), rel=1e-5)
    assert result.ppl_ratio == pytest.approx(result.ppl_quant / result.ppl_ref)


def test_identical_models_have_zero_kl() -> None:
    model = build_tiny_llama()
    result = evaluate_kl(model, copy.deepcopy(model), random_blocks(2, 24), progress=False)
    assert result.max_kl == 0.0 and result.same_top1 == 1.0 and result.ppl_ratio == 1.0


def test_statistics_on_known_values() -> None:
    values = torch.arange(1001, dtype=torch.float64).flip(0) / 1000  # 0.000 .. 1.000, shuffled order
    kl = values[torch.randperm(1001, generator=torch.Generator().manual_seed(0))].view(7, 143)
    same = torch.zeros(7, 143, dtype=torch.bool)
    same[:, :11] = True
    result = kl_result(kl, same, torch.full((7, 142), np.log(4.0)), torch.full((7, 142), np.log(6.0)))
    assert result.median_kl == pytest.approx(0.5)
    assert result.p99_kl == pytest.approx(0.99)
    assert result.p999_kl == pytest.approx(0.999)
    assert (result.mean_kl, result.max_kl) == (pytest.approx(0.5), 1.0)
    assert result.same_top1 == pytest.approx(11 / 143)
    assert (result.ppl_ref, result.ppl_quant, result.ppl_ratio) == (pytest.approx(4), pytest.approx(6),
                                                                    pytest.approx(1.5))
    assert (result.tokens, result.blocks, result.seqlen) == (1001, 7, 143)
    document = result.to_json()
    assert {"mean_kl", "median_kl", "p99_kl", "p999_kl", "max_kl", "same_top1", "ppl_ref", "ppl_quant", "tokens",
            "ppl_ratio"} <= set(document)
    json.dumps(document)
    skewed = torch.rand(5000, generator=torch.Generator().manual_seed(1)) ** 4
    for q in (0.5, 0.9, 0.99, 0.999):  # linear interpolation, as numpy's default percentile
        assert quantile(skewed, q) == pytest.approx(float(np.quantile(skewed.double().numpy(), q)), rel=1e-12)


def test_chunking_changes_nothing_and_bounds_the_head() -> None:
    """Chunks of 7 positions and one chunk of the whole block give the same values (fp32 model: up to matmul
    rounding, < 1e-6), and the head never sees more than a chunk of positions."""
    reference = build_tiny_llama().float()
    quantized = perturbed(reference, scale=0.3)
    blocks = random_blocks(2, 50)
    seen: list[int] = []
    handles = [m.get_output_embeddings().register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[-2]))
               for m in (reference, quantized)]
    chunked = evaluate_kl(reference, quantized, blocks, chunk_size=7, progress=False)
    for handle in handles:
        handle.remove()
    whole = evaluate_kl(reference, quantized, blocks, chunk_size=50, progress=False)
    assert torch.allclose(chunked.kl, whole.kl, atol=1e-6, rtol=1e-5)
    assert chunked.same_top1 == whole.same_top1
    assert chunked.ppl_quant == pytest.approx(whole.ppl_quant, rel=1e-6)
    checks = [n for n in seen if n == 8]  # LogitSource's 8-token self-check, twice per model
    assert len(checks) == 4 and max(n for n in seen if n != 8) == 7
    assert sum(n for n in seen if n != 8) == 2 * blocks.numel()


def test_several_candidates_share_one_reference_pass() -> None:
    reference = build_tiny_llama()
    candidates = [perturbed(reference, 0.05, seed=1), perturbed(reference, 0.3, seed=2)]
    blocks = random_blocks(2, 32)
    calls = []
    reference.get_decoder().register_forward_hook(lambda *args: calls.append(1))
    together = evaluate_candidates(reference, candidates, blocks, progress=False)
    assert len(calls) == 2 + blocks.shape[0]  # the self-check (2 calls), then once per block for both candidates
    for candidate, result in zip(candidates, together):
        alone = evaluate_kl(reference, candidate, blocks, progress=False)
        assert torch.equal(alone.kl, result.kl)
    assert together[0].mean_kl < together[1].mean_kl


def test_reference_cache_runs_the_reference_trunk_once_per_block_across_calls() -> None:
    reference = build_tiny_llama()
    candidates = [perturbed(reference, 0.05, seed=1), perturbed(reference, 0.3, seed=2)]
    blocks = random_blocks(3, 32)
    calls = []
    reference.get_decoder().register_forward_hook(lambda *args: calls.append(1))
    cache: dict = {}
    first = evaluate_candidates(reference, candidates[:1], blocks, progress=False, reference_cache=cache)
    second = evaluate_candidates(reference, candidates[1:], blocks, progress=False, reference_cache=cache)
    assert len(calls) == 2 * 2 + blocks.shape[0]  # two self-checks per call, each block's trunk once in all
    for candidate, result in zip(candidates, [*first, *second]):
        assert torch.equal(evaluate_kl(reference, candidate, blocks, progress=False).kl, result.kl)


def test_models_that_rescale_their_logits_are_refused() -> None:
    model = build_tiny_llama()
    forward = model.forward

    def scaled(self, *args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = torch.tanh(out.logits / 0.05) * 0.05
        return out

    model.forward = types.MethodType(scaled, model)
    with pytest.raises(PrismqError, match="transforms its logits after the output head"):
        LogitSource(model, "candidate")


def test_block_shape_errors() -> None:
    model = build_tiny_llama()
    with pytest.raises(PrismqError, match=r"need token blocks of shape \[N >= 1, L >= 2\], got \(4,\)"):
        evaluate_kl(model, model, torch.arange(4), progress=False)
    with pytest.raises(PrismqError, match="chunk size must be positive"):
        evaluate_kl(model, model, random_blocks(1, 8), chunk_size=0, progress=False)


def cycled_assignment(source: Path) -> dict[str, str]:
    """Each sibling group of the tiny model in the next of the seven exportable benchmark formats."""
    groups = sibling_groups(quantizable(linear_shapes(source)))
    return {name: FORMATS[i % len(FORMATS)] for i, group in enumerate(groups) for name in group}


@pytest.fixture(scope="module")
def exported(tiny_llama_dir: Path, tmp_path_factory) -> tuple[Path, Path]:
    """The tiny Llama exported with every benchmark format (input ranges given), and the same assignment as a
    JSON file for the in-memory path."""
    assignment = cycled_assignment(tiny_llama_dir)
    amax = {name: 2.0 + (i % 5) for i, name in enumerate(assignment)}
    out = tmp_path_factory.mktemp("exported") / "mixed"
    write_checkpoint(tiny_llama_dir, assignment, out, input_amax={k: torch.tensor(v) for k, v in amax.items()},
                     progress=False)
    spec = out.parent / "assignment.json"
    spec.write_text(json.dumps({"assignment": assignment, "input_amax": amax}))
    return out, spec


def test_exported_checkpoint_and_in_memory_assignment_agree(tiny_llama_dir: Path, exported) -> None:
    """(a) the checkpoint through transformers + compressed-tensors, (b) the assignment fake-quantized with the
    codecs: measured on 4 blocks x 64 of the tiny bf16 Llama with all seven formats, per-position KL, top-1 and
    NLL are bit-identical (max |mean KL difference| = 0.0), since both compute the same weights and the same
    activation quantization."""
    from prismq.model.source import load_model

    checkpoint, spec = exported
    model_a = load_quantized(str(checkpoint), tiny_llama_dir, "cpu", progress=False)
    model_b = load_quantized(str(spec), tiny_llama_dir, "cpu", progress=False)
    reference = load_model(tiny_llama_dir)
    blocks = random_blocks(4, 64)
    result_a, result_b = evaluate_candidates(reference, [model_a, model_b], blocks, progress=False)
    assert result_a.mean_kl > 1e-3
    assert abs(result_a.mean_kl - result_b.mean_kl) == 0.0
    assert torch.equal(result_a.kl, result_b.kl)
    assert (result_a.same_top1, result_a.ppl_quant) == (result_b.same_top1, result_b.ppl_quant)


def test_assignment_file_errors(tiny_llama_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    for content, message in [
        ("{oops", "is not valid JSON"),
        ('{"assignment": {}}', "needs a non-empty object"),
        ('{"assignment": {"x": "NVFP4"}, "input_amax": {"x": -1}}', "positive numbers"),
        ('{"assignment": {"x": "NVFP5"}}', "unknown format 'NVFP5'"),
    ]:
        path.write_text(content)
        with pytest.raises(PrismqError, match=message):
            read_assignment(path)
    from prismq.model.source import load_model

    model = load_model(tiny_llama_dir)
    with pytest.raises(PrismqError, match="names model.layers.9.mlp.up_proj, which is not a Linear layer of the model"):
        fake_quantized(model, {"model.layers.9.mlp.up_proj": "FP8"}, {})
    with pytest.raises(PrismqError, match="fused siblings must share one format"):
        fake_quantized(model, {"model.layers.0.mlp.up_proj": "FP8", "model.layers.0.mlp.gate_proj": "MXFP8"}, {})
    with pytest.raises(PrismqError, match="down_proj: NVFP4 needs its input range, and no calibration text"):
        fake_quantized(model, {"model.layers.0.mlp.down_proj": "NVFP4"}, {})
    with pytest.raises(PrismqError, match="--rounding gptq needs calibration inputs, and no calibration text"):
        fake_quantized(model, {"model.layers.0.mlp.down_proj": "FP8"}, {}, rounding="gptq")
    with pytest.raises(PrismqError, match="applies to an assignment file"):
        load_quantized(str(tiny_llama_dir), tiny_llama_dir, "cpu", rounding="gptq")
    with pytest.raises(PrismqError, match="must be an exported checkpoint directory or an assignment .json"):
        load_quantized(str(tmp_path / "missing"), tiny_llama_dir, "cpu")


def byte_tokenizer_dir(model_dir: Path, target: Path) -> Path:
    """A copy of a tiny model directory with a byte-level tokenizer (256 byte tokens + EOS) beside it."""
    import shutil

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    shutil.copytree(model_dir, target)
    vocab = {char: i for i, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))} | {"<eos>": 256}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>").save_pretrained(target)
    return target


def test_eval_command_end_to_end(tiny_llama_dir: Path, exported, tmp_path: Path, capsys) -> None:
    reference = byte_tokenizer_dir(tiny_llama_dir, tmp_path / "ref")
    text = tmp_path / "wiki.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    checkpoint, spec = exported
    out = tmp_path / "eval.json"
    argv = ["eval", "--reference", str(reference), "--text", str(text), "--blocks", "3", "--seqlen", "32",
            "--device", "cpu"]
    assert main([*argv, "--quantized", str(checkpoint), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "same top-1" in printed and "KL (nats)   mean" in printed
    document = json.loads(out.read_text())
    assert document["kind"] == "eval" and document["tokens"] == 96 and document["blocks"] == 3
    assert 0 < document["mean_kl"] <= document["max_kl"] and 0 <= document["same_top1"] <= 1
    # the in-memory path on the same blocks measures the same thing
    assert main([*argv, "--quantized", str(spec), "--json", str(tmp_path / "b.json")]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["mean_kl"] == document["mean_kl"]
    # without --text: held-out blocks of the default text
    assert main(["eval", "--reference", str(reference), "--quantized", str(spec), "--blocks", "2", "--seqlen",
                 "64", "--device", "cpu"]) == 0
    assert "128 (2 blocks x 64 tokens)" in capsys.readouterr().out
    assert main([*argv[:-4], "--blocks", "999", "--quantized", str(spec)]) == 1
    assert "the text has 1800 tokens; 999 blocks of 512 need 511488" in capsys.readouterr().err


def test_eval_requires_quantized(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--text", "x.txt"])
    assert exit_info.value.code == 2
    assert "--quantized" in capsys.readouterr().err


@pytest.mark.slow
def test_real_model_export_and_uncalibrated_assignment_agree(tmp_path: Path) -> None:
    """SmolLM2-135M, uniform NVFP4 (W4A4): `prismq quantize` then eval of the checkpoint, against eval of an
    assignment file without input ranges, calibrated by eval on the blocks quantize calibrated on: identical
    per-position KL. (Without --calib, eval calibrates on `default_calibration_blocks`, which follow QuantizeConfig's
    defaults; a small calibration keeps the test fast.)"""
    from prismq.config import QuantizeConfig
    from prismq.model.precision import resolve_compute_dtype
    from prismq.model.source import load_model, resolve_model
    from prismq.pipeline import quantize
    from prismq.stages import calibration_blocks

    try:
        model_dir = resolve_model(None)
    except PrismqError as exc:
        pytest.skip(f"embedded default model unavailable: {exc}")
    result = quantize(QuantizeConfig(uniform="NVFP4", out=tmp_path / "nvfp4", device="cpu", rounding="rtn",
                                     calib_blocks=4, calib_seqlen=128, heldout_blocks=1)).export
    assert result is not None
    calibration = calibration_blocks(tmp_path / "nvfp4.work")
    targets = json.loads((result.path / "config.json").read_text())["quantization_config"]["config_groups"]
    spec = tmp_path / "assignment.json"
    spec.write_text(json.dumps({"assignment": {name: "NVFP4" for name in targets["group_0"]["targets"]}}))
    from prismq.measure.evaluate import eval_blocks

    blocks = eval_blocks(model_dir, None, 2, 128)
    dtype = resolve_compute_dtype("auto", torch.device("cpu"), torch.bfloat16)  # fp32 where bf16 is slow
    candidates = [load_quantized(str(result.path), model_dir, "cpu", progress=False, dtype=dtype),
                  load_quantized(str(spec), model_dir, "cpu", progress=False, dtype=dtype, calibration=calibration)]
    result_a, result_b = evaluate_candidates(load_model(model_dir, dtype), candidates, blocks, progress=False)
    assert 0.05 < result_a.mean_kl < 2.0 and 0.3 < result_a.same_top1 < 0.95
    assert torch.equal(result_a.kl, result_b.kl)
    assert result_a.ppl_quant == result_b.ppl_quant
