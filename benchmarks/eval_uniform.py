"""Uniform baselines on the embedded default model: export each format, then `prismq eval` it on WikiText-2 test.

Why: every mixed-precision result must beat the best uniform format of the same size, so these are the numbers to
beat; they also show what each format's design choices (activation quantization, group size, scale type) cost on
a real model. For each format: `prismq.pipeline.quantize` with `uniform=FORMAT` (input ranges calibrated on the
default text where the format ships a static input scale) into a temporary directory, then the eval path of the
CLI (checkpoint loaded through transformers + compressed-tensors) on consecutive blocks from the start of the text.

Run from the repo root:  python benchmarks/eval_uniform.py [--blocks 16] [--seqlen 512] [--threads 1]
Writes benchmarks/results/eval_uniform.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from prismq import __version__  # noqa: E402
from prismq.config import QuantizeConfig  # noqa: E402
from prismq.data import consecutive_blocks, read_text  # noqa: E402
from prismq.measure.evaluate import load_quantized  # noqa: E402
from prismq.measure.kl import evaluate_kl  # noqa: E402
from prismq.model.source import load_model, load_tokenizer, resolve_model  # noqa: E402
from prismq.pipeline import quantize  # noqa: E402

FORMATS = ["NVFP4", "NVFP4A16", "MXFP4", "MXFP8", "FP8", "INT4_W4A16", "INT8_W8A16"]
TEXT = REPO_ROOT.parent / "shared" / "data" / "wikitext-2-raw-test.txt"


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, or the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def run_format(name: str, ref_model: torch.nn.Module, model_dir: Path, blocks: torch.Tensor, work: Path,
               device: str) -> dict[str, Any]:
    """Export one uniform checkpoint, evaluate it against the reference, return the row (timings included)."""
    started = time.perf_counter()
    # one shared work dir: the probe (which also calibrates NVFP4 input scales) runs once for all formats; the
    # pipeline's own held-out eval is kept small, the table's numbers come from the evaluation below
    export = quantize(QuantizeConfig(uniform=name, out=work / name, work_dir=work / "shared.work", heldout_blocks=2,
                                     device=device)).export
    assert export is not None
    export_s = time.perf_counter() - started
    started = time.perf_counter()
    model = load_quantized(str(export.path), model_dir, device, progress=False)
    load_s = time.perf_counter() - started
    started = time.perf_counter()
    result = evaluate_kl(ref_model, model, blocks)
    eval_s = time.perf_counter() - started
    del model
    return {"format": name, "bits_per_param": export.linear_bits_per_param,
            "checkpoint_gb": export.checkpoint_bytes / 1e9, **result.to_json(), "export_s": export_s,
            "load_s": load_s, "eval_s": eval_s, "peak_rss_mb": peak_rss_mb()}


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table of the results."""
    lines = ["| format     |   bpp | mean KLD | median KLD | p99 KLD | p99.9 KLD | max KLD | same top-1 | PPL ratio "
             "| export s | eval s |",
             "|------------|-------|----------|------------|---------|-----------|---------|------------|-----------"
             "|----------|--------|"]
    for r in rows:
        lines.append(f"| {r['format']:<10} | {r['bits_per_param']:5.3f} | {r['mean_kl']:8.4f} | {r['median_kl']:10.4f} "
                     f"| {r['p99_kl']:7.3f} | {r['p999_kl']:9.3f} | {r['max_kl']:7.2f} | {100 * r['same_top1']:8.2f} % "
                     f"| {r['ppl_ratio']:9.4f} | {r['export_s']:8.1f} | {r['eval_s']:6.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse flags, run every format, print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--formats", nargs="+", default=FORMATS, help="formats to export and evaluate")
    parser.add_argument("--text", type=Path, default=TEXT, help="text evaluated from its start (WikiText-2 test)")
    parser.add_argument("--blocks", type=int, default=16, help="consecutive blocks (default 16)")
    parser.add_argument("--seqlen", type=int, default=512, help="tokens per block (default 512)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, help="CPU intra-op threads (default: torch's own choice)")
    parser.add_argument("--json", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "eval_uniform.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.text.is_file():
        sys.exit(f"text not found: {args.text}")

    started = time.perf_counter()
    model_dir = resolve_model(None)
    blocks = consecutive_blocks(load_tokenizer(model_dir), read_text(str(args.text)), args.blocks, args.seqlen)
    ref_model = load_model(model_dir, device=args.device)
    rows = []
    with tempfile.TemporaryDirectory(prefix="prismq-eval-uniform-") as tmp:
        for name in args.formats:
            rows.append(run_format(name, ref_model, model_dir, blocks, Path(tmp), args.device))
            print(f"{name}: mean KLD {rows[-1]['mean_kl']:.4f}, same top-1 {100 * rows[-1]['same_top1']:.2f} %, "
                  f"export {rows[-1]['export_s']:.1f} s, eval {rows[-1]['eval_s']:.1f} s", flush=True)
    total_s = time.perf_counter() - started

    device = torch.cuda.get_device_name() if args.device == "cuda" else cpu_name()
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"), "device": device,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "prismq": __version__, "model": str(model_dir), "text": args.text.name, "blocks": args.blocks,
            "seqlen": args.seqlen, "ppl_ref": rows[0]["ppl_ref"] if rows else None, "total_s": total_s,
            "peak_rss_mb": peak_rss_mb()}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"\n{args.blocks} x {args.seqlen} tokens of {args.text.name}; reference PPL {meta['ppl_ref']:.3f}; "
          f"{device}, {meta['threads']} thread(s); total {total_s:.0f} s; peak RSS {meta['peak_rss_mb']:.0f} MB\n")
    print(table(rows))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
