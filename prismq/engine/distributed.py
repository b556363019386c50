"""Several processes dividing one stage's work, through the distributed engine PyTorch ships (torch.distributed:
gloo on CPUs, NCCL on GPUs), each process started by torchrun or a launcher that initializes the default group.

A stage hands out its independent pieces of work (a chunk of equal-shape Linears to price, say) round-robin by
their index in the order the single process visits them, so each piece is computed exactly as one process computes
it, and the results are gathered to every rank: the same numbers, bit for bit, as one process. Without an
initialized group, `Ranks.current()` is one process doing everything.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist


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
