"""Memory on the compute device and in the process: what is free, handing freed memory back, sizes for people."""

from __future__ import annotations

import ctypes
import sys

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
