"""Which dtype the arithmetic runs in (forwards, backwards, KL), separately from the dtype weights are stored in.

Weights always reach the codecs in the checkpoint's own dtype, so the quantized bytes never depend on the compute
dtype. The compute dtype only changes the arithmetic: bf16 where the hardware multiplies bf16 natively (GPUs, CPUs
with AVX512-BF16 / AMX / the Arm BF16 extension), float32 elsewhere, because PyTorch's bf16 matmul on an AVX2-only
CPU runs 5-60x slower than its float32 one (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import functools
import platform
import time
from pathlib import Path
from typing import get_args

import torch

from prismq.config import ComputeSetting

# x86 /proc/cpuinfo flags (and the Arm "Features" entry) that mean a native bf16 dot product.
_NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}


def _cpuinfo_flags() -> set[str] | None:
    """The CPU feature flags Linux reports, or None where /proc/cpuinfo is not readable (macOS, Windows)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return flags or None


def _bf16_matmul_is_fast() -> bool:
    """Time one small matmul in both dtypes: bf16 counts as native when it is at least half as fast as float32."""
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    timings = []
    for dtype in (torch.float32, torch.bfloat16):
        x, y = a.to(dtype), b.to(dtype)
        x @ y  # warm-up
        start = time.perf_counter()
        for _ in range(8):
            x @ y
        timings.append(time.perf_counter() - start)
    return timings[1] <= 2 * timings[0]


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively: its feature flags where the OS lists them (AVX512-BF16 / AMX on
    x86, BF16 on Arm), otherwise a one-time timing of a small matmul in both dtypes."""
    flags = _cpuinfo_flags()
    if flags is not None:
        return bool(flags & _NATIVE_BF16_FLAGS)
    return _bf16_matmul_is_fast()


def cpu_description() -> str:
    """The CPU's model name and whether it has native bf16, for reports and benchmark tables."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.lower().startswith("model name"):
                name = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    return f"{name} ({'native bf16' if cpu_has_native_bf16() else 'no native bf16'})"


def device_description(device: torch.device) -> str:
    """What a run computed on, for reports: the CPU model (and its bf16 support) or the GPU's name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_description() if device.type == "cpu" else str(device)


def resolve_compute_dtype(setting: str, device: torch.device, weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype to compute in for `setting` (auto | bf16 | fp32) on `device`, for weights stored as `weight_dtype`.

    auto: the checkpoint's own dtype where the device multiplies it natively (any GPU; a CPU with native bf16 for
    a bf16 checkpoint), float32 otherwise (and always for a float32 checkpoint)."""
    if setting == "bf16":
        return torch.bfloat16
    if setting == "fp32" or weight_dtype == torch.float32:
        return torch.float32
    if setting != "auto":
        raise ValueError(f"unknown compute dtype {setting!r} (choose from {', '.join(get_args(ComputeSetting))})")
    if device.type != "cpu":
        return weight_dtype
    return weight_dtype if weight_dtype == torch.bfloat16 and cpu_has_native_bf16() else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """A dtype as reports write it: bfloat16, float32, ..."""
    return str(dtype).removeprefix("torch.")
