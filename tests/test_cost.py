"""The cost stage measures exactly the bytes that ship, and its numbers equal a direct measurement."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
from ct_reference import PRESETS, ct_decode, ct_encode, ct_fake_quantize_activation
from safetensors.torch import load_file

from prismq.artifacts import fingerprint_model, read_json, write_tensors
from prismq.errors import PrismqError
from prismq.export.writer import write_checkpoint
from prismq.model.checkpoint import SourceTensors
from prismq.formats import get_format
from prismq.measure.cost import LinearStats, batch_costs, run_cost
from prismq.model.targets import Target, model_targets


def hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@pytest.mark.parametrize("name", ["NVFP4A16", "MXFP4A16", "INT4_W4A16", "FP8", "BF16"])
def test_output_error_equals_a_direct_measurement(name: str) -> None:
    """With inputs whose second-moment matrix is diagonal (Hadamard rows, scaled columns), the cost's weight
    output error equals the measured mean squared output error of the decoded shipped weight, per channel."""
    g = torch.Generator().manual_seed(0)
    out, inp = 48, 256
    w = (torch.randn(out, inp, generator=g) * 0.05).to(torch.bfloat16)
    x = hadamard(inp) * torch.logspace(-1, 0.5, inp)  # [T=in, in], X^T X / T = diag(scale^2)
    fisher_out = torch.rand(out, generator=g)
    stats = LinearStats(fisher_out, x.square().mean(0), x.abs().amax(), x[:64].to(torch.bfloat16))
    (row,) = batch_costs(name, w[None], [stats], w.abs().amax()[None], x.abs().amax()[None], ["weight"])
    fmt = get_format(name)
    # what a loader reconstructs, by compressed-tensors' own compression and decompression (BF16 ships w itself)
    shipped = (ct_decode(name, ct_encode(name, w), torch.bfloat16) if name in PRESETS else w).double()
    per_channel = (x.double() @ (w.double() - shipped).T).square().mean(0)  # [out]
    assert row.output_err - row.act_err == pytest.approx(float(per_channel.sum()), rel=1e-5)
    if not fmt.quantizes_activations:
        sensitivity = fisher_out.double() / x.square().mean(0).double().sum()
        assert row.predicted_dloss == pytest.approx(float(0.5 * (sensitivity * per_channel).sum()), rel=1e-5)
    assert row.bytes == fmt.nbytes((out, inp)) and row.params == out * inp
    assert (row.output_err == 0) == (name == "BF16")


def test_activation_error_is_the_extra_output_error_of_quantized_inputs() -> None:
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(32, 128, generator=g) * 0.05).to(torch.bfloat16)
    x = (torch.randn(64, 128, generator=g) * torch.logspace(-2, 1, 128)).to(torch.bfloat16)
    stats = LinearStats(torch.ones(32), x.float().square().mean(0), x.abs().amax().float(), x)
    (row,) = batch_costs("MXFP8", w[None], [stats], w.abs().amax()[None], x.abs().amax()[None], ["weight"])
    wq = ct_decode("MXFP8", ct_encode("MXFP8", w), torch.bfloat16).float()  # compressed-tensors' reference
    exact, served = x.float() @ w.float().T, ct_fake_quantize_activation("MXFP8", x[None])[0].float() @ wq.T
    direct = ((exact - served).square().mean(0) - (exact - x.float() @ wq.T).square().mean(0)).clamp(min=0)
    assert row.act_err == pytest.approx(float(direct.sum()), rel=1e-5) and row.act_err > 0
    assert batch_costs("MXFP8A16", w[None], [stats], w.abs().amax()[None], x.abs().amax()[None],
                       ["weight"])[0].act_err == 0


def fake_probe(model_dir: Path, work_dir: Path, seed: int = 2) -> dict[str, Target]:
    """Probe tensors of the right shapes (values random): the cost stage's contract, without running a probe;
    returns the model's quantization targets."""
    targets = model_targets(model_dir)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (out, inp) in ((n, t.shape) for n, t in targets.items()):
        tensors |= {f"{name}.fisher_out": torch.rand(out, generator=g), f"{name}.x_sq": torch.rand(inp, generator=g),
                    f"{name}.x_absmax": torch.tensor(4.0), f"{name}.fisher_trace": torch.tensor(1.0),
                    f"{name}.x_sample": torch.randn(16, inp, generator=g).to(torch.bfloat16)}
    write_tensors(work_dir / "probe", "probe", tensors, {"model": fingerprint_model(model_dir)})
    return targets


def test_cost_stage_prices_the_shipped_bytes_with_shared_sibling_scales(tiny_llama_dir: Path, tmp_path: Path) -> None:
    shapes = fake_probe(tiny_llama_dir, tmp_path)
    rows = run_cost(tiny_llama_dir, tmp_path, shapes, ["NVFP4A16", "INT4_W4A16", "BF16"], torch.device("cpu"),
                    progress=False)
    assert len(rows) == 3 * len(shapes)  # every tiny-Llama Linear has in % 128 == 0
    exported = write_checkpoint(tiny_llama_dir, {n: "NVFP4A16" for n in shapes}, tmp_path / "ckpt", progress=False)
    shipped = load_file(exported.path / "model.safetensors")
    source = load_file(tiny_llama_dir / "model.safetensors")
    name = "model.layers.1.self_attn.k_proj"
    tensors = {k.removeprefix(f"{name}."): v for k, v in shipped.items() if k.startswith(f"{name}.")}
    delta = source[f"{name}.weight"].float() - get_format("NVFP4A16").decode(tensors).float()
    row = next(r for r in rows if r.linear == name and r.format == "NVFP4A16")
    assert row.weight_mse == pytest.approx(float(delta.square().mean()), rel=1e-6)


def test_cost_stage_resumes_and_refuses_a_missing_or_stale_probe(tiny_llama_dir: Path, tmp_path: Path,
                                                                 monkeypatch) -> None:
    with pytest.raises(PrismqError, match="no probe"):
        run_cost(tiny_llama_dir, tmp_path, {}, ["FP8"], torch.device("cpu"))
    shapes = fake_probe(tiny_llama_dir, tmp_path)
    first = run_cost(tiny_llama_dir, tmp_path, shapes, ["FP8"], torch.device("cpu"), progress=False)
    import prismq.measure.cost as cost

    monkeypatch.setattr(cost, "measure_costs", lambda *a, **k: pytest.fail("recomputed instead of resuming"))
    assert run_cost(tiny_llama_dir, tmp_path, shapes, ["FP8"], torch.device("cpu")) == first
    monkeypatch.undo()
    both = run_cost(tiny_llama_dir, tmp_path, shapes, ["BF16", "FP8"], torch.device("cpu"), progress=False)
    assert read_json(tmp_path / "cost.json", "cost")["formats"] == ["FP8", "BF16"]  # only BF16 was measured
    assert [r for r in both if r.format == "FP8"] == first
    fake_probe(tiny_llama_dir, tmp_path, seed=3)  # a new probe (other values): the old costs are stale
    with pytest.raises(PrismqError, match="stale"):
        run_cost(tiny_llama_dir, tmp_path, shapes, ["FP8"], torch.device("cpu"))


def test_batching_equal_shapes_changes_no_number(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file as load

    from prismq.measure.cost import measure_costs

    shapes = fake_probe(tiny_llama_dir, tmp_path)
    probe = load(tmp_path / "probe.safetensors")
    formats = ["NVFP4", "MXFP4", "FP8", "INT4_W4A16", "BF16"]
    with ExitStack() as stack:
        source = SourceTensors(tiny_llama_dir, stack)
        batched = measure_costs(source, probe, shapes, formats, torch.device("cpu"), progress=False)
        alone = measure_costs(source, probe, shapes, formats, torch.device("cpu"), progress=False,
                              max_batch_elements=1)
    assert len(batched) == len(shapes) * len(formats)
    for a, b in zip(batched, alone):
        assert a.linear == b.linear and a.format == b.format
        assert a.weight_mse == b.weight_mse and a.bytes == b.bytes
        assert a.predicted_dloss == pytest.approx(b.predicted_dloss, rel=1e-5)
