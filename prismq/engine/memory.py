"""Memory on the compute device and in the process: what is free, handing freed memory back, sizes for people."""

from __future__ import annotations

import ctypes
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def size_text(nbytes: int) -> str:
    """A byte count for people: GB from 1 GB up, MB below."""
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 10**9 else f"{nbytes / 1e6:.1f} MB"


def release_freed_memory() -> None:
    """Hand memory the process has freed back to the system (glibc keeps freed medium-size blocks in its heap, so
    a walk's resident size would creep up layer by layer). No-op where the C library has no malloc_trim."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc (it has malloc_trim), else None."""
    if sys.platform != "linux":
        return None
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # pragma: no cover - a Linux without a loadable C library
        return None


_LIBC = _glibc()


def available_memory(device: torch.device) -> int:
    """Bytes free on `device` now: the GPU's free memory, or the host's available memory."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)


class StageLog:
    """Wall seconds and peak memory of each stage of a run (report.md shows where its time and memory went).

    Peak host memory is the process's resident high-water mark during the stage (Linux resets it at the stage's
    start through /proc/self/clear_refs; elsewhere it is the peak since the process started); peak accelerator
    memory is torch's allocated high-water mark on CUDA."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.peak_host: dict[str, int] = {}
        self.peak_gpu: dict[str, int] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Measure the enclosed block as stage `name` (added to what an earlier block of that name measured)."""
        _reset_host_peak()
        gpu = torch.cuda.is_available() and torch.cuda.is_initialized()
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started
            self.peak_host[name] = max(self.peak_host.get(name, 0), _host_peak())
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                self.peak_gpu[name] = max(self.peak_gpu.get(name, 0), int(torch.cuda.max_memory_allocated()))


def _reset_host_peak() -> None:
    """Start the resident high-water mark afresh (Linux; a no-op where /proc/self/clear_refs is not writable)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def _host_peak() -> int:
    """The process's resident high-water mark in bytes (VmHWM; ru_maxrss where /proc is not there)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, kilobytes on Linux
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale
