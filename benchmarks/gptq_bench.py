"""GPTQ speed on large Linears (GPU): the whole rounding against the floor of its dense linear algebra.

Why: GPTQ runs once per Linear at export; on a 400B model that is thousands of Linears, so its cost must stay
close to what the math needs. The floor is the Cholesky factorization, the inverse and the second Cholesky of H
plus the lazy block updates W[:, end:] -= E @ U[block, end:] (the matmuls), timed alone on the same shapes; the
rest is the column loop (one column rounded on the format's grid and its error pushed onto its block) and, with the
sweep, the per-group scale search. Weights and inputs are random (bf16 weights, H = X^T X of 8192 random tokens
with correlated columns); timing is independent of the values. One damping value per run (the exporter tries each
value of its damping list, so its time is this times that list's length).

On a GPU the column loop is one fused kernel per block where it serves (activation order, the default, on the
NVFP4 / MX / FP8 grids); `--torch-loop` times the torch loop instead, the reference.

Run from the repo root:  python benchmarks/gptq_bench.py [--device cuda] [--shapes 4096x4096,4096x14336]
Writes benchmarks/results/gptq_bench.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import prismq.rounding.gptq as gptq_module  # noqa: E402
from prismq.formats import get_format  # noqa: E402
from prismq.rounding.gptq import GPTQSettings, gptq  # noqa: E402
from prismq.rounding.gptq_fused import fused_steps  # noqa: E402


def timed(fn: Callable[[], object], device: str, repeats: int = 3) -> float:
    """Median wall seconds of fn() over `repeats` runs after one warm-up, synchronizing the GPU."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def linear_algebra_floor(hessian: torch.Tensor, weight: torch.Tensor, block: int) -> float:
    """The Cholesky, inverse, upper Cholesky and the block-update matmuls GPTQ cannot avoid, in one function."""
    columns = hessian.shape[0]
    damped = hessian + 0.01 * hessian.diagonal().mean() * torch.eye(columns, device=hessian.device)
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
    work = weight.float()
    errors = torch.randn(weight.shape[0], block, device=weight.device)
    for start in range(0, columns, block):
        end = min(start + block, columns)
        work[:, end:] -= errors[:, : end - start] @ upper[start:end, end:]
    return float(work[0, 0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", default="4096x4096,4096x14336", help="OUTxIN, comma-separated")
    parser.add_argument("--formats", default="NVFP4,MXFP4,INT4_W4A16,FP8")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--act-order", default="false,true", help="activation order values to time, comma-separated")
    parser.add_argument("--sweep", default="false,true", help="scale sweep values to time, comma-separated")
    parser.add_argument("--torch-loop", action="store_true",
                        help="run the column loop in torch even where the fused GPU kernel serves (the reference)")
    parser.add_argument("--json", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "gptq_bench.json")
    args = parser.parse_args()
    device = args.device
    if args.torch_loop:
        gptq_module.fused_steps = lambda *unused: None
    flags = {name: [value == "true" for value in getattr(args, name).split(",")] for name in ("act_order", "sweep")}
    g = torch.Generator(device="cpu").manual_seed(0)
    rows = []
    for spec in args.shapes.split(","):
        out, columns = (int(v) for v in spec.split("x"))
        weight = (torch.randn(out, columns, generator=g) * 0.02).to(torch.bfloat16).to(device)
        x = torch.randn(8192, columns, generator=g).to(device)
        x = x + 0.5 * x.roll(1, dims=1)  # neighbouring columns correlated
        hessian = x.T @ x
        del x
        floor = timed(lambda: linear_algebra_floor(hessian, weight, 128), device, args.repeats)
        for name in args.formats.split(","):
            fmt = get_format(name)
            grid = fmt.grid(weight)  # the fused loop serves scales fixed before the loop: activation order, or groups
            # wider than GPTQ's 128-column block (FP8 per channel)
            fused = not args.torch_loop and fused_steps(grid, grid.fit(weight), weight) is not None
            for act_order in flags["act_order"]:
                for sweep in flags["sweep"]:
                    settings = GPTQSettings(act_order=act_order, damping=(0.01,), sweep=sweep)
                    result = {}

                    def run() -> None:
                        result["r"] = gptq(fmt.grid(weight), weight, hessian, settings)

                    seconds = timed(run, device, args.repeats)
                    rounded = result["r"]
                    rows.append({"shape": spec, "format": fmt.name, "act_order": act_order, "sweep": sweep,
                                 "loop": "fused" if fused and (act_order or 128 % grid.group_size) else "torch",
                                 "seconds": seconds, "floor_seconds": floor, "ratio_to_floor": seconds / floor,
                                 "output_error_vs_rtn": rounded.error / rounded.rtn_error, "method": rounded.method})
                    print(f"{spec} {fmt.name} act_order={act_order} sweep={sweep}: {seconds:.3f} s "
                          f"(floor {floor:.3f} s), error vs RTN {rounded.error / rounded.rtn_error:.3f}", flush=True)
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"\n| shape (out x in) | format | act order | sweep | column loop | GPTQ s | Cholesky + matmuls s | ratio | "
          f"output error vs RTN |  ({device_name}, torch {torch.__version__})")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['format']} | {r['act_order']} | {r['sweep']} | {r['loop']} | {r['seconds']:.3f} | "
              f"{r['floor_seconds']:.3f} | {r['ratio_to_floor']:.1f}x | {r['output_error_vs_rtn']:.3f} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"device": device_name, "torch": torch.__version__, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
