"""Several processes dividing one stage's work, through the distributed engine PyTorch ships (torch.distributed:
gloo on CPUs, NCCL on GPUs), each process started by torchrun or a launcher that initializes the default group.

A stage hands out its independent pieces of work (a chunk of equal-shape Linears to price, a selection lane, a
calibration block) round-robin by their index in the order the single process visits them (a layer's sibling
groups and routed experts to round, whose costs differ widely, by their estimated cost: `Ranks.deal`), so each
piece is computed exactly as one process computes it (where the kernels are deterministic: every rank also runs
each layer's forward itself); results are gathered to every rank (the same
numbers, bit for bit, as one process), or, where each rank summed over its own pieces (the probe's statistics),
reduced (sums in another order: equal to rounding). Divided walks keep no snapshots (see `Ranks.own`). Without an
initialized group, `Ranks.current()` is one process doing everything.

A run on several processes (`prismq quantize --gpus N`, or under torchrun: `prismq.engine.launch`) is led by
rank 0, which runs the stages, decides what resumes and is the only writer of the work directory and the
checkpoint; the other ranks wait in `serve` and join each divided walk the leader hands out with `run_everywhere`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch
import torch.distributed as dist

from prismq.engine.walkstate import WalkState

T = TypeVar("T")


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

    def deal(self, costs: Sequence[float]) -> list[int]:
        """The rank each piece of work goes to when pieces cost unequally (`costs`, in the single process's order):
        the costliest first, each to the rank with the least work so far (the lowest rank on a tie), so the ranks
        finish together; the same answer on every rank."""
        loads, owners = [0.0] * self.world, [0] * len(costs)
        for piece in sorted(range(len(costs)), key=lambda number: (-costs[number], number)):
            owners[piece] = min(range(self.world), key=lambda rank: (loads[rank], rank))
            loads[owners[piece]] += costs[piece]
        return owners

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
        """A divided walk's snapshots: `state` for one process; none for several (each rank would resume from the
        layer its own last snapshot reached, and ranks killed at different layers would pair their collectives
        wrongly: a divided walk that was interrupted starts again from its first layer). With several, the leader
        removes what `state` holds: a one-process walk interrupted earlier would otherwise resume from it later,
        past layers whose results this walk has replaced."""
        if self.world == 1 or state is None:
            return state
        if self.leader:
            state.clear()
        return None

    def device(self, device: torch.device) -> torch.device:
        """This rank's GPU for a CUDA `device` when several processes share a host (rank r: GPU r modulo the GPUs
        seen); `device` itself otherwise."""
        if self.world == 1 or device.type != "cuda":
            return device
        return torch.device("cuda", self.rank % torch.cuda.device_count())


def run_everywhere(job: Callable[..., T], /, **arguments: Any) -> T:
    """`job(**arguments)` here, and, on the leader of several processes, on every other rank too (they wait in
    `serve`): the way a stage hands out a divided walk. `job` is a module-level function (sent by reference, its
    arguments pickled over the process group: paths, settings, token blocks; never the model) that divides its
    work with `Ranks` and returns every rank the same result."""
    ranks = Ranks.current()
    if ranks.world > 1 and ranks.leader:
        dist.broadcast_object_list([(job, arguments)], src=0)
    return job(**arguments)


def serve() -> None:
    """A non-leader rank's part of a run: each job the leader hands out (`run_everywhere`), until it says stop
    (`stop_serving`)."""
    while True:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0)
        if box[0] is None:
            return
        job, arguments = box[0]
        job(**arguments)


def stop_serving() -> None:
    """On the leader of several processes: let the others' `serve` return (the run is over, or failed)."""
    ranks = Ranks.current()
    if ranks.world > 1 and ranks.leader:
        dist.broadcast_object_list([None], src=0)
