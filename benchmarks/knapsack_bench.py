"""Knapsack speed and optimality gap at scale: 100 000 decision units x 6 formats, one budget and an 18-budget sweep.

Why: allocation must stay interactive for the largest models (a 400B MoE has ~10^5 Linears), and the issue asks for
100 000 units x 6 formats solved in a few seconds on one core. The gap (cost minus the LP lower bound) bounds how far
each solution can be from the optimum.

The problem is synthetic but shaped like the real one: Linear shapes drawn from common LLM dimensions; exact bytes of
MXFP4 (4.25 bits), NVFP4 (4.5 + a 4-byte global scale), MXFP6 (6.25), MXFP8 (8.25), FP8 per-channel (8 + 32/in) and
BF16 (16); predicted delta-loss = per-unit sensitivity (log-normal, 2 decades) x weights x a per-format relative error
x per-option noise (log-normal, sigma 0.3: hulls are not always convex, FP8 and MXFP8 swap order), 3 % of the 4- and
6-bit options not offered (shape not legal), BF16 exact (0) and always offered.

Run from the repo root:  python benchmarks/knapsack_bench.py [--units 100000] [--repeat 3]
numpy runs these sorts and scans on one core.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from prismq.allocate.knapsack import prepare, solve  # noqa: E402
from prismq.allocate.pareto import DEFAULT_BITS, budgets_from_bits, sweep  # noqa: E402

FORMATS = ("MXFP4", "NVFP4", "MXFP6", "MXFP8", "FP8", "BF16")
REL_ERROR = np.array([1.0, 0.6, 0.06, 0.004, 0.005, 0.0])  # relative weight MSE per format, roughly as measured
DIMS = np.array([576, 896, 1536, 2048, 3072, 4096, 5120, 8192, 14336])


def make_problem(units: int, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """cost [units, 6], size [units, 6] (bytes) and the number of weights, as described in the module docstring."""
    rng = np.random.default_rng(seed)
    out_f, in_f = rng.choice(DIMS, units), rng.choice(DIMS, units)
    n = out_f * in_f
    size = np.stack([n // 2 + n // 32, n // 2 + n // 16 + 4, 3 * n // 4 + n // 32, n + n // 32, n + 4 * out_f, 2 * n],
                    axis=1).astype(np.int64)
    sensitivity = 1e-9 * rng.lognormal(0.0, 2.3, units)[:, None] * n[:, None]
    cost = sensitivity * REL_ERROR[None, :] * rng.lognormal(0.0, 0.3, (units, len(FORMATS)))
    cost[:, :3][rng.random((units, 3)) < 0.03] = np.inf
    return cost, size, int(n.sum())


def timed(fn, repeat: int) -> tuple[float, object]:
    """Median wall seconds of `repeat` calls, and the last result."""
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    """Solve one ~5 bits/param budget and the default 18-budget sweep; print and write the timings and gaps."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--bits", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "knapsack_bench.json")
    args = parser.parse_args()

    cost, size, params = make_problem(args.units, args.seed)
    budget = budgets_from_bits([args.bits], params)[0]
    rows = []
    t_prepare, prepared = timed(lambda: prepare(cost, size), args.repeat)
    for label, fn in (("solve (prepare + LP greedy + fill + core)", lambda: solve(cost, size, budget, params)),
                      ("solve on a prepared problem", lambda: prepared.solve(budget, params)),
                      ("LP greedy + fill only (core_units=0)", lambda: prepared.solve(budget, params, core_units=0))):
        seconds, a = timed(fn, args.repeat)
        rows.append({"what": label, "wall_s": seconds, "bits_per_param": 8 * a.size / params, "cost": a.cost,
                     "lower_bound": a.lower_bound, "gap": a.gap, "relative_gap": a.gap / a.cost})
    budgets = budgets_from_bits(DEFAULT_BITS, params)
    t_sweep, points = timed(lambda: sweep(cost, size, budgets, params), args.repeat)
    sweep_rows = [{"budget_bits": p.budget_bits, "bits_per_param": p.bits_per_param, "cost": p.cost, "gap": p.gap,
                   "relative_gap": p.gap / p.cost if p.cost else 0.0} for p in points]
    result = {
        "meta": {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "command": "python " + " ".join(["benchmarks/knapsack_bench.py"] + sys.argv[1:]),
                 "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
                 "numpy": np.__version__, "units": args.units, "formats": list(FORMATS), "params": params,
                 "budget_bytes": budget, "budget_bits": args.bits, "repeat": args.repeat, "timing": "median wall s"},
        "prepare_s": t_prepare,
        "single": rows,
        "sweep": {"budgets": len(budgets), "wall_s": t_sweep,
                  "max_relative_gap": max(r["relative_gap"] for r in sweep_rows), "points": sweep_rows},
    }
    print(f"{args.units} units x {len(FORMATS)} formats, {params:,} weights; budget {args.bits} bits/param")
    print(f"prepare (hull steps, sort): {t_prepare:.3f} s")
    for r in rows:
        print(f"{r['what']}: {r['wall_s']:.3f} s, {r['bits_per_param']:.6f} bits/param, cost {r['cost']:.6g}, "
              f"gap {r['gap']:.3g} (relative {r['relative_gap']:.2e})")
    print(f"sweep of {len(budgets)} budgets: {t_sweep:.3f} s, "
          f"max relative gap {result['sweep']['max_relative_gap']:.2e}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
