"""Where a fused codec qdq's time goes on a GPU: the kernel's own bandwidth against a copy's, and the whole call.

Why: the GPU-speed issue asks for codec qdq at >= 50 % of the device's copy bandwidth. A kernel's bandwidth is read
from device time (CUDA events around back-to-back launches, as for the copy); a lone `Format.qdq` call adds what a
copy does not: Python dispatch, Triton's launch, the wait for the non-finite flag (one host sync per call), and for
NVFP4 without given maxima a pass for the global absmax. Both are printed, side by side with a bf16 copy, and so is
the device time of every kernel the shipped call launches (the profiler's kernel records: the non-finite check, the
flag's zeroing and NVFP4's absmax pass included; host waits excluded), checked against CUDA events on the unchecked
kernel alone.

Run from the repo root on a CUDA machine:  python benchmarks/qdq_parts.py [--shape 4096x14336] [--json PATH]
Prints a markdown table (milliseconds) and writes benchmarks/results/qdq_parts.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from prismq.formats import get_format  # noqa: E402
from prismq.formats.fused import fused_qdq  # noqa: E402

FORMATS = ("NVFP4", "MXFP4", "MXFP8", "FP8")


def device_ms(call: Callable[[], object], reps: int = 200) -> float:
    """Device milliseconds per call of `reps` back-to-back calls (CUDA events; 10 warmup calls)."""
    for _ in range(10):
        call()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        call()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def kernels_ms(call: Callable[[], object], reps: int = 50) -> float:
    """Device milliseconds per call of every CUDA kernel `call` launches (the profiler's kernel records; 5 warmup
    calls): the device's share of a call that waits for the host between calls, which CUDA events cannot isolate."""
    for _ in range(5):
        call()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        for _ in range(reps):
            call()
        torch.cuda.synchronize()
    kernels = [e for e in profile.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.time_range.elapsed_us() for e in kernels) / 1000 / reps


def wall_ms(call: Callable[[], object], reps: int = 50) -> float:
    """Median milliseconds of `reps` synchronized calls after 5 warmup calls."""
    for _ in range(5):
        call()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        call()
        torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="4096x14336")
    parser.add_argument("--json", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "qdq_parts.json")
    args = parser.parse_args()
    rows, columns = (int(v) for v in args.shape.split("x"))
    weight = torch.randn(rows, columns, device="cuda", dtype=torch.bfloat16) * 0.02
    target = torch.empty_like(weight)
    copy_device, copy_wall = device_ms(lambda: target.copy_(weight)), wall_ms(lambda: target.copy_(weight))
    gbs = 2 * weight.numel() * weight.element_size() / copy_device / 1e6
    print(f"{args.shape} bf16 on {torch.cuda.get_device_name()}, torch {torch.__version__}: copy {copy_device:.4f} ms "
          f"device ({gbs:.0f} GB/s read + write), {copy_wall:.4f} ms per synchronized call")
    print("| format | kernel ms (device; no non-finite check) | kernel share of copy bandwidth | same, profiler ms | "
          "shipped qdq kernels ms (profiler; check included) | their share | qdq ms (a synchronized call) | "
          "call share | qdq given the global scale ms | its share |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    results = {"shape": args.shape, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "copy_device_ms": copy_device, "copy_wall_ms": copy_wall, "formats": {}}
    for name in FORMATS:
        fmt = get_format(name)
        grid = fmt.grid(weight)
        kernel = device_ms(lambda: fused_qdq(grid, weight, check_finite=False))
        kernel_profiled = kernels_ms(lambda: fused_qdq(grid, weight, check_finite=False))
        shipped = kernels_ms(lambda: fmt.qdq(weight))
        whole = wall_ms(lambda: fmt.qdq(weight))
        amax = weight.abs().amax() if name == "NVFP4" else None
        given = wall_ms(lambda: fmt.qdq(weight, shared_amax=amax)) if amax is not None else None
        results["formats"][name] = {"kernel_device_ms": kernel, "kernel_profiled_ms": kernel_profiled,
                                    "shipped_kernels_device_ms": shipped, "qdq_wall_ms": whole,
                                    "qdq_given_amax_wall_ms": given}
        given_cells = f"{given:.4f} | {copy_wall / given:.0%}" if given is not None else "- | -"
        print(f"| {name} | {kernel:.4f} | {copy_device / kernel:.0%} | {kernel_profiled:.4f} | {shipped:.4f} | "
              f"{copy_device / shipped:.0%} | {whole:.4f} | {copy_wall / whole:.0%} | "
              f"{given_cells} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
