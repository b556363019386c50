"""Exact-math unit tests of the element formats, scales, packing and the codec contract."""

from __future__ import annotations

import pytest
import torch

from prismq.formats import FORMATS, FormatError, base, get_format
from prismq.formats.elements import E2M1, E2M3, E3M2, e8m0_exponent, round_to_e4m3
from prismq.formats.packing import pack_int32, pack_nibbles, pack_sextets, unpack_int32, unpack_sextets

# formats that encode any weight (FP8_SOURCE only keeps a block-FP8 source's bytes: tests/test_fp8_source.py)
CODECS = [name for name, fmt in FORMATS.items() if not fmt.keeps_source]


def test_e2m1_rounds_ties_to_even_and_saturates() -> None:
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.26, 2.6, 5.01, 7.0, -0.25, -5.0, -100.0])
    expected = torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 0.5, 3.0, 6.0, 6.0, -0.0, -4.0, -6.0])
    assert torch.equal(E2M1.round(x), expected)


def test_e2m1_codes_and_negative_zero() -> None:
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    assert E2M1.encode(grid).tolist() == list(range(8))
    assert E2M1.encode(-grid[1:]).tolist() == list(range(9, 16))
    # a negative value that rounds to zero keeps its sign (code 0x8); -0.0 itself is written as +0 (code 0)
    assert E2M1.encode(torch.tensor([-0.1, -0.0, 0.1])).tolist() == [8, 0, 0]
    assert E2M1.encode(torch.tensor([0.75, 1.25, 5.0, 9.0], dtype=torch.bfloat16)).tolist() == [2, 2, 6, 7]
    assert E2M1.values(torch.tensor([8, 15, 7], dtype=torch.uint8)).tolist() == [0.0, -6.0, 6.0]


def test_fp6_grids() -> None:
    assert E2M3.max == 7.5 and E3M2.max == 28.0
    assert E2M3.magnitudes[:9].tolist() == [i / 8 for i in range(8)] + [1.0]
    assert E3M2.magnitudes[:5].tolist() == [0.0, 0.0625, 0.125, 0.1875, 0.25]
    # E2M3 step is 0.25 in [2, 4): 2.125 ties to 2.0 (even), 2.375 ties to 2.5
    assert E2M3.round(torch.tensor([2.125, 2.375, 7.6])).tolist() == [2.0, 2.5, 7.5]


def test_e4m3_scale_snapping() -> None:
    x = torch.tensor([448.0, 1000.0, 0.1, 1.0625, 1.1875, -460.0, 2.0 ** -9, 2.0 ** -11])
    y = round_to_e4m3(x).float()
    assert y.tolist() == [448.0, 448.0, 0.1015625, 1.0, 1.25, -448.0, 2.0 ** -9, 0.0]


@pytest.mark.parametrize("amax, element, mantissa, expected", [
    (6.0, 6.0, 1, 127),        # 6 = 1.5 * 2**2 -> pow2 4 -> 127 + 2 - 2
    (1.75, 6.0, 1, 126),       # mantissa 1.75 rounds up to 2
    (1.7421875, 6.0, 1, 125),  # just below 1.75 rounds down to 1
    (0.0, 6.0, 1, 0),          # all-zero group -> smallest scale
    (448.0, 448.0, 1, 128),    # MXFP8: 448 = 1.75 * 2**8 rounds up to 2**9 -> 127 + 9 - 8
    (7.5, 7.5, 3, 127),        # MXFP6 E2M3 keeps 1.875 * 4 at 4
])
def test_e8m0_exponent_choice(amax: float, element: float, mantissa: int, expected: int) -> None:
    got = e8m0_exponent(torch.tensor([amax], dtype=torch.bfloat16), element, mantissa)
    assert got.dtype == torch.uint8 and got.item() == expected


def test_int_packing_order() -> None:
    levels = torch.arange(-8, 8, dtype=torch.int8).reshape(1, 16)
    words = pack_int32(levels, 4)
    assert words.dtype == torch.int32
    assert [w & 0xFFFFFFFF for w in words[0].tolist()] == [0x76543210, 0xFEDCBA98]
    assert torch.equal(unpack_int32(words, 4), levels)
    bytes8 = torch.tensor([[-128, -1, 0, 127]], dtype=torch.int8)
    assert [w & 0xFFFFFFFF for w in pack_int32(bytes8, 8)[0].tolist()] == [0xFF807F00]
    assert torch.equal(unpack_int32(pack_int32(bytes8, 8), 8), bytes8)


def test_nibble_and_sextet_packing_order() -> None:
    assert pack_nibbles(torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)).tolist() == [[0x21, 0x0F]]
    codes = torch.tensor([[1, 2, 3, 63]], dtype=torch.uint8)
    packed = pack_sextets(codes)
    word = 1 | 2 << 6 | 3 << 12 | 63 << 18
    assert packed.tolist() == [[word & 0xFF, word >> 8 & 0xFF, word >> 16 & 0xFF]]
    assert torch.equal(unpack_sextets(packed), codes)


def test_mxfp6_e2m3_packing_equals_compressed_tensors() -> None:
    from compressed_tensors.compressors.mxfp6.helpers import pack_fp6_to_uint8

    w = (torch.randn(8, 64) * 0.1).to(torch.bfloat16)
    fmt = get_format("MXFP6_E2M3")
    grid = fmt.grid(w)
    codes = grid.quantize(w, grid.expand(grid.fit(w)))
    values = E2M3.values(codes).to(torch.bfloat16)
    assert torch.equal(fmt.encode(w)["weight_packed"], pack_fp6_to_uint8(values))


@pytest.mark.parametrize("name", CODECS)
def test_all_zero_groups_decode_to_zero(name: str) -> None:
    w = torch.zeros(4, 256, dtype=torch.bfloat16)
    fmt = get_format(name)
    assert torch.equal(fmt.decode(fmt.encode(w, input_amax=torch.tensor(1.0))), w)


def test_all_zero_group_scales_match_the_loaders_conventions() -> None:
    w = torch.zeros(2, 128, dtype=torch.bfloat16)
    assert get_format("NVFP4A16").encode(w)["weight_scale"].float().unique().tolist() == [0.125]
    assert get_format("MXFP4A16").encode(w)["weight_scale"].unique().tolist() == [0]
    assert get_format("INT4_W4A16").encode(w)["weight_scale"].unique().tolist() == [2.0 ** -7]


@pytest.mark.parametrize("name, shape, ok", [
    ("NVFP4", (64, 24), False), ("NVFP4", (64, 48), True), ("MXFP4", (64, 48), False), ("MXFP8", (7, 64), True),
    ("INT4_W4A16", (64, 192), False), ("INT8_W8A16", (64, 256), True), ("FP8", (3, 7), True),
    ("BF16", (3, 7), True), ("NVFP4", (64,), False), ("FP8", (2, 3, 4), False),
])
def test_legal_shapes(name: str, shape: tuple[int, ...], ok: bool) -> None:
    fmt = get_format(name)
    assert fmt.legal(shape) is ok
    if not ok:
        with pytest.raises(FormatError, match="layers.3.mlp.up_proj"):
            fmt.encode(torch.zeros(shape, dtype=torch.bfloat16), name="layers.3.mlp.up_proj")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_rejected_with_the_tensor_name(bad: float) -> None:
    w = torch.ones(4, 128, dtype=torch.bfloat16)
    w[2, 7] = bad
    for name in CODECS:
        with pytest.raises(FormatError, match=r"model\.layers\.0\.self_attn\.q_proj.*non-finite"):
            get_format(name).encode(w, input_amax=torch.tensor(1.0), name="model.layers.0.self_attn.q_proj")


@pytest.mark.parametrize("chunk", [None, 700])  # whole; 2 rows at a time (qdq, encode and decode chunk rows)
@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_qdq_is_decode_of_encode(name: str, dtype: torch.dtype, chunk: int | None,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    if chunk is not None:
        monkeypatch.setattr(base, "CHUNK_ELEMENTS", chunk)
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(48, 256, generator=g) * torch.logspace(-4, 0, 48).unsqueeze(1)).to(dtype)
    fmt = get_format(name)
    tensors = fmt.encode(w, input_amax=torch.tensor(1.0))
    assert torch.equal(fmt.qdq(w), fmt.decode(tensors, dtype))
    shared = w.abs().amax() * 4
    assert torch.equal(fmt.qdq(w, shared_amax=shared), fmt.decode(fmt.encode(w, shared_amax=shared,
                                                                             input_amax=torch.tensor(1.0)), dtype))


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("shape", [(16, 128), (40, 384), (3, 1024)])
def test_nbytes_equals_the_tensors_encode_writes(name: str, shape: tuple[int, int]) -> None:
    fmt = get_format(name)
    tensors = fmt.encode(torch.randn(shape).to(torch.bfloat16), input_amax=torch.tensor(1.0))
    assert fmt.nbytes(shape) == sum(t.numel() * t.element_size() for t in tensors.values())
    specs = fmt.tensor_specs(shape)
    assert {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()} == specs


def test_bits_per_weight_match_the_design_budget() -> None:
    shape = (4096, 4096)
    expected = {"NVFP4A16": 4.5, "MXFP4A16": 4.25, "MXFP8": 8.25, "INT4_W4A16": 4.125, "INT8_W8A16": 8.125,
                "FP8": 8 + 16 / 4096, "BF16": 16.0, "MXFP6_E2M3": 6.25}
    for name, bpp in expected.items():
        assert get_format(name).bits_per_weight(shape) == pytest.approx(bpp, abs=1e-5)
    assert get_format("NVFP4A16").bits_per_weight(shape) > 4.5  # the fp32 global scale is counted


@pytest.mark.parametrize("element", [E2M1, E2M3, E3M2], ids=lambda e: e.name)
def test_minifloat_encode_equals_brute_force_nearest_even(element) -> None:
    """Every midpoint, every grid value and a dense sweep, against argmin |x - v| with ties to the even code."""
    grid = element.magnitudes.double()
    midpoints = (grid[1:] + grid[:-1]) / 2
    sweep = torch.linspace(0, element.max * 1.3, 20001, dtype=torch.float64)
    x = torch.cat([grid, midpoints, sweep, 2.0 ** -torch.arange(1, 30, dtype=torch.float64)])
    x = torch.cat([x, -x]).float()
    distance = (x.double().abs().clamp(max=element.max).unsqueeze(1) - grid).abs()
    nearest = distance == distance.min(dim=1, keepdim=True).values
    odd_penalty = torch.arange(len(grid)) % 2  # among equally near candidates prefer the even code
    expected = torch.where(nearest, odd_penalty, 9).argmin(dim=1)
    codes = element.encode(x)
    magnitude_bits = element.exp_bits + element.man_bits
    assert torch.equal((codes & ((1 << magnitude_bits) - 1)).long(), expected)
    assert torch.equal((codes >> magnitude_bits).bool(), x < 0)


@pytest.mark.parametrize("chunk", [None, 2000])  # whole; 2 rows of each matrix at a time
@pytest.mark.parametrize("name", CODECS)
def test_batched_qdq_equals_each_matrix_alone(name: str, chunk: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    if chunk is not None:
        monkeypatch.setattr(base, "CHUNK_ELEMENTS", chunk)
    g = torch.Generator().manual_seed(5)
    weights = (torch.randn(3, 32, 256, generator=g) * torch.tensor([1e-3, 1.0, 30.0]).view(3, 1, 1)).to(torch.bfloat16)
    shared = weights.abs().amax(dim=(1, 2)) * torch.tensor([1.0, 2.0, 1.5]).to(torch.bfloat16)
    fmt = get_format(name)
    batched = fmt.qdq(weights, shared_amax=shared)
    for i in range(3):
        assert torch.equal(batched[i], fmt.qdq(weights[i], shared_amax=shared[i]))
    assert torch.equal(fmt.qdq(weights)[1], fmt.qdq(weights[1]))


def _bits(x: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor, so -0.0 and +0.0 differ."""
    return x.contiguous().view({2: torch.int16, 4: torch.int32}[x.element_size()])


def _hard_inputs(dtype: torch.dtype) -> torch.Tensor:
    """[6, 512]: element-grid ties and midpoints at several scales, zeros of both signs, tiny and huge values."""
    g = torch.Generator().manual_seed(11)
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.0, -0.0, -0.25, -0.1, 7.0, 1e-30, -1e-30, 448.0, 0.5])
    rows = [ties.repeat(32) * scale for scale in (1.0, 0.01, 300.0)]
    rows += [torch.randn(512, generator=g) * torch.logspace(-8, 3, 512), torch.zeros(512), -torch.zeros(512)]
    return torch.stack(rows).to(dtype)


@pytest.mark.parametrize("element", [E2M1, E2M3, E3M2], ids=lambda e: e.name)
def test_minifloat_round_is_values_of_encode_bit_for_bit(element) -> None:
    x = torch.cat([_hard_inputs(torch.float32).flatten(), element.magnitudes, -element.magnitudes,
                   (element.magnitudes[1:] + element.magnitudes[:-1]) / 2])
    assert torch.equal(_bits(element.round(x)), _bits(element.values(element.encode(x))))


@pytest.mark.parametrize("name", ["NVFP4", "MXFP4", "MXFP6_E2M3", "MXFP8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_grid_round_is_dequantize_of_quantize_bit_for_bit(name: str, dtype: torch.dtype) -> None:
    """The value-level round activations take equals the codec's codes path, -0.0 included, for one matrix, a
    batch under per-matrix global scales, and a 3-D activation."""
    x = _hard_inputs(dtype)
    fmt = get_format(name)
    for value in (x, torch.stack([x, x * 3, x / 7]), x.reshape(2, 3, 512)):
        grid = fmt.grid(value, shared_amax=None if value.ndim == 2 else value.abs().amax(dim=(-2, -1)))
        scales = grid.fit(value)
        per_element = grid.expand(scales)
        expected = grid.dequantize(grid.quantize(value, per_element), per_element, dtype)
        got = grid.round(value, scales)
        assert got.dtype == dtype and torch.equal(_bits(got), _bits(expected))
        column = grid.round_values(value[..., 37:38], per_element[..., 37:38])  # one column, as GPTQ rounds it
        assert torch.equal(_bits(column), _bits(expected[..., 37:38]))
