"""A run on several processes: one per GPU of this host (`prismq quantize --gpus N`), or those torchrun started.

Rank 0 leads: it runs the stages, decides what resumes and is the only one that writes the work directory and the
checkpoint; the others serve the divided walks it hands out (`prismq.engine.distributed`). GPUs talk through NCCL,
CPU processes (the tests) through gloo. An error the leader raises stops the others and reaches the caller as the
same one-line error.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from prismq.engine.distributed import serve, stop_serving
from prismq.errors import PrismqError
from prismq.model.source import resolve_device

ERRORS = "error-{rank}.txt"  # where a spawned rank leaves its one-line error for the launching process


def run_on_ranks(lead: Callable[[], object], gpus: int, device: str) -> None:
    """`lead()` led by rank 0 of several processes when torchrun started this one or `gpus` > 1 (then spawned
    here, one per GPU), else just `lead()` here. `lead` must pickle (a module-level function or a partial of one)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ:
        _as_rank(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), "env://", lead, device)
        return
    if gpus == 1:
        lead()
        return
    target = resolve_device(device)
    if target.type == "cuda" and torch.cuda.device_count() < gpus:
        raise PrismqError(f"--gpus {gpus}: this host has {torch.cuda.device_count()} CUDA GPU(s)")
    logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)  # its "terminating" notes: ours say why
    with tempfile.TemporaryDirectory(prefix="prismq-ranks-") as scratch:
        try:
            mp.spawn(_spawned, args=(gpus, scratch, lead, device), nprocs=gpus, join=True)
        except mp.ProcessExitedException as exc:
            errors = sorted(Path(scratch).glob(ERRORS.format(rank="*")))  # the leader's first
            if errors:
                raise PrismqError(errors[0].read_text()) from None
            raise PrismqError(f"a process of the run stopped: {exc}") from None


def _spawned(rank: int, world: int, scratch: str, lead: Callable[[], object], device: str) -> None:
    """One spawned process: its rank's part, a PrismqError left in `scratch` for the launcher (exit code 1; the
    launcher then stops the other processes)."""
    try:
        _as_rank(rank, world, f"file://{Path(scratch) / 'rendezvous'}", lead, device)
    except PrismqError as exc:
        (Path(scratch) / ERRORS.format(rank=rank)).write_text(str(exc))
        raise SystemExit(1) from None


def _as_rank(rank: int, world: int, init_method: str, lead: Callable[[], object], device: str) -> None:
    """Join the process group as `rank` of `world` (NCCL on GPUs, this rank's GPU current; gloo on CPUs), then lead
    (rank 0) or serve, and leave the group. A leader that fails does not tell the others to stop (one of them may
    be gone, or inside a walk): its exit makes the launcher (this module's, or torchrun) stop them."""
    cuda = resolve_device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group("nccl" if cuda else "gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        if rank == 0:
            lead()
            stop_serving()
        else:
            logging.getLogger("prismq").setLevel(logging.WARNING)  # the leader reports
            serve()
    finally:
        dist.destroy_process_group()
