"""Held-out KL of allocated (mixed-precision) checkpoints vs achieved bits per parameter, against uniform baselines.

Why: the point of allocation is a lower KL than a uniform format at the same size; this measures it on the real
default model with calibration and held-out text disjoint (WikiText-2 valid for calibration, test held out).
Each target runs `prismq quantize --formats NVFP4,MXFP8,BF16 --target-bits B` over one shared work directory (the
probe and costs are measured once), exports, and evaluates the checkpoint loaded through transformers +
compressed-tensors; the same pass evaluates the uniform formats that fit in the same bytes.

Run from the repo root:  python benchmarks/allocation_sweep.py [--targets 4.5,4.75,5.0,5.5,6.0,8.25] [--threads 1]
Writes benchmarks/results/allocation_sweep.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from prismq.config import QuantizeConfig  # noqa: E402
from prismq.pipeline import quantize  # noqa: E402

DATA = REPO_ROOT.parent / "shared" / "data"


def main() -> None:
    """Run every target, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="4.5,4.75,5.0,5.5,6.0,8.25")
    parser.add_argument("--formats", default="NVFP4,MXFP8,BF16")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "allocation_sweep.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch) / "work"
        for target in [float(t) for t in args.targets.split(",")]:
            started = time.perf_counter()
            config = QuantizeConfig(formats=args.formats, target_bits=target, out=Path(scratch) / f"q{target}",
                                    work_dir=work, calib=str(DATA / "wikitext-2-valid-tokenized.txt"),
                                    heldout=str(DATA / "wikitext-2-raw-test.txt"), device=args.device)
            try:
                quantize(config)
            except Exception as exc:  # a target below the feasible minimum is a result too
                rows.append({"target": target, "error": str(exc)})
                continue
            summary = json.loads((work / "summary.json").read_text())
            baselines = summary["uniform_baselines"]
            rows.append({"target": target, "bits_per_param": summary["bits_per_param"],
                         "checkpoint_gb": summary["checkpoint_bytes"] / 1e9, "mean_kl": summary["eval"]["mean_kl"],
                         "p999_kl": summary["eval"]["p999_kl"], "same_top1": summary["eval"]["same_top1"],
                         "ppl_ratio": summary["eval"]["ppl_ratio"],
                         "formats": {f: list(summary["assignment"].values()).count(f) for f in summary["per_format"]},
                         "uniform": {name: b["mean_kl"] for name, b in baselines.items()},
                         "seconds": time.perf_counter() - started})
    print("| target | achieved bpp | checkpoint GB | mean KL | p99.9 | same top-1 | PPL ratio | formats | "
          "uniform that fit (mean KL) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['target']} | - | - | - | - | - | - | {r['error']} | |")
            continue
        uniform = ", ".join(f"{k} {v:.4f}" for k, v in r["uniform"].items() if k != "BF16") or "none"
        formats = ", ".join(f"{k} x{v}" for k, v in r["formats"].items())
        print(f"| {r['target']} | {r['bits_per_param']:.3f} | {r['checkpoint_gb']:.4f} | {r['mean_kl']:.4f} | "
              f"{r['p999_kl']:.3f} | {r['same_top1']:.2%} | {r['ppl_ratio']:.4f} | {formats} | {uniform} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": " ".join(["python", "benchmarks/allocation_sweep.py", *sys.argv[1:]]),
                                    "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
