"""A run on several processes: one per GPU of this host (`prismq quantize --gpus N`), or those torchrun started.

Rank 0 leads: it runs the stages, decides what resumes and is the only one that writes the work directory and the
checkpoint; the others serve the divided walks it hands out (`prismq.engine.distributed`). Collectives go through
NCCL between GPUs and gloo for what lives on the CPU (and between CPU processes: the tests). An error a rank
raises stops the others and reaches the caller as the same one-line error.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

from prismq.engine.distributed import serve, stop_serving
from prismq.errors import PrismqError
from prismq.model.source import resolve_device

ERRORS = "error-{rank}.txt"  # where a spawned rank leaves its one-line error for the launching process


def run_on_ranks(lead: Callable[[], object], gpus: int, device: str,
                 show_messages: Callable[[], None] | None = None) -> None:
    """`lead()` led by rank 0 of several processes when torchrun started this one or `gpus` > 1 (then spawned
    here, one per GPU; several CPU processes only with `device` "cpu"), else just `lead()` here. `lead` must pickle
    (a module-level function or a partial of one); `show_messages` sets up a spawned process's log output as the
    caller's is."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ:
        _as_rank(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), "env://", lead, device, None)
        return
    if gpus == 1:
        lead()
        return
    if device != "cpu" and torch.cuda.device_count() < gpus:
        raise PrismqError(f"--gpus {gpus}: this host has {torch.cuda.device_count()} CUDA GPU(s)")
    with tempfile.TemporaryDirectory(prefix="prismq-ranks-") as scratch, _quiet("torch.multiprocessing.spawn"):
        try:
            mp.spawn(_spawned, args=(gpus, scratch, lead, device, show_messages), nprocs=gpus, join=True)
        except ProcessException as exc:  # our error files say why; torch's message is the fallback
            errors = sorted(Path(scratch).glob(ERRORS.format(rank="*")))  # the leader's first
            if errors:
                raise PrismqError(errors[0].read_text()) from None
            lines = str(exc).strip().splitlines()  # a raised exception's traceback, or "process N terminated ..."
            raise PrismqError(f"process {exc.error_index} of the run failed: {lines[-1] if lines else exc}") from None


def _spawned(rank: int, world: int, scratch: str, lead: Callable[[], object], device: str,
             show_messages: Callable[[], None] | None) -> None:
    """One spawned process: its rank's part; a PrismqError is left in `scratch` for the launcher (exit code 1;
    the launcher then stops the other processes)."""
    if show_messages is not None:
        show_messages()
    try:
        _as_rank(rank, world, f"file://{Path(scratch) / 'rendezvous'}", lead, device, Path(scratch))
    except PrismqError:
        raise SystemExit(1) from None


def _as_rank(rank: int, world: int, init_method: str, lead: Callable[[], object], device: str,
             errors: Path | None) -> None:
    """Join the process group as `rank` of `world`, then lead (rank 0) or serve, and leave the group. A PrismqError
    is written to `errors` (when given) before the group is left, so the launcher finds it whichever process it
    hears of first. A leader that fails does not tell the others to stop (one of them may be gone, or inside a
    walk): its exit makes the launcher (this module's, or torchrun) stop them."""
    cuda = device != "cpu" and resolve_device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(rank % torch.cuda.device_count())
    # NCCL for what lives on the GPUs, gloo for the CPU scalars and objects the walks combine
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", init_method=init_method, rank=rank,
                            world_size=world)
    try:
        if rank == 0:
            lead()
            stop_serving()
        else:
            with _quiet("prismq", logging.WARNING):  # the leader reports
                serve()
    except PrismqError as exc:
        if errors is not None:
            partial = errors / f".{ERRORS.format(rank=rank)}.partial"
            partial.write_text(str(exc))
            os.replace(partial, errors / ERRORS.format(rank=rank))
        raise
    finally:
        dist.destroy_process_group()


@contextmanager
def _quiet(name: str, level: int = logging.ERROR) -> Iterator[None]:
    """Logger `name` at `level` for the duration (its notes say less than ours, or another rank says them)."""
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)
