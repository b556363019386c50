"""The GPU-speed issue's bars, measured side by side in one run on one GPU, each against its threshold.

Why: the issue asks for one run that reports every bar together: codec qdq at >= 50 % of the device's copy
bandwidth (NVFP4, MXFP4, MXFP8, FP8 at 4096x14336), GPTQ with the sweep within 3x its Cholesky + matmul floor
(4096x4096 and 4096x14336 Linears), an 8B-shaped synthetic model through `prismq quantize --target-bits 4.75`
(default settings, selection included) under 10 minutes (a slice of 2 and 4 layers, scaled per layer), a
SmolLM2-shaped one under 60 s, and llm-compressor's GPTQ to uniform NVFP4 on the same slices beside it. It runs the
repository's own benchmarks one after the other (`qdq_parts.py`, `gptq_bench.py`, `gpu_quantize.py`: the SmolLM2
shape first, which also compiles the Triton kernels the 8B slices then find ready), reads their JSON and prints one
table.

Run from the repo root on a CUDA machine:
    python benchmarks/gpu_speed.py [--tokenizer DIR] [--llmcompressor SITE] [--out DIR]
Writes DIR/*.json (each benchmark's own, default benchmarks/results/gpu_speed/) and DIR/gpu_speed.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
FORMATS = ("NVFP4", "MXFP4", "MXFP8", "FP8")


def run(script: str, *arguments: str) -> None:
    """One of the repository's benchmarks in a fresh process, its output shown as it comes."""
    command = [sys.executable, str(REPO_ROOT / "benchmarks" / script), *arguments]
    print(f"$ {' '.join(command[1:])}", flush=True)
    subprocess.run(command, check=True, cwd=REPO_ROOT)


def bars(out: Path, llmcompressor: bool) -> list[dict]:
    """Each bar of the issue with its measured value and whether it is met, from the benchmarks' JSON in `out`."""
    rows = []
    qdq = json.loads((out / "qdq_parts.json").read_text())
    for name in FORMATS:
        share = qdq["copy_device_ms"] / qdq["formats"][name]["kernel_device_ms"]
        rows.append({"bar": f"{name} qdq kernel, share of copy bandwidth ({qdq['shape']}, device time, no non-finite "
                     "check)", "value": f"{share:.0%}", "target": ">= 50 %", "met": share >= 0.5})
        shipped = qdq["copy_device_ms"] / qdq["formats"][name]["shipped_kernels_device_ms"]
        rows.append({"bar": f"{name} shipped qdq (every kernel `Format.qdq` launches, non-finite check included), "
                     "share of copy bandwidth (device time, profiler)", "value": f"{shipped:.0%}",
                     "target": ">= 50 %", "met": shipped >= 0.5})
    for row in json.loads((out / "gptq_bench.json").read_text())["rows"]:
        method = "GPTQ + sweep" if row["sweep"] else "GPTQ"
        rows.append({"bar": f"{method} {row['format']} {row['shape']}, ratio to its floor",
                     "value": f"{row['ratio_to_floor']:.1f}x", "target": "<= 3x", "met": row["ratio_to_floor"] <= 3})
    smol = json.loads((out / "gpu_quantize_smollm2.json").read_text())["rows"][0]
    rows.append({"bar": "SmolLM2-shaped `quantize --target-bits 4.75`, wall seconds", "value": f"{smol['seconds']}",
                 "target": "< 60", "met": smol["seconds"] < 60})
    eight = json.loads((out / "gpu_quantize_8b.json").read_text())
    scaled = eight["scaled_to_full_depth_seconds"]
    rows.append({"bar": "8B-shaped `quantize --target-bits 4.75`, 32 layers scaled from 2 and 4, seconds",
                 "value": f"{scaled:.0f}", "target": "< 600", "met": scaled < 600})
    if llmcompressor:
        for row in eight["rows"]:
            theirs = row["llmcompressor_gptq"]["seconds"]
            for key, label in (("seconds", "prismq default"), ("uniform", "prismq --uniform NVFP4 --rounding gptq")):
                ours = row["seconds"] if key == "seconds" else row["prismq_uniform_nvfp4_gptq"]["seconds"]
                rows.append({"bar": f"llm-compressor GPTQ (uniform NVFP4) / {label}, {row['layers']} layers",
                             "value": f"{theirs / ours:.2f}x", "target": "stated", "met": True})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", type=Path, help="directory with the tokenizer (default: the embedded model's)")
    parser.add_argument("--llmcompressor", type=Path, metavar="SITE",
                        help="time llm-compressor's GPTQ beside the 8B slices, importable from SITE")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "gpu_speed")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = ["--tokenizer", str(args.tokenizer)] if args.tokenizer else []
    run("qdq_parts.py", "--json", str(out / "qdq_parts.json"))
    run("gptq_bench.py", "--device", "cuda", "--formats", ",".join(FORMATS), "--act-order", "true", "--sweep",
        "true", "--repeats", "1", "--json", str(out / "gptq_bench.json"))
    run("gpu_quantize.py", "--shape", "smollm2", *tokenizer, "--json", str(out / "gpu_quantize_smollm2.json"))
    run("gpu_quantize.py", "--shape", "8b", "--layers", "2,4", *tokenizer, "--json", str(out / "gpu_quantize_8b.json"),
        *(["--llmcompressor", str(args.llmcompressor)] if args.llmcompressor else []))
    rows = bars(out, args.llmcompressor is not None)
    print("\n| bar | measured | target | met |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['bar']} | {row['value']} | {row['target']} | {'yes' if row['met'] else 'NO'} |")
    (out / "gpu_speed.json").write_text(json.dumps({"bars": rows, "all_met": all(r["met"] for r in rows)},
                                                   indent=1) + "\n")


if __name__ == "__main__":
    main()
