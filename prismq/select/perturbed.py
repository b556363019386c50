"""L2: the surrogate's costs re-measured under the current assignment (perturbed activations), to a fixed point.

The probe and the cost stage price every (unit, format) on the unquantized model: each Linear's inputs and output
gradients are those of the source. Once most of the model is quantized, a Linear sees other inputs (the rounding
error of every layer before it) and other gradients. L2 installs the current assignment's weights (the codecs'
round-to-nearest bytes) in the streamed layers, probes again (per-token Fisher, input statistics and samples, on a
few calibration blocks), prices every (target, format) on those statistics with the same cost code, and solves the
knapsack again; it repeats until the share of weights whose format changed is below a tolerance, or an assignment
comes back (a cycle: the walk stops there, at the assignment that repeats, rather than oscillate).

Only weights are installed: the probe records each Linear's inputs before any activation quantization, and the
cost code simulates that quantization itself, as on the source.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prismq.engine.stream import LayerStream
from prismq.export.encode import encode_model
from prismq.formats import get_format
from prismq.model.fake_quant import apply_fake_quant

logger = logging.getLogger(__name__)


class QuantizedWeights:
    """A LayerStream whose decoder layers arrive with an assignment's weights already rounded to nearest and
    decoded (activations left as they are); everything else is the stream's own."""

    def __init__(self, stream: LayerStream, assignment: Mapping[str, str],
                 input_amax: Mapping[str, torch.Tensor]) -> None:
        self._stream, self._input_amax = stream, dict(input_amax)
        self._assignment = {n: f for n, f in assignment.items() if get_format(f).scheme() is not None}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def __len__(self) -> int:
        return len(self._stream)

    @contextmanager
    def layer(self, index: int) -> Iterator[nn.Module]:
        """Decoder layer `index` with the assignment's decoded weights in place."""
        stream = self._stream
        with stream.layer(index) as layer:
            modules = stream.layer_names(index, layer)
            part = {n: f for n, f in self._assignment.items() if stream.layer_of(n) == index}
            encoded = encode_model(modules, part, self._input_amax, stream.weight_dtype, stream.targets,
                                   stream.source)
            for handle in apply_fake_quant(modules, part, encoded, stream.weight_dtype, stream.targets):
                handle.remove()  # weights only: the probe records each input before activation quantization
            yield layer


@dataclass
class FixedPoint:
    """The L2 iterations: each assignment solved, the share of weights whose format changed at each step, and
    whether the walk stopped on a repeat (cycle) or a small change."""

    assignments: list[dict[str, str]] = field(default_factory=list)
    changed: list[float] = field(default_factory=list)
    stopped: str = "iterations"


def changed_share(before: Mapping[str, str], after: Mapping[str, str], params: Mapping[str, int]) -> float:
    """The fraction of weights whose format differs between two assignments."""
    total = sum(params[n] for n in before)
    return sum(params[n] for n in before if before[n] != after.get(n)) / max(total, 1)


def fixed_point(start: dict[str, str], step: Callable[[dict[str, str]], dict[str, str]], params: Mapping[str, int],
                tolerance: float, iterations: int) -> FixedPoint:
    """Iterate `step(assignment) -> assignment` from `start` until the changed share is at most `tolerance`, an
    assignment repeats (cycle), or `iterations` steps were taken; the last assignment is the result."""
    result = FixedPoint([start])
    for _ in range(iterations):
        current = result.assignments[-1]
        new = step(current)
        result.changed.append(changed_share(current, new, params))
        repeated = any(new == seen for seen in result.assignments)
        result.assignments.append(new)
        if result.changed[-1] <= tolerance:
            result.stopped = "converged"
            break
        if repeated:
            result.stopped = "cycle"
            break
    logger.info("L2: %d re-costing step(s), %s; weights changed per step: %s", len(result.changed), result.stopped,
                ", ".join(f"{c:.1%}" for c in result.changed))
    return result
