"""Export-time rounding on the embedded default model: round-to-nearest vs GPTQ vs GPTQ + scale sweep.

Why: GPTQ and the sweep only earn their compute if they lower the error of the shipped model. For each format and
rounding this reports (1) the per-Linear output error tr(dW H dW^T) relative to round-to-nearest on the same
calibration inputs, as a geometric mean over the Linears, and (2) the held-out KL of the whole rounded model
(full vocabulary, every position) against the bf16 reference. Calibration and held-out blocks are the ones
`prismq quantize` uses by default (32 x 512 calibration, 16 x 512 held-out, disjoint); static input ranges come
from the same calibration (clipped as the exporter clips them). Each rounded model computes exactly what its
export computes (decoded codec tensors, activations quantized like the runtime).

Run from the repo root:  python benchmarks/rounding_bench.py [--formats NVFP4] [--threads 1] [--no-act-order]
Writes benchmarks/results/rounding.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from prismq.data import text_splits  # noqa: E402
from prismq.measure.kl import evaluate_candidates  # noqa: E402
from prismq.model.linears import linear_shapes, quantizable  # noqa: E402
from prismq.model.source import load_model, load_tokenizer, resolve_model  # noqa: E402
from prismq.rounding.clip import calibrated_input_amax  # noqa: E402
from prismq.rounding.gptq import GPTQSettings  # noqa: E402
from prismq.rounding.sequential import METHODS, round_model  # noqa: E402


def geomean(values: list[float]) -> float:
    """Geometric mean of positive values."""
    return math.exp(sum(math.log(max(v, 1e-30)) for v in values) / len(values)) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", default="NVFP4", help="comma-separated formats, each applied uniformly")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-act-order", action="store_true")
    parser.add_argument("--calib-blocks", type=int, default=32)
    parser.add_argument("--heldout-blocks", type=int, default=16)
    parser.add_argument("--json", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "rounding.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = resolve_model(None)
    splits = text_splits(None, None, None, load_tokenizer(model_dir), args.calib_blocks, 0, args.heldout_blocks, 512)
    calib, heldout = splits.calibration, splits.report
    shapes = linear_shapes(model_dir)
    settings = GPTQSettings(act_order=not args.no_act_order)
    reference = load_model(model_dir)
    rows: list[dict[str, Any]] = []
    for format_name in args.formats.split(","):
        from prismq.formats import get_format

        fmt = get_format(format_name)
        assignment = {n: fmt.name for n, shape in quantizable(shapes).items() if fmt.legal(shape)}
        input_amax = calibrated_input_amax(reference, calib, assignment) if fmt.needs_input_amax else {}
        models, entries = [], []
        for method in args.methods.split(","):
            model = load_model(model_dir)
            start = time.perf_counter()
            rounded = round_model(model, assignment, method, calib, input_amax, settings)
            seconds = time.perf_counter() - start
            ratios = list(rounded.error_ratios().values())
            fallbacks = sum(1 for m, _, _ in rounded.details.values() if m == "rtn")
            entries.append({"format": fmt.name, "method": method, "linears": len(assignment),
                            "mse_ratio_geomean": geomean(ratios) if ratios else 1.0,
                            "rtn_kept": fallbacks, "seconds": round(seconds, 1)})
            models.append(model)
        for entry, result in zip(entries, evaluate_candidates(reference, models, heldout)):
            entry.update({k: v for k, v in result.to_json().items()
                          if k in ("mean_kl", "median_kl", "p99_kl", "same_top1", "ppl_ratio")})
            rows.append(entry)
    print(f"| format | rounding | output-MSE ratio vs RTN (geomean) | held-out mean KL | p99 KL | same top-1 | "
          f"PPL ratio | rounding time (s, {args.threads} thread) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['format']} | {r['method']} | {r['mse_ratio_geomean']:.3f} | {r['mean_kl']:.4f} | "
              f"{r['p99_kl']:.3f} | {r['same_top1']:.2%} | {r['ppl_ratio']:.4f} | {r['seconds']} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"model": str(model_dir), "act_order": settings.act_order,
                                     "damping": list(settings.damping), "block_size": settings.block_size,
                                     "calib_blocks": args.calib_blocks, "heldout_blocks": args.heldout_blocks,
                                     "threads": args.threads, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
