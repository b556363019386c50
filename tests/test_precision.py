"""Compute dtype: auto picks fp32 where the CPU has no native bf16; the shipped bytes never depend on it; an export
computes the same KL (within a stated bound) in either dtype."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prismq.export.writer import write_checkpoint
from prismq.measure.kl import evaluate_kl
from prismq.model import precision
from prismq.model.linears import linear_shapes, quantizable
from prismq.model.precision import resolve_compute_dtype
from prismq.model.source import load_model
from prismq.rounding.sequential import round_model

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
MIX = {"self_attn.q_proj": "NVFP4", "self_attn.k_proj": "NVFP4", "self_attn.v_proj": "NVFP4",
       "self_attn.o_proj": "INT4_W4A16", "mlp.gate_proj": "MXFP4", "mlp.up_proj": "MXFP4", "mlp.down_proj": "FP8"}


@pytest.fixture
def cpu_flags(monkeypatch):
    """Pretend /proc/cpuinfo lists the given flags (None: not readable), with a fresh detection cache."""
    def use(flags: set[str] | None, matmul_fast: bool = False) -> None:
        monkeypatch.setattr(precision, "_cpuinfo_flags", lambda: flags)
        monkeypatch.setattr(precision, "_bf16_matmul_is_fast", lambda: matmul_fast)
        precision.cpu_has_native_bf16.cache_clear()

    yield use
    precision.cpu_has_native_bf16.cache_clear()


@pytest.mark.parametrize("flags, native", [({"avx2", "fma"}, False), ({"avx512f", "avx512bw"}, False),
                                           ({"avx512f", "avx512_bf16"}, True), ({"amx_bf16", "amx_tile"}, True),
                                           ({"asimd", "bf16"}, True)])
def test_native_bf16_from_cpu_flags(cpu_flags, flags: set[str], native: bool) -> None:
    cpu_flags(flags, matmul_fast=not native)  # the flags decide; the timing fallback is not consulted
    assert precision.cpu_has_native_bf16() is native
    expected = torch.bfloat16 if native else torch.float32
    assert resolve_compute_dtype("auto", CPU, torch.bfloat16) == expected


@pytest.mark.parametrize("fast", [True, False])
def test_native_bf16_measured_where_flags_are_unknown(cpu_flags, fast: bool) -> None:
    cpu_flags(None, matmul_fast=fast)
    assert precision.cpu_has_native_bf16() is fast


def test_resolve_compute_dtype(cpu_flags) -> None:
    cpu_flags({"avx2"})
    assert resolve_compute_dtype("bf16", CPU, torch.bfloat16) == torch.bfloat16  # asked for: obeyed
    assert resolve_compute_dtype("fp32", CUDA, torch.bfloat16) == torch.float32
    assert resolve_compute_dtype("auto", CUDA, torch.bfloat16) == torch.bfloat16  # GPUs multiply bf16 natively
    assert resolve_compute_dtype("auto", CUDA, torch.float16) == torch.float16
    assert resolve_compute_dtype("auto", CUDA, torch.float32) == torch.float32  # never below the checkpoint's
    cpu_flags({"avx512_bf16"})
    assert resolve_compute_dtype("auto", CPU, torch.float16) == torch.float32  # no native fp16 assumed on CPUs
    with pytest.raises(ValueError, match="unknown compute dtype"):
        resolve_compute_dtype("fp8", CPU, torch.bfloat16)


def _encoded_bytes(encoded: dict) -> dict[str, bytes]:
    """Every shipped tensor's raw bytes, by name."""
    return {f"{n}.{k}": t.contiguous().view(torch.uint8).numpy().tobytes() for n, ts in encoded.items()
            for k, t in ts.items()}


def test_rtn_bytes_do_not_depend_on_the_compute_dtype(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """A model computing in fp32 holds the checkpoint's bf16 weights exactly and hands them to the codecs as bf16:
    round-to-nearest ships byte for byte what the exporter writes straight from the checkpoint."""
    names = list(quantizable(linear_shapes(tiny_llama_dir)))
    assignment = {n: MIX[n.split(".", 3)[3]] for n in names}
    amax = {n: torch.tensor(2.5) for n in names}
    written = write_checkpoint(tiny_llama_dir, assignment, tmp_path / "out", input_amax=amax, progress=False)
    shipped = {k: v for f in written.path.glob("*.safetensors") for k, v in load_file(f).items()}
    expected = {k: v.contiguous().view(torch.uint8).numpy().tobytes() for k, v in shipped.items()}
    for dtype in (torch.bfloat16, torch.float32):
        model = load_model(tiny_llama_dir, dtype)
        assert model.dtype == dtype
        got = _encoded_bytes(round_model(model, assignment, "rtn", torch.zeros(1, 2, dtype=torch.long), amax,
                                         progress=False, weight_dtype=torch.bfloat16).encoded)
        assert got == {k: expected[k] for k in got} and len(got) > len(names)


def test_gptq_bytes_do_not_depend_on_the_compute_dtype(tiny_llama_dir: Path, monkeypatch) -> None:
    """Given the same Hessians, GPTQ ships the same bytes from a model computing in fp32 as from one computing in
    bf16 (the rounding arithmetic follows the checkpoint's dtype, not the compute dtype)."""
    from prismq.rounding import sequential

    def fixed_hessians(layer, modules, inputs):
        out = {}
        for i, (name, module) in enumerate(modules.items()):
            x = torch.randn(64, module.in_features, generator=torch.Generator().manual_seed(i))
            out[name] = x.T @ x
        return out

    monkeypatch.setattr(sequential, "input_hessians", fixed_hessians)
    names = list(quantizable(linear_shapes(tiny_llama_dir)))
    assignment = {n: MIX[n.split(".", 3)[3]] for n in names}
    amax = {n: torch.tensor(2.5) for n in names}
    calibration = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    got = [_encoded_bytes(round_model(load_model(tiny_llama_dir, dtype), assignment, "gptq+sweep", calibration, amax,
                                      progress=False, weight_dtype=torch.bfloat16).encoded)
           for dtype in (torch.bfloat16, torch.float32)]
    assert got[0] == got[1]


@pytest.mark.slow
def test_export_kl_agrees_across_compute_dtypes(default_model_dir: Path, tmp_path: Path) -> None:
    """The same NVFP4 export of SmolLM2, evaluated in bf16 and in fp32 (reference and quantized model alike), gives
    the same mean KL within 15 % (measured: see benchmarks/RESULTS.md, compute dtype); the fp32 model computes the
    exported weights exactly."""
    from prismq.data import text_splits
    from prismq.model.source import load_tokenizer

    names = list(quantizable(linear_shapes(default_model_dir)))
    assignment = dict.fromkeys(names, "NVFP4A16")
    out = write_checkpoint(default_model_dir, assignment, tmp_path / "out", progress=False).path
    blocks = text_splits(None, None, None, load_tokenizer(default_model_dir), 0, 0, 1, 64).report
    kls, weights = {}, {}
    for dtype in (torch.bfloat16, torch.float32):
        quantized = load_model(out, dtype)
        assert quantized.dtype == dtype
        weights[dtype] = quantized.get_submodule(names[-1]).weight.detach()
        kls[dtype] = evaluate_kl(load_model(default_model_dir, dtype), quantized, blocks, progress=False).mean_kl
    assert torch.equal(weights[torch.float32], weights[torch.bfloat16].float())
    assert kls[torch.float32] == pytest.approx(kls[torch.bfloat16], rel=0.15)
