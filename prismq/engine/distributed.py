"""Several processes dividing one stage's work, through the distributed engine PyTorch ships (torch.distributed:
gloo on CPUs, NCCL on GPUs), each process started by torchrun or a launcher that initializes the default group.

A stage hands out its independent pieces of work (a chunk of equal-shape Linears to price, a selection lane, a
calibration block) round-robin by their index in the order the single process visits them, so each piece is
computed exactly as one process computes it; results are gathered to every rank (the same numbers, bit for bit,
as one process), or, where each rank summed over its own pieces (the probe's statistics), reduced (sums in another
order: equal to rounding). Each rank keeps its own walk snapshots. Without an initialized group,
`Ranks.current()` is one process doing everything.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist

from prismq.engine.walkstate import WalkState


@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes sharing the work: its rank and how many there are."""

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> Ranks:
        """The default process group's rank and size when one is initialized, else a single process."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    def mine(self, index: int) -> bool:
        """Whether piece `index` of a stage's work (counted in the single process's order) is this rank's."""
        return index % self.world == self.rank

    @property
    def leader(self) -> bool:
        """The rank that reports progress and writes artifacts."""
        return self.rank == 0

    def gather(self, results: Mapping[Any, Any]) -> dict[Any, Any]:
        """Every rank's results (keyed by piece; keys disjoint between ranks) merged, on every rank."""
        if self.world == 1:
            return dict(results)
        everyone: list[Any] = [None] * self.world
        dist.all_gather_object(everyone, dict(results))
        merged: dict[Any, Any] = {}
        for part in everyone:
            merged.update(part)
        return merged

    def reduce_(self, tensor: torch.Tensor, how: Literal["sum", "max"]) -> torch.Tensor:
        """`tensor` replaced, on every rank, by the elementwise sum or maximum over the ranks (sent as float64 or
        float32 and cast back: exact for the values a walk keeps, which are that wide or narrower)."""
        if self.world == 1:
            return tensor
        wide = tensor.to(torch.float64 if tensor.dtype in (torch.float64, torch.int64) else torch.float32)
        dist.all_reduce(wide, op=dist.ReduceOp.SUM if how == "sum" else dist.ReduceOp.MAX)
        tensor.copy_(wide.to(tensor.dtype))
        return tensor

    def everyone(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's `tensor` (equal shapes), in rank order, on every rank."""
        if self.world == 1:
            return [tensor]
        wide = tensor.to(torch.float64 if tensor.dtype == torch.float64 else torch.float32).contiguous()
        parts = [torch.empty_like(wide) for _ in range(self.world)]
        dist.all_gather(parts, wide)
        return [part.to(tensor.dtype) for part in parts]

    def own(self, state: WalkState | None) -> WalkState | None:
        """This rank's snapshots beside a walk's `state` (WORK/x.walk -> WORK/x-rank1.walk, so what clears
        WORK/x*.walk clears them all); the state itself for one process."""
        if state is None or self.world == 1:
            return state
        where = state.directory
        return WalkState(where.with_name(f"{where.stem}-rank{self.rank}{where.suffix}"), state.expect)
