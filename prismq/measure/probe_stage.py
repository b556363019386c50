"""`prismq probe` as a work-directory stage: resumes from probe.{safetensors,json}, refuses stale ones.

The artifact is WORK_DIR/probe.safetensors (per quantizable Linear NAME: NAME.fisher_out, NAME.fisher_trace,
NAME.x_sq, NAME.x_absmax, NAME.x_sample, NAME.x_token_max; `loss`, the mean calibration NLL; see
`prismq.measure.fisher.probe`) with its sidecar WORK_DIR/probe.json
(model and text fingerprints, token count, settings, mean calibration NLL, dtype, prismq version).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from prismq.artifacts import fingerprint_model, fingerprint_tokens, read_tensors, write_tensors
from prismq.engine.distributed import Ranks, run_everywhere
from prismq.engine.stream import LayerStream
from prismq.engine.walkstate import WalkState
from prismq.measure import fisher_streamed
from prismq.model.source import resolve_device
from prismq.model.targets import model_targets

PROBE_KIND = "probe"
PROBE_STEM = "probe"


def probe_expect(model_dir: Path, blocks: torch.Tensor, sample_rows: int, seed: int) -> dict[str, Any]:
    """The sidecar values a probe artifact must have to be reused for this model, text and settings."""
    return {"model": fingerprint_model(model_dir), "text": fingerprint_tokens(blocks),
            "sample_rows": sample_rows, "seed": seed}


def run_probe(model_dir: Path, work_dir: Path, blocks: torch.Tensor, *, device: str | torch.device,
              sample_rows: int = 128, seed: int = 0, progress: bool = True, dtype: torch.dtype | None = None,
              max_memory: int | None = None) -> Path:
    """Run the probe stage and return the artifact stem WORK_DIR/probe (read it with
    `prismq.artifacts.read_tensors(stem, PROBE_KIND, probe_expect(...))`).

    The model is streamed (one decoder layer in memory at a time, `probe_streamed`). If a probe artifact for the
    same model, blocks, sample_rows and seed is already there it is reused without reading the model (resume);
    one made for anything else is refused as stale, a corrupt one is refused too (`read_tensors` raises
    PrismqError for both), so a run never silently mixes measurements."""
    model_dir, work_dir = Path(model_dir), Path(work_dir)
    stem = work_dir / PROBE_STEM
    expect = probe_expect(model_dir, blocks, sample_rows, seed)
    if read_tensors(stem, PROBE_KIND, expect) is not None:
        return stem
    names = list(model_targets(model_dir))
    walk = work_dir / f"{PROBE_STEM}.walk"
    fisher_streamed.remove_scratch(work_dir)
    computed_in, tensors = run_everywhere(probe_walk, model_dir=model_dir, blocks=blocks, names=names, device=device,
                                          sample_rows=sample_rows, seed=seed, progress=progress, dtype=dtype,
                                          max_memory=max_memory, walk=walk, expect=expect)
    loss = float(tensors["loss"])
    meta = {**expect, "tokens": int(blocks.numel()), "blocks": int(blocks.shape[0]), "seqlen": int(blocks.shape[1]),
            "loss": loss, "dtype": computed_in, "linears": len(names)}
    write_tensors(stem, PROBE_KIND, tensors, meta)
    WalkState(walk, expect).clear()
    return stem


def probe_walk(model_dir: Path, blocks: torch.Tensor, names: list[str], device: str | torch.device, sample_rows: int,
               seed: int, progress: bool, dtype: torch.dtype | None, max_memory: int | None, walk: Path,
               expect: dict[str, Any]) -> tuple[str, Mapping[str, torch.Tensor]]:
    """The probe's streamed walk (on every rank of a run on several processes: `run_everywhere`), kept in `walk`
    for `expect`: the compute dtype's name and the statistics."""
    with LayerStream(model_dir, dtype, Ranks.current().device(resolve_device(device)), max_memory) as stream:
        computed_in = str(stream.dtype).removeprefix("torch.")
        state = WalkState(walk, {**expect, "dtype": computed_in, "device": stream.device.type})
        return computed_in, fisher_streamed.probe_streamed(stream, blocks, names, sample_rows=sample_rows, seed=seed,
                                                           progress=progress, state=state)
