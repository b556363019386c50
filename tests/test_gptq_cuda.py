"""GPTQ's fused column loop (`prismq.rounding.gptq_fused`) equals the torch column loop bit for bit on the same
GPU: the same codes, scales and decoded weight, for every grid it serves, bf16 and fp32 weights, with and without
the scale sweep, on weights with ties, zeros and -0.0, all-zero rows and outliers, and shapes that leave a partial
tile of rows and a partial last block of columns. Both share everything outside the loop (the factorization and
the update of the columns after each block), so any difference is the kernel's."""

from __future__ import annotations

import pytest
import torch

import prismq.rounding.gptq as gptq_module
from prismq.formats import get_format
from prismq.formats.fused import available
from prismq.rounding.gptq import GPTQSettings, gptq_siblings
from test_gptq import as_bits, correlated_inputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or not available(torch.zeros(1, device="cuda")
                                                                                if torch.cuda.is_available()
                                                                                else torch.zeros(1)),
                                reason="needs a CUDA device and Triton")

FORMATS = ["NVFP4", "NVFP4A16", "MXFP4", "MXFP8", "FP8"]


def _hard_weight(rows: int, columns: int, dtype: torch.dtype) -> torch.Tensor:
    """Plain rows, rows on the grid's ties (quarters scaled by powers of two) with zeros and -0.0, an all-zero row,
    a row with one large outlier."""
    g = torch.Generator().manual_seed(11)
    weight = torch.randn(rows, columns, generator=g) * 0.05
    ties = torch.randint(-24, 25, (rows // 4, columns), generator=g) * 0.25
    ties *= 2.0 ** torch.randint(-8, -2, (rows // 4, 1), generator=g)
    ties[:, ::7] = -0.0
    ties[:, 3::11] = 0.0
    weight[: rows // 4] = ties
    weight[rows // 4] = 0.0
    weight[rows // 4 + 1, 5] = 3.0
    return weight.to(dtype)


def _round(name: str, weight: torch.Tensor, hessian: torch.Tensor, sweep: bool, fused: bool, monkeypatch):
    settings = GPTQSettings(block_size=128, act_order=True, damping=(0.01,), sweep=sweep)
    with monkeypatch.context() as patch:
        if not fused:
            patch.setattr(gptq_module, "fused_steps", lambda *args: None)
        else:
            calls = []
            original = gptq_module.gptq_block
            patch.setattr(gptq_module, "gptq_block", lambda *args: calls.append(1) or original(*args))
        rounded = gptq_siblings(get_format(name).grid(weight), {"w": weight}, hessian, settings)["w"]
    if fused:
        assert calls, "the fused kernel did not run"
    return rounded


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("sweep", [False, True])
def test_the_fused_column_loop_equals_the_torch_loop(name: str, dtype: torch.dtype, sweep: bool,
                                                     monkeypatch) -> None:
    rows, columns = 40, 320  # a partial tile of 16 rows, a last block of 64 columns
    weight = _hard_weight(rows, columns, dtype).cuda()
    x = correlated_inputs(columns, tokens=1024).cuda()
    hessian = x.T @ x
    fused = _round(name, weight, hessian, sweep, True, monkeypatch)
    reference = _round(name, weight, hessian, sweep, False, monkeypatch)
    assert reference.method.startswith("gptq") and fused.method == reference.method
    assert torch.equal(as_bits(fused.codes), as_bits(reference.codes))
    assert torch.equal(as_bits(fused.scales), as_bits(reference.scales))
    assert torch.equal(fused.weight, reference.weight) and fused.error == reference.error
