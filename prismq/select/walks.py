"""The selection stage's streamed walks as jobs: each opens the model on its own device and measures, so that on a
run of several processes every rank runs it (`prismq.engine.distributed.run_everywhere`) and takes its share.

L2's re-probe and re-cost under an assignment, L3's flips, and the frontier's whole candidates; each returns every
rank the same result.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import torch

from prismq.engine.distributed import Ranks
from prismq.engine.stream import LayerStream
from prismq.engine.walkstate import WalkState
from prismq.measure.cost import CostRow, measure_costs
from prismq.measure.fisher_streamed import probe_streamed
from prismq.measure.kl import KLResult
from prismq.model.checkpoint import SourceTensors
from prismq.model.source import resolve_device
from prismq.model.targets import model_targets
from prismq.select.measured import Flip, Measured, measure_flips, measure_lanes
from prismq.select.perturbed import QuantizedWeights


def _stream(model_dir: Path, dtype: torch.dtype, device: str, max_memory: int | None) -> LayerStream:
    """The model streamed on this rank's device."""
    return LayerStream(model_dir, dtype, Ranks.current().device(resolve_device(device)), max_memory)


def recost_walk(model_dir: Path, dtype: torch.dtype, device: str, max_memory: int | None,
                assignment: dict[str, str], input_amax: dict[str, torch.Tensor], calibration: torch.Tensor,
                formats: list[str], state: WalkState) -> list[CostRow]:
    """L2's step: the probe re-run with `assignment` installed (activations as it quantizes them) and every
    (unit, format) priced again under those inputs."""
    targets = model_targets(model_dir)
    with _stream(model_dir, dtype, device, max_memory) as stream:
        probed = probe_streamed(QuantizedWeights(stream, assignment, input_amax), calibration,  # type: ignore[arg-type]
                                list(targets), seed=0, state=state)
        with ExitStack() as files:
            return measure_costs(SourceTensors(model_dir, files), probed, targets, formats, stream.device,
                                 dtype=dtype)


def flips_walk(model_dir: Path, dtype: torch.dtype, device: str, max_memory: int | None, base: dict[str, str],
               flips: list[Flip], blocks: torch.Tensor, input_amax: dict[str, torch.Tensor],
               state: WalkState) -> Measured:
    """L3: each flip's KL on `blocks`, paired with the base's (`measure_flips`)."""
    with _stream(model_dir, dtype, device, max_memory) as stream:
        return measure_flips(stream, base, flips, blocks, input_amax, state=state)


def lanes_walk(model_dir: Path, dtype: torch.dtype, device: str, max_memory: int | None,
               assignments: list[dict[str, str]], blocks: torch.Tensor, input_amax: dict[str, torch.Tensor],
               state: WalkState) -> list[KLResult]:
    """The KL of whole assignments on `blocks` (`measure_lanes`)."""
    with _stream(model_dir, dtype, device, max_memory) as stream:
        return measure_lanes(stream, assignments, blocks, input_amax, state=state)
