"""`prismq quantize`: MODEL in, compressed-tensors checkpoint out, as a list of stages over one work directory.

probe (per-token Fisher, input statistics) -> cost (every (Linear, format) priced on the bytes that ship) ->
allocate (a multiple-choice knapsack under the byte budget, or one format with --uniform; a predicted frontier over a
sweep of budgets; the uniform baselines that fit the same budget) -> input ranges (static input scales clipped on
calibration data, once, for every Linear some option could give one) -> select (SCOUT: L2 re-costing, L3 measured
flips, the validated frontier; `prismq.select`) -> round (the selected mix rounded by rtn / gptq / gptq+sweep layer
by layer, every candidate measured on the selection split, the kept method's mix and alternatives also on the
report split; an alternative of the same budget ships instead when it measures better) -> polish (moves measured
on the weights exactly as they ship, kept only if they lower the selection KL) -> export (exactly the tensors that
were measured) -> eval (report-split KL of the checkpoint read back layer by layer by compressed-tensors' own code)
-> report.md + summary.json + the model card.

Each stage writes a fingerprinted artifact in the work directory and resumes from it; every stage that runs the
model streams it (`prismq.engine.stream`): decoder layers are read from disk one at a time, candidates are lanes of
one walk, never model copies. `prismq allocate`, `prismq select` and `prismq export` run the same list up to that
stage.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from prismq.allocate.stage import Allocation, allocation_problem, offered_formats, stage_allocate
from prismq.artifacts import read_json
from prismq.config import MeasureConfig, QuantizeConfig
from prismq.engine.distributed import Ranks
from prismq.engine.memory import StageLog
from prismq.errors import PrismqError
from prismq.export.card import write_model_card
from prismq.export.writer import ExportResult
from prismq.measure.cost import CostRow
from prismq.model.check import check_model
from prismq.model.linears import LM_HEAD, model_dtype
from prismq.model.precision import device_description, dtype_name, resolve_compute_dtype
from prismq.model.source import resolve_device, resolve_model
from prismq.report import write_report
from prismq.stages import calibration_blocks, heldout_blocks, selection_blocks, stage_cost, stage_probe

logger = logging.getLogger(__name__)

Until = Literal["allocate", "select", "export"]


@dataclass
class QuantizeResult:
    """What `quantize` produced: the allocation always; the checkpoint, its evaluation and the report when the
    run went that far."""

    allocation: Allocation
    selection: Any = None  # prismq.select.stage.Selection once the select stage ran
    export: ExportResult | None = None
    evaluation: dict[str, Any] | None = None
    report: Path | None = None


def work_dir_of(config: QuantizeConfig) -> Path:
    """The work directory: --work-dir, or OUT.work beside the output."""
    if config.work_dir:
        return Path(config.work_dir)
    if not config.out:
        raise PrismqError("give --out (or --work-dir for the stages before export)")
    out = Path(config.out)
    return out.with_name(out.name + ".work")


def quantize(config: QuantizeConfig, until: Until = "export") -> QuantizeResult:
    """Run the stages of `prismq quantize` as configured, up to `until` (allocate, or everything), printing a
    short summary; returns what was produced."""
    if until == "export":
        if not config.out:
            raise PrismqError("--out is required: where to write the checkpoint")
        if Path(config.out).exists() and not config.overwrite:
            raise PrismqError(f"output {config.out} already exists (pass --overwrite to replace it)")
    work = work_dir_of(config)
    model_dir = resolve_model(config.model)
    formats, fallback = offered_formats(config, model_dir)
    # before any compute: a checkpoint we cannot serve fails here
    checked = check_model(model_dir, formats, config.vision_format)
    if checked.problems:
        raise PrismqError(f"{model_dir}: {checked.problems[0]}" + (f" (and {len(checked.problems) - 1} more; "
                          "`prismq check` lists them)" if len(checked.problems) > 1 else ""))
    for what, weights in checked.kept.items():
        logger.info("kept in the model dtype: %s, %s weights", what, f"{weights:,}")
    target = resolve_device(config.device)
    dtype = resolve_compute_dtype(config.compute_dtype, target, model_dtype(model_dir))
    logger.info("computing in %s on %s", dtype_name(dtype), device_description(target))
    measure = MeasureConfig(model=config.model, work_dir=work, calib=config.calib, heldout=config.heldout,
                            selection_text=config.selection_text, calib_blocks=config.calib_blocks,
                            selection_blocks=config.selection_blocks, heldout_blocks=config.heldout_blocks,
                            seqlen=config.calib_seqlen, device=config.device,
                            compute_dtype=config.compute_dtype, max_memory=config.max_memory_bytes)
    log = StageLog()
    with log.stage("probe"):
        stage_probe(measure)
    with log.stage("cost"):
        rows = stage_cost(work, [*formats, *fallback], config.device, config.compute_dtype)
    with log.stage("allocate"):
        allocation = stage_allocate(work, config, model_dir, rows)
    if until == "allocate":
        logger.info("allocation in %s: %s", work / "allocation.json", allocation.budget)
        return QuantizeResult(allocation)

    from prismq.export.stage import stage_eval, stage_export
    from prismq.rounding.ranges import needing_ranges, stage_ranges
    from prismq.rounding.stage import stage_round
    from prismq.select.polish_stage import stage_polish
    from prismq.select.stage import stage_select

    selection_split = selection_blocks(work)
    calibration = calibration_blocks(work)
    with log.stage("input ranges"):
        needing = needing_ranges(allocation_problem(config, model_dir, rows),
                                 [allocation.assignment, *(a for a, _ in allocation.baselines.values())])
        input_amax = stage_ranges(work, model_dir, dtype, config.device, calibration[:config.rounding_blocks],
                                  needing, config.max_memory_bytes)
    with log.stage("select"):
        selection = stage_select(work, config, allocation, model_dir, rows, dtype, config.device, selection_split,
                                 calibration, input_amax)
    if until == "select":
        logger.info("selection in %s: %d units changed", work / "selection.json", len(selection.changed))
        return QuantizeResult(allocation, selection)
    heldout = heldout_blocks(work)
    rounding = stage_round(work, config, allocation, model_dir, dtype, config.device,
                           calibration[:config.rounding_blocks], selection_split, heldout, log, input_amax,
                           mix=selection.assignment)
    with log.stage("polish"):
        polished = stage_polish(work, config, model_dir, rows, rounding, dtype, config.device, selection_split,
                                calibration[:config.rounding_blocks], input_amax)
    rounding = polished.shipped(rounding, input_amax)
    with log.stage("export"):
        result = stage_export(config, model_dir, rounding, checked.vision)
    with log.stage("eval (export)"):
        evaluation = stage_eval(work, result.path, model_dir, heldout, dtype, config.device,
                                config.max_memory_bytes)
    experts = sum(w for what, w in checked.kept.items() if what.startswith("routed experts"))
    all_bytes = result.linear_bytes + experts * model_dtype(model_dir).itemsize
    summary = _summary(config, allocation, selection, rounding, result, evaluation, rows,
                       {"compute_dtype": dtype_name(dtype), "device": device_description(target),
                        "processes": Ranks.current().world,
                        "seconds": {k: round(v, 1) for k, v in log.seconds.items()},
                        "peak_memory_gb": {k: {"host": round(v / 1e9, 3),
                                               **({"gpu": round(log.peak_gpu[k] / 1e9, 3)} if k in log.peak_gpu
                                                  else {})} for k, v in log.peak_host.items()},
                        "all_weights_params": result.linear_params + experts,
                        "all_weights_bits_per_param": 8 * all_bytes / max(result.linear_params + experts, 1),
                        "routed_experts": _routed_experts(work),
                        "vision": {"format": config.vision_format, "linears": dict(Counter(checked.vision.values())),
                                   "params": result.vision_params, "bytes": result.vision_bytes}},
                       polished.model_dump(exclude={"assignment", "store"}))
    plot = Path(allocation.frontier_plot) if allocation.frontier_plot else None
    report = write_report(work, summary, rounding.assignment, plot)
    frontier = json.loads((work / "frontier.json").read_text()) if (work / "frontier.json").exists() else None
    write_model_card(result.path, summary, rounding.assignment, frontier)
    per_format = summary["per_format"]
    counts = ", ".join(f"{f} x{sum(1 for v in rounding.assignment.values() if v == f)}" for f in per_format)
    logger.info("wrote %s: %.3f GB of tensors; %d weight matrices at %.3f bits/param (%s)", result.path,
                result.checkpoint_bytes / 1e9, len(rounding.assignment), result.linear_bits_per_param, counts)
    if experts:
        logger.info("every quantizable weight, the routed experts kept in the model dtype included: %.3f bits/param",
                    summary["all_weights_bits_per_param"])
    logger.info("held-out mean KL %.5f, same top-1 %.2f%%, PPL ratio %.4f; report: %s", evaluation["mean_kl"],
                100 * evaluation["same_top1"], evaluation["ppl_ratio"], report)
    logger.info("serve it with: vllm serve %s --quantization compressed-tensors", result.path)
    return QuantizeResult(allocation, selection, result, evaluation, report)


def _routed_experts(work: Path) -> dict[str, Any]:
    """How many routed expert matrices the probe measured, and the experts no calibration token reached (their
    Fisher is zero; they take their layer's format and GPTQ rounds them on an identity Hessian, i.e. to the least
    weight error)."""
    from prismq.artifacts import read_tensors
    from prismq.measure.fisher_experts import ROUTED_TOKENS
    from prismq.measure.probe_stage import PROBE_KIND, PROBE_STEM

    probed = read_tensors(work / PROBE_STEM, PROBE_KIND)
    counts = {} if probed is None else {key.removesuffix(f".{ROUTED_TOKENS}"): int(probed[0][key])
                                        for key in probed[0] if key.endswith(f".{ROUTED_TOKENS}")}
    idle = sorted({name.rpartition(".")[0] for name, count in counts.items() if count == 0})
    return {"matrices": len(counts), "without_tokens": idle}


def _comparison(allocation: Allocation, rounding: Any) -> list[str]:
    """The report's lines on the mix against each alternative of the same budget, on both splits."""
    mix, mix_report = rounding.mix_eval["mean_kl"], rounding.mix_report.get("mean_kl")
    lines = []
    for name, measured in rounding.baseline_evals.items():
        label = (f"uniform {name} ({allocation.baselines[name][1]:.3f} bits/param, {rounding.chosen})"
                 if name in allocation.baselines else f"the {name} ({rounding.chosen})")
        reported = rounding.baseline_reports.get(name, {}).get("mean_kl")
        line = (f"- {label}: selection-split mean KL {measured['mean_kl']:.5f}, the mix's "
                f"{mix / max(measured['mean_kl'], 1e-12) - 1:+.1%} relative to it")
        if reported is not None and mix_report is not None:
            line += (f"; report split {reported:.5f}, the mix's {mix_report / max(reported, 1e-12) - 1:+.1%} "
                     "relative to it")
        lines.append(line)
    if rounding.shipped != "mix":
        lines.append(f"- **shipped {rounding.shipped}**: it measured better than the mix on the selection split, and "
                     "prismq never ships a mix worse than an alternative that fits the same budget")
    return lines


def _summary(config: QuantizeConfig, allocation: Allocation, selection: Any, rounding: Any, result: ExportResult,
             evaluation: dict[str, Any], rows: list[CostRow], run: dict[str, Any],
             polish: dict[str, Any] | None = None) -> dict[str, Any]:
    """summary.json's content: settings, budget, bytes, KL of the export, the alternatives, the selection, the
    rounding."""
    by_row = {(r.linear, r.format): r for r in rows}
    per_format: dict[str, dict[str, int]] = {}
    for name, fmt in rounding.assignment.items():
        entry = per_format.setdefault(fmt, {"bytes": 0, "params": 0})
        entry["bytes"] += by_row[(name, fmt)].bytes
        entry["params"] += by_row[(name, fmt)].params
    comparison = _comparison(allocation, rounding)
    return {
        "model": str(config.model or "embedded default (SmolLM2-135M-Instruct)"), "out": str(result.path),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in config.model_dump().items()},
        "budget": allocation.budget, "kept": [LM_HEAD + " (BF16: vLLM's ParallelLMHead takes no compressed scheme)",
                                              "embeddings (BF16)"],
        "checkpoint_bytes": result.checkpoint_bytes, "linear_bytes": result.linear_bytes,
        "linear_params": result.linear_params, "bits_per_param": result.linear_bits_per_param,
        "predicted_dloss": float(sum(by_row[(n, f)].predicted_dloss for n, f in rounding.assignment.items())),
        "per_format": per_format, "eval": evaluation, "uniform_baselines": rounding.baseline_evals,
        "alternatives_report": rounding.baseline_reports,
        "comparison": comparison,
        "selection": {"mode": selection.mode, "flips_measured": len(selection.flips),
                      "units_measured": len(selection.units), "units_changed": len(selection.changed),
                      "surrogate_scale": selection.surrogate_scale, "recost": selection.recost,
                      "frontier": selection.frontier, "knee": selection.knee, "chosen": selection.chosen,
                      "shipped": rounding.shipped,
                      "mix_selection_kl": rounding.mix_eval, "mix_report_kl": rounding.mix_report,
                      "polish": polish},
        "rounding": {"methods": rounding.methods, "chosen": rounding.chosen, "mean_kl": rounding.mean_kl,
                     "output_error_vs_rtn_geomean": rounding.output_error_vs_rtn_geomean,
                     "rtn_kept": rounding.rtn_kept},
        "knee_bits": allocation.knee_bits, **run,
    }


def report(work: Path) -> Path:
    """`prismq report`: write report.md again from the work directory's summary.json."""
    summary = read_json(Path(work) / "summary.json", "summary")
    if summary is None:
        raise PrismqError(f"{work} has no summary.json: run `prismq quantize` (or `prismq export`) first")
    summary = {k: v for k, v in summary.items() if k not in ("kind", "schema_version", "prismq_version")}
    assignment = summary.pop("assignment")
    plot = Path(work) / "frontier.png"
    return write_report(Path(work), summary, assignment, plot if plot.exists() else None)
