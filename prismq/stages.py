"""The measurement stages over one work directory: `probe` (calibration statistics) then `cost` (per-format prices).

`probe` records what it was run on in WORK/run.json (the model, the text settings) and the held-out blocks in
WORK/heldout.safetensors, so the later stages need only --work-dir, and every stage resumes from what is already
there (each artifact is fingerprinted; a stale one is refused, never silently reused).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch

from prismq.artifacts import read_json, read_tensors, write_json, write_tensors
from prismq.config import MeasureConfig
from prismq.data import text_splits
from prismq.errors import PrismqError
from prismq.formats import get_format
from prismq.measure.cost import CostRow, run_cost
from prismq.measure.probe_stage import run_probe
from prismq.model.linears import model_dtype
from prismq.model.precision import resolve_compute_dtype
from prismq.model.source import load_tokenizer, resolve_device, resolve_model
from prismq.model.targets import model_targets


def _run_record(config: MeasureConfig, model_dir: Path) -> dict:
    return {"model": config.model, "model_dir": str(model_dir), "calib": config.calib, "heldout": config.heldout,
            "selection_text": config.selection_text, "calib_blocks": config.calib_blocks,
            "selection_blocks": config.selection_blocks, "heldout_blocks": config.heldout_blocks,
            "seqlen": config.seqlen, "seed": config.seed}


def stage_probe(config: MeasureConfig) -> Path:
    """Split the text three ways (calibration, selection, held-out report), keep the blocks, and run (or resume) the
    probe on the calibration blocks."""
    work = Path(config.work_dir)
    model_dir = resolve_model(config.model)
    record = _run_record(config, model_dir)
    previous = read_json(work / "run.json", "run")
    if previous is not None and any(previous.get(k) != v for k, v in record.items()):
        changed = [k for k, v in record.items() if previous.get(k) != v]
        raise PrismqError(f"{work} holds a run with other settings ({', '.join(changed)}); use another --work-dir")
    tokenizer = load_tokenizer(model_dir)
    splits = text_splits(config.calib, config.heldout, config.selection_text, tokenizer, config.calib_blocks,
                         config.selection_blocks, config.heldout_blocks, config.seqlen, config.seed)
    write_json(work / "run.json", "run", record)
    write_tensors(work / "heldout", "blocks", {"tokens": splits.report}, {"split": "heldout"})
    write_tensors(work / "selection_text", "blocks", {"tokens": splits.selection}, {"split": "selection"})
    write_tensors(work / "calibration", "blocks", {"tokens": splits.calibration}, {"split": "calibration"})
    device = resolve_device(config.device)
    dtype = resolve_compute_dtype(config.compute_dtype, device, model_dtype(model_dir))
    return run_probe(model_dir, work, splits.calibration, device=device, sample_rows=config.sample_rows,
                     seed=config.seed, dtype=dtype, max_memory=config.max_memory)


def run_model_dir(work_dir: Path) -> Path:
    """The model directory a work directory was probed with."""
    record = read_json(Path(work_dir) / "run.json", "run")
    if record is None:
        raise PrismqError(f"{work_dir} has no run.json: run `prismq probe MODEL --work-dir {work_dir}` first")
    return Path(record["model_dir"])


def _blocks(work_dir: Path, stem: str, what: str) -> torch.Tensor:
    stored = read_tensors(Path(work_dir) / stem, "blocks")
    if stored is None:
        raise PrismqError(f"{work_dir} has no {what} blocks: run `prismq probe` first")
    return stored[0]["tokens"]


def heldout_blocks(work_dir: Path) -> torch.Tensor:
    """The held-out (report) token blocks the probe stage set aside: the KL report.md states, never a decision's."""
    return _blocks(work_dir, "heldout", "held-out")


def selection_blocks(work_dir: Path) -> torch.Tensor:
    """The selection token blocks: every KL a decision is made on (disjoint from calibration and report)."""
    return _blocks(work_dir, "selection_text", "selection")


def calibration_blocks(work_dir: Path) -> torch.Tensor:
    """The calibration token blocks the probe ran on (input ranges and GPTQ use the same ones)."""
    return _blocks(work_dir, "calibration", "calibration")


def stage_cost(work_dir: Path, formats: list[str], device: str = "auto", compute_dtype: str = "auto") -> list[CostRow]:
    """Run (or resume) the cost stage for `formats` over the work directory's model and probe; activation
    quantization is simulated in `compute_dtype` (auto | bf16 | fp32)."""
    model_dir = run_model_dir(work_dir)
    names = [get_format(f).name for f in formats]
    target = resolve_device(device)
    dtype = resolve_compute_dtype(compute_dtype, target, model_dtype(model_dir))
    return run_cost(model_dir, Path(work_dir), model_targets(model_dir), names, target, dtype=dtype)


def cost_summary(rows: list[CostRow]) -> str:
    """A per-format table: Linears it can take, bits per parameter over them, summed predicted delta-loss."""
    totals: dict[str, list[float]] = defaultdict(lambda: [0, 0, 0, 0.0])
    for row in rows:
        total = totals[row.format]
        total[0] += 1
        total[1] += row.bytes
        total[2] += row.params
        total[3] += row.predicted_dloss
    lines = [f"{'format':<12} {'linears':>7} {'bpp':>7} {'sum predicted dloss':>20}"]
    for name, (count, size, params, dloss) in totals.items():
        lines.append(f"{name:<12} {count:>7} {8 * size / params:>7.3f} {dloss:>20.6g}")
    return "\n".join(lines)
