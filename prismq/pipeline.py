"""`prismq quantize`: MODEL in, compressed-tensors checkpoint out, through one resumable work directory.

probe (per-token Fisher, input statistics) -> cost (every (Linear, format) priced on the bytes that ship) ->
allocate (a multiple-choice knapsack under the byte budget, or one format with --uniform; a predicted frontier over a
sweep of budgets) -> round (input ranges clipped on calibration data; weights rounded by rtn / gptq / gptq+sweep,
layer by layer, each measured on held-out KL when --rounding best) -> export (exactly the tensors that were
measured) -> eval (held-out KL of the exported checkpoint read back layer by layer by compressed-tensors' own code,
against the uniform formats that fit the same budget, rounded the same way) -> report.md + summary.json.

Every stage that runs the model streams it (`prismq.engine.stream`): decoder layers are read from disk one at a
time; rounding methods and uniform baselines are lanes of one walk, never model copies.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from prismq.allocate.budget import Problem, budget_bytes, build_problem
from prismq.config import QuantizeConfig
from prismq.errors import PrismqError
from prismq.export.writer import ExportResult, write_checkpoint
from prismq.model.checkpoint import SourceTensors
from prismq.formats import get_format
from prismq.model.linears import LM_HEAD, linear_shapes, model_dtype, quantizable
from prismq.model.precision import device_description, dtype_name, resolve_compute_dtype
from prismq.model.units import model_units
from prismq.model.source import resolve_device, resolve_model
from prismq.report import write_report
from prismq.stages import MeasureConfig, calibration_blocks, heldout_blocks, stage_cost, stage_probe


def _formats(config: QuantizeConfig) -> tuple[list[str], list[str]]:
    """The formats offered to every unit (--formats, or the --uniform format) and the fallbacks offered only where
    needed: BF16 (shapes no listed format takes, pinned routers) and --force formats not listed (their units only)."""
    names = list(dict.fromkeys(get_format(f).name for f in ([config.uniform] if config.uniform else config.formats)))
    forced = [get_format(rule.rpartition("=")[2]).name for rule in config.force]
    fallback = [f for f in dict.fromkeys([*forced, "BF16"]) if f not in names]
    for name in [*names, *fallback]:
        if not get_format(name).exportable:
            raise PrismqError(f"{name} is a research format no runtime serves yet; it cannot be exported")
    return names, fallback


def _allocate(config: QuantizeConfig, problem: Problem, other_bytes: int, work: Path) -> tuple[np.ndarray, str, Any]:
    """The chosen format index per unit, a one-line budget description, and the frontier (None for --uniform)."""
    if config.uniform is not None:
        target = get_format(config.uniform).name
        k, bf16 = problem.formats.index(target), problem.formats.index("BF16")
        finite = ~np.isinf(problem.cost)  # --force pins leave a unit a single finite option
        choice = np.where(finite[:, k], k, np.where(finite[:, bf16], bf16, np.argmin(problem.cost, axis=1)))
        return choice, f"uniform {target} (BF16 where it cannot take the shape)", None
    from prismq.allocate.knapsack import solve
    from prismq.allocate.pareto import budgets_from_bits, frontier_json, knee, plot_frontier, sweep

    budget = budget_bytes(problem, config.target_bits, config.target_size, other_bytes)
    label = (f"--target-bits {config.target_bits} -> {budget:,} bytes for the allocated Linears" if config.target_bits
             else f"--target-size {config.target_size} GB -> {budget:,} bytes for the allocated Linears")
    largest = int(np.where(np.isinf(problem.cost), 0, problem.size).max(axis=1).sum())
    if budget >= largest:
        print(f"prismq: the budget ({budget:,} bytes) covers the largest format of every Linear: nothing to trade off")
        label += " (at or above the all-largest assignment)"
    allocation = solve(problem.cost, problem.size, budget, params=problem.params)
    points = sweep(problem.cost, problem.size, budgets_from_bits(np.arange(4.25, 8.51, 0.25), problem.params),
                   problem.params)
    knee_index = knee(points) if points else None
    uniform = {}
    for name in problem.formats:
        size = problem.bytes_of(name)
        if size is not None:
            k = problem.formats.index(name)
            uniform[name] = (8 * size / problem.params, float(problem.cost[:, k].sum()))
    plot = work / "frontier.png"
    if points:
        plot_frontier(points, knee_index, uniform, plot, f"predicted frontier ({problem.params:,} weights)")
        frontier = frontier_json(points, knee_index, problem.formats)
        (work / "frontier.json").write_text(json.dumps(frontier, indent=1) + "\n")
    knee_bits = points[knee_index].bits_per_param if points and knee_index is not None else None
    return (allocation.choice, label + f"; knapsack gap {allocation.gap:.3g}",
            (plot if points else None, knee_bits, budget))


def _other_bytes(model_dir: Path, linears: list[str]) -> int:
    """Bytes of every source tensor that is not an allocated Linear's weight (they ship unchanged)."""
    allocated = {f"{n}.weight" for n in linears}
    with ExitStack() as stack:
        source = SourceTensors(model_dir, stack)
        return sum(source.nbytes(key) for key in source.names() if key not in allocated)


def _uniform_baselines(problem: Problem, budget: int,
                       config: QuantizeConfig) -> dict[str, tuple[dict[str, str], float]]:
    """The uniform assignments (BF16 only where a shape needs it) of each listed format that fit in the same byte
    budget: what the mixed result must beat."""
    if config.uniform is not None:
        return {}
    baselines = {}
    finite = ~np.isinf(problem.cost)
    for k, name in enumerate(problem.formats):
        if name not in [get_format(f).name for f in config.formats]:
            continue  # a fallback (BF16, a --force format) is not a baseline unless listed
        choice = np.where(finite[:, k], k, np.argmin(problem.cost, axis=1))
        size = int(problem.size[np.arange(len(choice)), choice].sum())
        if size <= budget:
            baselines[name] = (problem.assignment(choice), 8 * size / problem.params)
    return baselines


def better_uniform(mixed_kl: float, uniform_kl: dict[str, float]) -> str | None:
    """The uniform format to ship instead of the allocated mix: the one with the lowest measured KL, when it is lower
    than the mix's (predictions can misrank; measured KL decides). None when the mix measures best."""
    if not uniform_kl:
        return None
    best = min(uniform_kl, key=uniform_kl.__getitem__)
    return best if uniform_kl[best] < mixed_kl else None


def _input_ranges(stream: Any, calibration: Any, assignments: list[dict[str, str]], work: Path) -> dict:
    """Clipped input ranges for every Linear that any candidate assignment gives a static-input-scale format,
    started from the per-token input maxima the probe recorded on the same blocks (when it did)."""
    from prismq.artifacts import read_tensors
    from prismq.measure.fisher import X_TOKEN_MAX
    from prismq.measure.probe_stage import PROBE_KIND, PROBE_STEM
    from prismq.rounding.clip import streamed_input_amax

    needing = {n: f for a in assignments for n, f in a.items() if get_format(f).needs_input_amax}
    probed = read_tensors(work / PROBE_STEM, PROBE_KIND)
    tokens = calibration.numel()
    token_max = None
    same_arithmetic = probed is not None and probed[1].get("dtype") == str(stream.dtype).removeprefix("torch.")
    if probed is not None and same_arithmetic and all(f"{n}.{X_TOKEN_MAX}" in probed[0] for n in needing):
        token_max = {n: probed[0][f"{n}.{X_TOKEN_MAX}"][:tokens] for n in needing}
    return streamed_input_amax(stream, calibration, needing, token_max=token_max)


def _settings(config: QuantizeConfig) -> Any:
    """The GPTQ settings of the configuration."""
    from prismq.rounding.gptq import GPTQSettings

    return GPTQSettings(config.gptq_block_size, config.gptq_act_order, tuple(config.gptq_damping))


def _rounding_summary(methods: list[str], chosen: str, kls: dict[str, float], rounded: Any) -> dict[str, Any]:
    """What the rounding stage did: the methods measured, their held-out mean KL, the one shipped, and for GPTQ
    the output error relative to round-to-nearest (geomean over the Linears) and how many kept RTN."""
    ratios = list(rounded.error_ratios().values())
    geomean = float(np.exp(np.mean(np.log(np.maximum(ratios, 1e-30))))) if ratios else None
    return {"methods": methods, "chosen": chosen, "mean_kl": kls,
            "output_error_vs_rtn_geomean": geomean,
            "rtn_kept": sum(1 for method, _, _ in rounded.details.values() if method == "rtn")}


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    """Add the wall seconds of the enclosed block to timings[stage] (report.md shows where a run's time went)."""
    started = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - started


def quantize(config: QuantizeConfig) -> ExportResult:
    """Run `prismq quantize` as configured, print a short summary, write the report; returns what was written."""
    out = Path(config.out)
    if out.exists() and not config.overwrite:
        raise PrismqError(f"output {out} already exists (pass --overwrite to replace it)")
    formats, fallback = _formats(config)
    work = Path(config.work_dir) if config.work_dir else out.with_name(out.name + ".work")
    model_dir = resolve_model(config.model)
    linears = list(quantizable(linear_shapes(model_dir)))
    measure = MeasureConfig(model=config.model, work_dir=work, calib=config.calib, heldout=config.heldout,
                            calib_blocks=config.calib_blocks, heldout_blocks=config.heldout_blocks,
                            seqlen=config.calib_seqlen, formats=formats, device=config.device,
                            compute_dtype=config.compute_dtype)
    target = resolve_device(config.device)
    dtype = resolve_compute_dtype(config.compute_dtype, target, model_dtype(model_dir))
    print(f"prismq: computing in {dtype_name(dtype)} on {device_description(target)}")
    timings: dict[str, float] = {}
    with _timed(timings, "probe"):
        stage_probe(measure)
    with _timed(timings, "cost"):
        rows = stage_cost(work, [*formats, *fallback], config.device, config.compute_dtype)
    units = model_units(model_dir)
    pins = [(re.compile(f"^{re.escape(m)}$"), u.pinned) for u in units if u.pinned for m in u.members]
    problem = build_problem(rows, [list(u.members) for u in units], formats, pins + config.force_rules(), fallback)
    with _timed(timings, "allocate"):
        choice, budget_label, frontier = _allocate(config, problem, _other_bytes(model_dir, linears), work)
    assignment = problem.assignment(choice)

    from prismq.engine.stream import LayerStream, final_hidden_states
    from prismq.measure.kl import HiddenStates, evaluate_states
    from prismq.rounding.lanes import round_lanes
    from prismq.rounding.sequential import METHODS

    device, heldout = config.device, heldout_blocks(work)
    calibration = calibration_blocks(work)[:config.rounding_blocks]
    baselines = _uniform_baselines(problem, frontier[2], config) if frontier is not None else {}
    methods = list(METHODS) if config.rounding == "best" else [config.rounding]
    with LayerStream(model_dir, dtype, device) as stream:
        with _timed(timings, "input ranges"):
            input_amax = _input_ranges(stream, calibration, [assignment, *(a for a, _ in baselines.values())], work)
        with _timed(timings, "rounding + held-out eval"):
            walk = round_lanes(stream, [(assignment, m) for m in methods], calibration, heldout, input_amax,
                               _settings(config), spill_dir=work / "rounded" / "methods")
        kls = {m: r.mean_kl for m, r in zip(methods, walk.kl)} if len(methods) > 1 else {}
        chosen = min(kls, key=kls.__getitem__) if kls else methods[0]
        rounded = walk.rounded[methods.index(chosen)]
        rounding = _rounding_summary(methods, chosen, kls, rounded)
        if len(methods) > 1:
            print(f"prismq: rounding {chosen} measured best ("
                  + ", ".join(f"{m} {kl:.5f}" for m, kl in kls.items()) + " held-out mean KL)")
        with _timed(timings, "export"):
            result = write_checkpoint(model_dir, assignment, out, encoded=rounded.encoded, input_amax=input_amax,
                                      max_shard_bytes=config.max_shard_bytes, overwrite=config.overwrite)
        baseline_walk = None
        if baselines:
            with _timed(timings, "rounding + held-out eval"):
                baseline_walk = round_lanes(stream, [(a, chosen) for a, _ in baselines.values()], calibration,
                                            heldout, input_amax, _settings(config),
                                            reference_hidden=walk.reference_hidden,
                                            spill_dir=work / "rounded" / "baselines")
        with _timed(timings, "eval (export)"), LayerStream(out, dtype, device) as exported:
            hidden = final_hidden_states(exported, heldout, desc="read back the export")
            (exported_kl,) = evaluate_states(HiddenStates(stream.head, heldout, walk.reference_hidden),
                                             [HiddenStates(exported.head, heldout, hidden)], heldout)
    results = [exported_kl.to_json(), *([r.to_json() for r in baseline_walk.kl] if baseline_walk else [])]
    evaluation, baseline_evals = results[0], dict(zip(baselines, results[1:]))
    comparison = [f"- uniform {name} ({baselines[name][1]:.3f} bits/param, {chosen}): mean KL {b['mean_kl']:.5f}; "
                  f"the allocated mix's mean KL is {evaluation['mean_kl'] / max(b['mean_kl'], 1e-12) - 1:+.1%} "
                  "relative to it" for name, b in baseline_evals.items()]
    fallback = better_uniform(evaluation["mean_kl"], {n: b["mean_kl"] for n, b in baseline_evals.items()})
    if fallback is not None:
        print(f"prismq: the allocated mix measured worse (mean KL {evaluation['mean_kl']:.5f}) than uniform {fallback} "
              f"in the same bytes ({baseline_evals[fallback]['mean_kl']:.5f}): shipping uniform {fallback} instead")
        comparison.append(f"- **shipped uniform {fallback}**: it measured better than the allocated mix, and prismq "
                          "never ships a mix worse than a uniform format that fits the same budget")
        assignment, evaluation = baselines[fallback][0], baseline_evals[fallback]
        with _timed(timings, "export"):
            assert baseline_walk is not None
            fallback_rounded = baseline_walk.rounded[list(baselines).index(fallback)]
            result = write_checkpoint(model_dir, assignment, out, encoded=fallback_rounded.encoded,
                                      input_amax=input_amax, max_shard_bytes=config.max_shard_bytes, overwrite=True)
    per_format: dict[str, dict[str, int]] = {}
    by_row = {(r.linear, r.format): r for r in rows}
    for name, fmt in assignment.items():
        entry = per_format.setdefault(fmt, {"bytes": 0, "params": 0})
        entry["bytes"] += by_row[(name, fmt)].bytes
        entry["params"] += by_row[(name, fmt)].params
    summary = {
        "model": str(config.model or "embedded default (SmolLM2-135M-Instruct)"), "out": str(out),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in config.model_dump().items()},
        "budget": budget_label, "kept": [LM_HEAD + " (BF16: vLLM's ParallelLMHead takes no compressed scheme)",
                                         "embeddings (BF16)"],
        "checkpoint_bytes": result.checkpoint_bytes, "linear_bytes": result.linear_bytes,
        "linear_params": result.linear_params, "bits_per_param": result.linear_bits_per_param,
        "predicted_dloss": float(sum(by_row[(n, f)].predicted_dloss for n, f in assignment.items())),
        "per_format": per_format, "eval": evaluation, "uniform_baselines": baseline_evals,
        "comparison": comparison, "rounding": rounding,
        "knee_bits": None if frontier is None else frontier[1],
        "compute_dtype": dtype_name(dtype), "seconds": {k: round(v, 1) for k, v in timings.items()},
        "device": device_description(target),
    }
    report = write_report(work, summary, assignment, None if frontier is None else frontier[0])
    print(f"prismq: wrote {result.path}: {result.checkpoint_bytes / 1e9:.3f} GB of tensors; "
          f"{len(assignment)} Linears at {result.linear_bits_per_param:.3f} bits/param "
          f"({', '.join(f'{f} x{sum(1 for v in assignment.values() if v == f)}' for f in per_format)})")
    print(f"prismq: held-out mean KL {evaluation['mean_kl']:.5f}, same top-1 {evaluation['same_top1']:.2%}, "
          f"PPL ratio {evaluation['ppl_ratio']:.4f}; report: {report}")
    print(f"prismq: serve it with: vllm serve {result.path} --quantization compressed-tensors")
    return result
