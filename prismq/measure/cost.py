"""Cost of every (Linear, format): the exact bytes that would ship, their error, and the predicted loss increase.

The error is measured on exactly what the exporter writes: each weight goes through its format's codec with the
global scale its fused siblings share (`prismq.export.encode` semantics), and formats that quantize activations
have their input quantized as the runtime does, on a uniform sample of calibration rows from the probe.

Predicted delta-loss (mean next-token NLL per token), from the probe's per-token empirical Fisher:

    dloss = 0.5 * sum_i a_i * err_i,    a_i = fisher_out_i / sum_j E[x_j^2],
    err_i = sum_j E[x_j^2] * (W - What)_ij^2  +  act_i

fisher_out_i = (1/T) sum_t dy_ti^2 ||x_t||^2 is the Fisher of output channel i summed over its inputs, so a_i is
E[dy_i^2] when the gradient and the input norm are independent, and a_i * E[x_j^2] is the rank-1 (row x column)
factorisation of the diagonal Fisher F_ij = E[dy_i^2 x_j^2] that keeps its row sums exact. err_i is the expected
squared output error of channel i: the weight part is exact under that diagonal model over all calibration tokens;
act_i (W4A4/W8A8 only) is the extra output error measured on the sampled rows when the input is quantized too,
mean_t[(x W^T - q(x) What^T)_i^2] - mean_t[(x (W - What)^T)_i^2], floored at 0. Summing the diagonal terms ignores
cross-channel curvature (as Optimal Brain Damage does); selection later checks the choice with measured KL.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from prismq.artifacts import fingerprint_model, read_json, read_tensors, write_json
from prismq.errors import PrismqError
from prismq.export.writer import SourceTensors
from prismq.formats import get_format
from prismq.formats.nvfp4 import global_scale
from prismq.model.siblings import sibling_groups


@dataclass(frozen=True)
class CostRow:
    """One (Linear, format) pair."""

    linear: str
    format: str
    bytes: int
    params: int
    weight_mse: float
    output_err: float
    act_err: float
    predicted_dloss: float


@dataclass(frozen=True)
class LinearStats:
    """What the probe measured for one Linear (see prismq.measure.fisher)."""

    fisher_out: torch.Tensor  # [out]
    x_sq: torch.Tensor  # [in]  E[x_j^2]
    x_absmax: torch.Tensor  # scalar
    x_sample: torch.Tensor  # [rows, in], uniform over calibration positions

    @classmethod
    def from_probe(cls, tensors: dict[str, torch.Tensor], name: str) -> LinearStats:
        """The stats of `name` from the probe's tensors; a clear error if the probe does not cover it."""
        try:
            return cls(*(tensors[f"{name}.{key}"] for key in ("fisher_out", "x_sq", "x_absmax", "x_sample")))
        except KeyError as exc:
            raise PrismqError(f"the probe has no {exc.args[0]}; rerun `prismq probe`") from None


def format_cost(format_name: str, weight: torch.Tensor, stats: LinearStats, shared_amax: torch.Tensor,
                shared_input_amax: torch.Tensor, name: str = "weight") -> CostRow:
    """Cost of one Linear in one format, from the codec's own fake-quantization of the weight and input."""
    fmt = get_format(format_name)
    x_sq = stats.x_sq.to(weight.device, torch.float32)
    dequantized = fmt.qdq(weight, shared_amax=shared_amax, name=name)
    delta = (weight.float() - dequantized.float())
    weight_err = (delta.square() * x_sq).sum(dim=1)  # [out]
    act_err = torch.zeros_like(weight_err)
    if fmt.quantizes_activations:
        x = stats.x_sample.to(weight.device, weight.dtype)
        igs = global_scale(shared_input_amax.to(weight.dtype)) if fmt.needs_input_amax else None
        exact = x.float() @ weight.float().T
        served = fmt.qdq_activation(x, igs).float() @ dequantized.float().T
        weight_only = x.float() @ dequantized.float().T
        act_err = ((exact - served).square().mean(0) - (exact - weight_only).square().mean(0)).clamp(min=0)
    sensitivity = stats.fisher_out.to(weight.device, torch.float64) / x_sq.double().sum().clamp(min=1e-30)
    output_err = weight_err.double() + act_err.double()
    return CostRow(
        linear=name, format=fmt.name, bytes=fmt.nbytes(tuple(weight.shape), weight.dtype), params=weight.numel(),
        weight_mse=float(delta.square().mean()), output_err=float(output_err.sum()), act_err=float(act_err.sum()),
        predicted_dloss=float(0.5 * (sensitivity * output_err).sum()),
    )


def measure_costs(source: SourceTensors, probe: dict[str, torch.Tensor], linears: list[str], formats: list[str],
                  device: torch.device, progress: bool = True) -> list[CostRow]:
    """Cost rows of every Linear for every format legal for its shape, sibling groups sharing their scales."""
    rows: list[CostRow] = []
    groups = sibling_groups(linears)
    for group in tqdm(groups, desc="cost", unit="unit", disable=not progress):
        weights = {n: source.get(f"{n}.weight").to(device) for n in group}
        stats = {n: LinearStats.from_probe(probe, n) for n in group}
        shared_amax = torch.stack([w.abs().amax() for w in weights.values()]).amax()
        shared_input = torch.stack([s.x_absmax.reshape(()).float() for s in stats.values()]).amax()
        for format_name in formats:
            if not all(get_format(format_name).legal(tuple(w.shape)) for w in weights.values()):
                continue
            rows.extend(format_cost(format_name, weights[n], stats[n], shared_amax, shared_input, name=n)
                        for n in group)
    return rows


def run_cost(model_dir: Path, work_dir: Path, linears: list[str], formats: list[str], device: torch.device,
             progress: bool = True) -> list[CostRow]:
    """The cost stage: reuse work_dir/cost.json when it matches this model, probe and format list, else measure."""
    probe_read = read_tensors(Path(work_dir) / "probe", "probe", expect={"model": fingerprint_model(model_dir)})
    if probe_read is None:
        raise PrismqError(f"no probe in {work_dir}: run `prismq probe` first")
    probe, probe_meta = probe_read
    names = [get_format(f).name for f in formats]
    expect = {"model": probe_meta["model"], "probe": probe_meta["tensors_sha256"], "formats": names}
    done = read_json(Path(work_dir) / "cost.json", "cost", expect)
    if done is not None:
        return [CostRow(**row) for row in done["rows"]]
    with ExitStack() as stack:
        rows = measure_costs(SourceTensors(Path(model_dir), stack), probe, linears, names, device, progress)
    write_json(Path(work_dir) / "cost.json", "cost", {**expect, "rows": [asdict(r) for r in rows]})
    return rows
