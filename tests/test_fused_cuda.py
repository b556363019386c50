"""The fused GPU codecs (`prismq.formats.fused`) equal the torch codecs bit for bit, on hard inputs: ties on the
element grid, zeros and -0.0, all-zero groups, scales in the subnormal range, huge values, batches of matrices
with a global scale each. The reference is the torch path on the CPU (decode of encode: the bytes that ship)."""

from __future__ import annotations

import pytest
import torch

from prismq.formats import get_format
from prismq.formats.base import FormatError
from prismq.formats.fused import available

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or not available(torch.zeros(1, device="cuda")
                                                                                if torch.cuda.is_available()
                                                                                else torch.zeros(1)),
                                reason="needs a CUDA device and Triton")

FORMATS = ["NVFP4", "NVFP4A16", "MXFP4", "MXFP4A16", "MXFP8", "MXFP8A16", "FP8"]


def _hard_weight(dtype: torch.dtype, rows: int = 96, columns: int = 512) -> torch.Tensor:
    """Rows of different kinds: plain, grid ties (multiples of a quarter, scaled by powers of two), exact zeros and
    -0.0 among them, an all-zero row, tiny (subnormal-range) and huge magnitudes, a row with one large outlier."""
    generator = torch.Generator().manual_seed(7)
    plain = torch.randn(rows // 6, columns, generator=generator) * 0.02
    ties = torch.randint(-24, 25, (rows // 6, columns), generator=generator) * 0.25
    ties *= 2.0 ** torch.randint(-6, 7, (rows // 6, 1), generator=generator)
    ties[:, ::7] = -0.0
    ties[:, 3::11] = 0.0
    zero = torch.zeros(rows // 6, columns)
    zero[0, ::3] = -0.0
    tiny = torch.randn(rows // 6, columns, generator=generator) * 1e-39
    huge = torch.randn(rows // 6, columns, generator=generator) * 1e30
    outlier = torch.randn(rows - 5 * (rows // 6), columns, generator=generator) * 0.01
    outlier[:, 5] = 40.0
    return torch.cat([plain, ties, zero, tiny, huge, outlier]).to(dtype)


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int16 if x.element_size() == 2 else torch.int32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", FORMATS)
def test_fused_qdq_equals_the_cpu_codec_bit_for_bit(name: str, dtype: torch.dtype) -> None:
    fmt = get_format(name)
    weight = _hard_weight(dtype)
    expected = fmt.decode(fmt.encode(weight, input_amax=torch.tensor(4.0)), dtype)  # W4A4 ships an input scale
    got = fmt.qdq(weight.cuda()).cpu()
    assert got.dtype == dtype
    mismatch = (_bits(got) != _bits(expected)).nonzero()
    assert mismatch.numel() == 0, (f"{mismatch.shape[0]} values differ, first at {tuple(mismatch[0].tolist())}: "
                                   f"{got[tuple(mismatch[0])]} vs {expected[tuple(mismatch[0])]}")


@pytest.mark.parametrize("name", ["NVFP4", "MXFP4", "FP8"])
def test_fused_qdq_of_a_batch_equals_each_matrix_alone(name: str) -> None:
    """A [B, out, in] stack (the cost stage's batches; NVFP4 with one global scale per matrix from shared maxima)."""
    fmt = get_format(name)
    stack = torch.stack([_hard_weight(torch.bfloat16)[i * 16:(i + 1) * 16] for i in range(5)])
    shared = stack.abs().amax(dim=(1, 2)) * torch.tensor([1.0, 2.0, 1.0, 4.0, 1.0]).to(torch.bfloat16)
    got = fmt.qdq(stack.cuda(), shared_amax=shared.cuda()).cpu()
    for index in range(len(stack)):
        alone = fmt.qdq(stack[index], shared_amax=shared[index])  # the torch path, on the CPU
        assert torch.equal(_bits(got[index]), _bits(alone)), index


@pytest.mark.parametrize("name", FORMATS)
def test_the_fused_path_serves_every_format_here(name: str) -> None:
    """The kernels run (a fused path that fell back to torch would pass the equality tests unnoticed)."""
    from prismq.formats.fused import fused_qdq

    weight = torch.randn(8, 64, device="cuda", dtype=torch.bfloat16)
    assert fused_qdq(get_format(name).grid(weight), weight) is not None


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_fused_qdq_refuses_non_finite_weights(name: str, bad: float) -> None:
    weight = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    weight[37, 201] = bad
    with pytest.raises(FormatError, match="non-finite"):
        get_format(name).qdq(weight)


@pytest.mark.parametrize("name", ["NVFP4", "NVFP4A16"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_nvfp4_global_scale_found_on_the_gpu_equals_the_cpu_codec(name: str, dtype: torch.dtype) -> None:
    """Without shared maxima the global scale comes from a GPU absmax (one per matrix of a batch): equal to the
    CPU codec's for matrices of very different ranges, one all zero (gs 1) and one so small that 448 * 6 / amax
    overflows (gs 1 as well)."""
    from prismq.formats.fused import fused_nvfp4_qdq

    fmt = get_format(name)
    base = _hard_weight(dtype)[:16, :256].float()
    factors = [1.0, 3.7e3, 1e-5, 0.0, 1e-37, 0.3]
    stack = torch.stack([base * factor for factor in factors]).to(dtype)
    assert fused_nvfp4_qdq(fmt, stack.cuda()) is not None
    got = fmt.qdq(stack.cuda()).cpu()
    for index in range(len(stack)):
        alone = fmt.qdq(stack[index])  # the torch path, on the CPU
        assert torch.equal(_bits(got[index]), _bits(alone)), factors[index]


def test_fp8_long_rows_equal_the_cpu_codec() -> None:
    """Rows longer than a program's step (two passes over each row: its absmax, then the rounding)."""
    fmt = get_format("FP8")
    weight = (torch.randn(6, 20000, generator=torch.Generator().manual_seed(2)) * 0.02).to(torch.bfloat16)
    weight[1] = 0.0
    weight[2, 17] = 30.0
    assert torch.equal(_bits(fmt.qdq(weight.cuda()).cpu()), _bits(fmt.decode(fmt.encode(weight))))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", ["NVFP4", "MXFP4", "MXFP8"])
def test_fused_activation_qdq_equals_the_cpu_path_bit_for_bit(name: str, dtype: torch.dtype) -> None:
    """What a W4A4 / MX layer does to its input [batch, tokens, in] during every measured forward, fused on the GPU."""
    fmt = get_format(name)
    x = _hard_weight(dtype).reshape(4, 24, 512)
    scale = fmt.input_scale(torch.tensor(3.0, dtype=dtype))
    expected = fmt.qdq_activation(x, scale)
    got = fmt.qdq_activation(x.cuda(), None if scale is None else scale.cuda()).cpu()
    assert got.shape == x.shape and got.dtype == dtype
    assert torch.equal(_bits(got), _bits(expected))


def test_fused_activation_qdq_serves_the_gpu_and_keeps_gradients_on_the_torch_path() -> None:
    from prismq.formats.fused import fused_activation_qdq
    from prismq.formats.nvfp4 import NVFP4Grid

    grid = NVFP4Grid(torch.ones(1, device="cuda"))
    x = torch.randn(2, 8, 64, device="cuda")
    assert fused_activation_qdq(grid, x) is not None
    assert fused_activation_qdq(grid, x.requires_grad_()) is None


def test_fused_activation_qdq_takes_one_global_scale_per_batch_entry() -> None:
    """The cost stage and the input-range search round a batch [B, T, in] under gs [B, 1, 1] (one input scale per
    Linear or per candidate range): each entry under its own scale, as the torch path broadcasts."""
    fmt = get_format("NVFP4")
    x = _hard_weight(torch.bfloat16)[:48].reshape(3, 16, 512)
    scales = fmt.input_scale(torch.tensor([3.0, 0.5, 40.0], dtype=torch.bfloat16)).reshape(-1, 1, 1)
    expected = fmt.qdq_activation(x, scales)
    got = fmt.qdq_activation(x.cuda(), scales.cuda()).cpu()
    assert torch.equal(_bits(got), _bits(expected))
    expanded = x[0].cuda().unsqueeze(0).expand(3, -1, -1)  # the clip search's candidates share one input
    assert torch.equal(_bits(fmt.qdq_activation(expanded, scales.cuda()).cpu()),
                       _bits(fmt.qdq_activation(x[0].unsqueeze(0).expand(3, -1, -1), scales)))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_the_gpu_absmax_pass_finds_a_non_finite_value_in_any_matrix_of_a_batch(bad: float) -> None:
    """Without shared maxima NVFP4's check runs in the absmax pass (the rounding kernel then checks nothing): a
    non-finite value in the last matrix of a batch, in the last program's tile, is found."""
    from prismq.formats.fused import fused_nvfp4_qdq

    weight = torch.randn(3, 64, 512, device="cuda", dtype=torch.bfloat16)
    assert fused_nvfp4_qdq(get_format("NVFP4"), weight)[1] is False
    weight[2, 63, 511] = bad
    assert fused_nvfp4_qdq(get_format("NVFP4"), weight)[1] is True
