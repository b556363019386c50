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

from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from prismq.artifacts import fingerprint_model, read_json, read_tensors, write_json
from prismq.engine.distributed import Ranks, run_everywhere
from prismq.errors import PrismqError
from prismq.formats import get_format
from prismq.model.checkpoint import SourceTensors
from prismq.measure.fisher import X_SAMPLE, input_statistic
from prismq.model.siblings import input_groups, sibling_groups, stacking_order
from prismq.model.targets import Target
from prismq.model.units import formats_legal_for


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
    def from_probe(cls, tensors: Mapping[str, torch.Tensor], name: str) -> LinearStats:
        """The stats of `name` from the probe's tensors (its input sample where the probe keeps it once for all
        the targets reading that input: `input_statistic`); a clear error if the probe does not cover it."""
        keys = [f"{name}.{key}" for key in ("fisher_out", "x_sq", "x_absmax")]
        sample = input_statistic(tensors, name, X_SAMPLE)
        try:
            if sample is None:
                raise KeyError(f"{name}.{X_SAMPLE}")
            return cls(*(tensors[key] for key in keys), sample)
        except KeyError as exc:
            raise PrismqError(f"the probe has no {exc.args[0]}; rerun `prismq probe`") from None


def batch_costs(format_name: str, weights: torch.Tensor, stats: list[LinearStats], shared_amax: torch.Tensor,
                shared_input_amax: torch.Tensor, names: list[str], dtype: torch.dtype | None = None) -> list[CostRow]:
    """Costs of B equal-shape Linears [B, out, in] (the checkpoint's dtype) in one format, vectorized over the batch.

    shared_amax / shared_input_amax [B]: each Linear's sibling-joint weight and input maxima. Every number is what
    that Linear alone would get (the codec's batched qdq is exact per matrix). Sampled inputs are quantized in
    `dtype`, the run's compute dtype (None: the weights' dtype); the products are float32."""
    fmt = get_format(format_name)
    x_sq = torch.stack([s.x_sq for s in stats]).to(weights.device, torch.float32)  # [B, in]
    dequantized = fmt.qdq(weights, shared_amax=shared_amax, name=names[0])
    delta = weights.float() - dequantized.float()
    weight_err = (delta.square() * x_sq.unsqueeze(1)).sum(dim=-1)  # [B, out]
    act_err = torch.zeros_like(weight_err)
    if fmt.quantizes_activations:
        x = torch.stack([s.x_sample for s in stats]).to(weights.device, dtype or weights.dtype)  # [B, rows, in]
        igs = None
        if fmt.needs_input_amax:
            igs = fmt.input_scale(shared_input_amax.to(weights.dtype).reshape(-1))
            igs = None if igs is None else igs.reshape(-1, 1, 1)
        exact = x.float() @ weights.float().transpose(1, 2)
        served = fmt.qdq_activation(x, igs).float() @ dequantized.float().transpose(1, 2)
        weight_only = x.float() @ dequantized.float().transpose(1, 2)
        act_err = ((exact - served).square().mean(1) - (exact - weight_only).square().mean(1)).clamp(min=0)
    fisher_out = torch.stack([s.fisher_out for s in stats]).to(weights.device, torch.float64)
    sensitivity = fisher_out / x_sq.double().sum(dim=1, keepdim=True).clamp(min=1e-30)
    output_err = weight_err.double() + act_err.double()
    dloss = 0.5 * (sensitivity * output_err).sum(dim=1)
    shape, size = tuple(weights.shape[1:]), fmt.nbytes(tuple(weights.shape[1:]), weights.dtype)
    weight_mse, output_sum, act_sum = delta.square().mean(dim=(1, 2)), output_err.sum(1), act_err.sum(1)
    return [CostRow(linear=name, format=fmt.name, bytes=size, params=shape[0] * shape[1],
                    weight_mse=float(weight_mse[b]), output_err=float(output_sum[b]), act_err=float(act_sum[b]),
                    predicted_dloss=float(dloss[b])) for b, name in enumerate(names)]


def measure_costs(source: SourceTensors, probe: Mapping[str, torch.Tensor], targets: Mapping[str, Target],
                  formats: list[str], device: torch.device, progress: bool = True, max_batch_elements: int = 1 << 24,
                  dtype: torch.dtype | None = None, ranks: Ranks | None = None) -> list[CostRow]:
    """Cost rows of every target for every format legal for its fused group's shapes, sibling groups sharing their
    scales.

    Targets of equal shape are priced together in batches of at most `max_batch_elements` weights. Weights are read
    one shape bucket at a time, so memory holds one bucket (not the model). `ranks` (default: the initialized
    process group's, else one process): the batches are divided among processes and every rank gets all rows, the
    same as one process computes."""
    ranks = ranks or Ranks.current()
    linears = list(targets)
    joint_amax: dict[str, torch.Tensor] = {}
    joint_input: dict[str, torch.Tensor] = {}
    legal_for_group: dict[str, list[str]] = {}
    for group in sibling_groups(linears):
        # on the device that prices them (a CPU's bf16 reductions are slow): the same maximum, exactly
        weight_amax = torch.stack([targets[n].read(source).to(device).abs().amax() for n in group]).amax()
        joint_amax.update(dict.fromkeys(group, weight_amax))
        experts = targets[group[0]].expert is not None
        block_fp8 = all(targets[n].key in source.scales for n in group)
        stacked = [targets[n].shape for n in sorted(group, key=stacking_order)]  # vLLM's order of the shards
        legal_for_group.update(dict.fromkeys(group, formats_legal_for(stacked, formats, experts, block_fp8)))
    for group in input_groups(linears):
        input_amax = torch.stack([LinearStats.from_probe(probe, n).x_absmax.reshape(()).float() for n in group]).amax()
        joint_input.update(dict.fromkeys(group, input_amax))
    buckets: dict[tuple[int, ...], list[str]] = {}
    for name in linears:
        buckets.setdefault(targets[name].shape, []).append(name)
    rows: dict[tuple[str, str], CostRow] = {}
    steps = {shape: max(1, max_batch_elements // (shape[0] * shape[1])) for shape in buckets}
    chunks = [names[start:start + steps[shape]] for shape, names in buckets.items()
              for start in range(0, len(names), steps[shape])]
    bar = tqdm(total=sum(len(c) for n, c in enumerate(chunks) if ranks.mine(n)), desc="cost", unit="linear",
               disable=not progress or not ranks.leader)
    for number, chunk in enumerate(chunks):
        if not ranks.mine(number):  # another process prices this batch
            continue
        weights = torch.stack([targets[n].read(source) for n in chunk]).to(device)
        stats = [LinearStats.from_probe(probe, n) for n in chunk]
        for format_name in formats:
            members = [i for i, n in enumerate(chunk) if format_name in legal_for_group[n]]
            if not members:
                continue
            index = torch.tensor(members, device=device)
            batch = batch_costs(format_name, weights[index], [stats[i] for i in members],
                                torch.stack([joint_amax[chunk[i]] for i in members]).to(device),
                                torch.stack([joint_input[chunk[i]] for i in members]).to(device),
                                [chunk[i] for i in members], dtype)
            rows.update(((r.linear, r.format), r) for r in batch)
        bar.update(len(chunk))
    bar.close()
    rows = ranks.gather(rows)
    return [rows[(n, f)] for n in linears for f in formats if (n, f) in rows]


def cost_walk(model_dir: Path, work_dir: Path, probe_expect: dict[str, str], targets: Mapping[str, Target],
              formats: list[str], device: torch.device, progress: bool, dtype: torch.dtype | None) -> list[CostRow]:
    """`measure_costs` over the work directory's probe, read (and checked against `probe_expect`) here (on every
    rank of a run on several processes: `run_everywhere`)."""
    probe_read = read_tensors(work_dir / "probe", "probe", expect=probe_expect)
    if probe_read is None:
        raise PrismqError(f"no probe in {work_dir}: run `prismq probe` first")
    with ExitStack() as stack:
        return measure_costs(SourceTensors(model_dir, stack), probe_read[0], targets, formats,
                             Ranks.current().device(device), progress, dtype=dtype)


def run_cost(model_dir: Path, work_dir: Path, targets: Mapping[str, Target], formats: list[str], device: torch.device,
             progress: bool = True, dtype: torch.dtype | None = None) -> list[CostRow]:
    """The cost stage: rows of `formats` for `targets`. Formats already priced in work_dir/cost.json for this model and
    probe are reused; only missing ones are measured and merged in (a new budget or format list reuses the work).
    A cost.json made from another model or probe is refused as stale. `dtype`: the compute dtype activation
    quantization is simulated in."""
    # the probe's sidecar only: its tensors are read (and their digest checked) where formats are to be priced
    probe_meta = read_json(Path(work_dir) / "probe.json", "probe", {"model": fingerprint_model(model_dir)})
    if probe_meta is None:
        raise PrismqError(f"no probe in {work_dir}: run `prismq probe` first")
    names = [get_format(f).name for f in formats]
    expect = {"model": probe_meta["model"], "probe": probe_meta["tensors_sha256"]}
    done = read_json(Path(work_dir) / "cost.json", "cost", expect)
    known = [] if done is None else done["formats"]
    rows = [] if done is None else [CostRow(**row) for row in done["rows"]]
    missing = [n for n in names if n not in known]
    if missing:
        rows += run_everywhere(cost_walk, model_dir=Path(model_dir), work_dir=Path(work_dir), targets=targets,
                               probe_expect={"model": probe_meta["model"],
                                             "tensors_sha256": probe_meta["tensors_sha256"]},
                               formats=missing, device=device, progress=progress, dtype=dtype)
        write_json(Path(work_dir) / "cost.json", "cost",
                   {**expect, "formats": known + missing, "rows": [asdict(r) for r in rows]})
    wanted, members = set(names), set(targets)
    return [r for r in rows if r.format in wanted and r.linear in members]
