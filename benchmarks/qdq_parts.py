"""Where a fused codec qdq's time goes on a GPU: the kernel alone, the weight check, the global scale, the whole call.

Run from the repo root on a CUDA machine:  python benchmarks/qdq_parts.py [--shape 4096x14336]
Prints one row per format (milliseconds, median of 50 synchronized calls) next to a bf16 copy of the same size.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prismq.formats import get_format  # noqa: E402
from prismq.formats.fused import fused_qdq  # noqa: E402


def timed(call: Callable[[], object], reps: int = 50) -> float:
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
    args = parser.parse_args()
    rows, columns = (int(v) for v in args.shape.split("x"))
    weight = torch.randn(rows, columns, device="cuda", dtype=torch.bfloat16) * 0.02
    target = torch.empty_like(weight)
    copy = timed(lambda: target.copy_(weight))
    print(f"{args.shape} on {torch.cuda.get_device_name()}: copy {copy:.3f} ms")
    print("| format | kernel ms | check ms | grid ms | qdq ms | qdq/copy |")
    print("|---|---|---|---|---|---|")
    for name in ("NVFP4", "NVFP4A16", "MXFP4", "MXFP8", "FP8"):
        fmt = get_format(name)
        grid = fmt.grid(weight)
        kernel = timed(lambda: fused_qdq(grid, weight))
        check = timed(lambda: fmt.check(weight, "w", batched=True))
        fit = timed(lambda: fmt.grid(weight))
        whole = timed(lambda: fmt.qdq(weight))
        print(f"| {name} | {kernel:.3f} | {check:.3f} | {fit:.3f} | {whole:.3f} | {whole / copy:.1f}x |")
    amax = {"abs().amax()": lambda: weight.abs().amax(), "aminmax": lambda: weight.aminmax(),
            "vector_norm(inf)": lambda: torch.linalg.vector_norm(weight, float("inf"))}
    print("global absmax: " + ", ".join(f"{n} {timed(f):.3f} ms" for n, f in amax.items()))
    import prismq.formats.fused as fused

    default = fused.GROUPS_PER_PROGRAM
    grids = {name: get_format(name).grid(weight) for name in ("NVFP4", "MXFP8")}
    for groups in (32, 64, 128, 256):  # the tile size of the grouped kernels
        fused.GROUPS_PER_PROGRAM = groups
        times = {name: timed(lambda: fused_qdq(grid, weight)) for name, grid in grids.items()}
        print(f"groups per program {groups}: " + ", ".join(f"{n} {t:.3f} ms" for n, t in times.items()))
    fused.GROUPS_PER_PROGRAM = default


if __name__ == "__main__":
    main()
