"""GPTQ and the scale sweep against a plain float64 reference written here, and their outputs against the codecs."""

from __future__ import annotations

import pytest
import torch

from prismq.formats import get_format
from prismq.rounding.gptq import GPTQSettings, gptq, gptq_siblings, output_error, round_to_nearest
from prismq.rounding.scale_sweep import sweep_scales

FORMATS = ["NVFP4A16", "MXFP4A16", "MXFP8A16", "FP8", "INT4_W4A16", "INT8_W8A16"]


def correlated_inputs(columns: int, tokens: int = 512, seed: int = 0) -> torch.Tensor:
    """Calibration-like inputs: correlated columns of very different energy (what makes GPTQ matter)."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(columns, columns, generator=g) / columns ** 0.5 + torch.eye(columns)
    energy = torch.logspace(-1, 1, columns)[torch.randperm(columns, generator=g)]
    return (torch.randn(tokens, columns, generator=g) @ mixing) * energy


def reference_sweep(grid, weight: torch.Tensor, importance: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The scale sweep written plainly: for every group, each candidate scale the format proposes, the float64
    importance-weighted squared rounding error of the group's weights; the first minimum wins (candidate 0, the
    incoming scale, on ties)."""
    candidates = grid.candidates(scales)  # [C, rows, groups]
    width = weight.shape[1] // scales.shape[1]
    importance = importance.double().expand(weight.shape)
    best = scales.clone()
    for row in range(weight.shape[0]):
        for group in range(scales.shape[1]):
            columns = slice(group * width, (group + 1) * width)
            w = weight[row, columns]
            errors = []
            for candidate in candidates[:, row, group]:
                q = grid.dequantize(grid.quantize(w, candidate), candidate, weight.dtype)
                errors.append(float(((w.double() - q.double()) ** 2 * importance[row, columns]).sum()))
            best[row, group] = candidates[errors.index(min(errors)), row, group]
    return best


def reference_gptq(grid, weight: torch.Tensor, hessian: torch.Tensor, damping: float, act_order: bool,
                   sweep: bool) -> torch.Tensor:
    """Textbook GPTQ in float64: one column at a time, the full remaining row updated after each (no lazy blocks),
    H^-1 by a plain inverse; scales fixed when a group is first reached (up front with activation order or a
    group wider than the block); each column rounded by the grid in the weight's dtype. Returns the codes."""
    columns, g = weight.shape[1], grid.group_size
    h = hessian.double() + damping * hessian.double().diagonal().mean() * torch.eye(columns, dtype=torch.float64)
    order = torch.argsort(hessian.diagonal(), descending=True) if act_order else torch.arange(columns)
    upper = torch.linalg.cholesky(torch.linalg.inv(h[order][:, order]), upper=True)
    importance = 1 / upper.diagonal() ** 2
    natural_importance = torch.empty_like(importance)
    natural_importance[order] = importance
    w = weight.double()[:, order].clone()
    static = act_order or g > 64
    scales = grid.fit(weight)
    if static and sweep:
        scales = reference_sweep(grid, weight, natural_importance, scales)
    codes = []
    for j in range(columns):
        if not static and j % g == 0:
            group = w[:, j:j + g].to(weight.dtype)
            fitted = grid.fit(group)
            if sweep:
                fitted = reference_sweep(grid, group, importance[j:j + g], fitted)
            scales[:, j // g] = fitted[:, 0]
        scale = scales[:, int(order[j]) // g].unsqueeze(1)
        code = grid.quantize(w[:, j:j + 1].to(weight.dtype), scale)
        q = grid.dequantize(code, scale, weight.dtype).double()
        error = (w[:, j:j + 1] - q) / upper[j, j]
        w[:, j:] -= error @ upper[j:j + 1, j:]
        codes.append(code)
    return torch.cat(codes, dim=1)[:, torch.argsort(order)]


def as_bits(codes: torch.Tensor) -> torch.Tensor:
    """Codes comparable with torch.equal (E4M3 codes by their bytes)."""
    return codes.view(torch.uint8) if codes.dtype == torch.float8_e4m3fn else codes


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("sweep", [False, True])
def test_gptq_equals_the_float64_reference(name: str, act_order: bool, sweep: bool) -> None:
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(12, 256, generator=g) * 0.05
    x = correlated_inputs(256)
    hessian = x.T @ x
    fmt = get_format(name)
    grid = fmt.grid(weight)
    settings = GPTQSettings(block_size=64, act_order=act_order, damping=(0.01,), sweep=sweep)
    expected = as_bits(reference_gptq(grid, weight, hessian, 0.01, act_order, sweep))
    exact = gptq(grid, weight, hessian.double(), settings)  # a float64 Hessian: updates computed in float64
    assert exact.method.startswith("gptq")  # beat round-to-nearest on its own objective
    assert torch.equal(as_bits(exact.codes), expected)
    fast = gptq(grid, weight, hessian, settings)  # float32: the same decisions but for rare near-ties
    assert float((as_bits(fast.codes) != expected).float().mean()) < 0.005


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("sweep", [False, True])
def test_gptq_output_decodes_through_the_codec_to_the_evaluated_weight(name: str, sweep: bool) -> None:
    g = torch.Generator().manual_seed(2)
    weight = (torch.randn(32, 256, generator=g) * 0.02).to(torch.bfloat16)
    x = correlated_inputs(256, seed=3)
    hessian = x.T @ x
    fmt = get_format(name)
    rounded = gptq(fmt.grid(weight), weight, hessian, GPTQSettings(sweep=sweep))
    tensors = fmt.encode(weight, rounding=lambda grid, w, _: gptq(grid, w, hessian, GPTQSettings(sweep=sweep)).pack(grid))
    assert {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()} == fmt.tensor_specs(tuple(weight.shape))
    assert torch.equal(fmt.decode(tensors, torch.bfloat16), rounded.weight)
    rtn = round_to_nearest(fmt.grid(weight), weight, hessian)
    assert rounded.error < 0.9 * rtn.error  # correlated inputs: GPTQ lowers the output error clearly
    assert rounded.error == pytest.approx(output_error(weight, rounded.weight, hessian))


def test_scale_sweep_improves_or_keeps_every_group() -> None:
    g = torch.Generator().manual_seed(4)
    weight = (torch.randn(64, 512, generator=g) * torch.rand(64, 1, generator=g)).to(torch.bfloat16)
    importance = torch.rand(512, generator=g)
    for name in ["NVFP4A16", "MXFP4A16", "INT4_W4A16"]:
        grid = get_format(name).grid(weight)
        base = grid.fit(weight)
        swept = sweep_scales(grid, weight, importance, base)

        def group_error(scales: torch.Tensor) -> torch.Tensor:
            err = (weight.float() - grid.round(weight, scales).float()).square() * importance
            return err.unflatten(-1, (base.shape[-1], -1)).sum(-1)

        before, after = group_error(base), group_error(swept)
        assert bool((after <= before).all())
        assert bool((after < before).float().mean() > 0.05)  # the sweep finds real improvements
        assert torch.equal(swept[after == before].float(), base[after == before].float())  # otherwise keeps
        if name.startswith("NVFP4"):  # NVFP4 candidates are E4M3 values: storable without loss
            assert torch.equal(swept.to(torch.float8_e4m3fn).float(), swept)


def test_singular_hessian_falls_back_to_round_to_nearest_with_a_warning() -> None:
    weight = torch.randn(8, 64) * 0.1
    grid = get_format("NVFP4A16").grid(weight)
    with pytest.warns(UserWarning, match="layer.x: the calibration Hessian stays singular"):
        result = gptq(grid, weight, -torch.eye(64), name="layer.x")
    assert result.method == "rtn"
    assert torch.equal(result.weight, get_format("NVFP4A16").qdq(weight))
    with pytest.warns(UserWarning, match="non-finite"):
        assert gptq(grid, weight, torch.full((64, 64), float("nan"))).method == "rtn"


@pytest.mark.parametrize("name", ["NVFP4", "MXFP4A16", "INT4_W4A16"])
@pytest.mark.parametrize("sweep", [False, True])
def test_siblings_rounded_together_equal_each_rounded_alone(name: str, sweep: bool) -> None:
    """q/k/v share H and one grid: stacking their rows changes nothing but the time (float64: exact decisions)."""
    g = torch.Generator().manual_seed(5)
    weights = {leaf: (torch.randn(rows, 256, generator=g) * scale).to(torch.bfloat16)
               for leaf, rows, scale in (("q", 24, 0.02), ("k", 8, 0.05), ("v", 8, 0.01))}
    x = correlated_inputs(256, seed=6)
    hessian = (x.T @ x).double()
    fmt = get_format(name)
    grid = fmt.grid(weights["q"], shared_amax=torch.stack([w.abs().amax() for w in weights.values()]).amax())
    settings = GPTQSettings(block_size=64, damping=(0.01, 0.1), sweep=sweep)
    together = gptq_siblings(grid, weights, hessian, settings)
    for leaf, weight in weights.items():
        alone = gptq(grid, weight, hessian, settings)
        assert torch.equal(as_bits(together[leaf].codes), as_bits(alone.codes))
        assert torch.equal(together[leaf].scales, alone.scales)
        assert together[leaf].method == alone.method
        assert together[leaf].error == pytest.approx(alone.error, rel=1e-9)
        assert together[leaf].rtn_error == pytest.approx(alone.rtn_error, rel=1e-9)


def test_a_shared_factor_cache_factorizes_once_and_changes_nothing(monkeypatch) -> None:
    """Several roundings of one weight on one H (formats, with and without the sweep) share H's factorizations."""
    import prismq.rounding.gptq as gptq_module

    g = torch.Generator().manual_seed(3)
    weight = (torch.randn(32, 128, generator=g) * 0.02).to(torch.bfloat16)
    x = correlated_inputs(128, seed=4)
    hessian = x.T @ x
    calls = []
    original = gptq_module._inverse_cholesky
    monkeypatch.setattr(gptq_module, "_inverse_cholesky", lambda *a: calls.append(a[1]) or original(*a))
    factors: dict = {}
    for name, sweep in (("NVFP4", False), ("NVFP4", True), ("MXFP8", False)):
        settings = GPTQSettings(block_size=32, damping=(0.01, 0.1), sweep=sweep)
        grid = get_format(name).grid(weight)
        shared = gptq_siblings(grid, {"w": weight}, hessian, settings, factors)["w"]
        alone = gptq(grid, weight, hessian, settings)
        assert torch.equal(as_bits(shared.codes), as_bits(alone.codes)) and torch.equal(shared.scales, alone.scales)
    assert sorted(factors) == [0.01, 0.1]
    assert len(calls) == 2 + 3 * 2  # the shared ones once per damping, the three alone twice each
