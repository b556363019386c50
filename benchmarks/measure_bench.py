"""Measurement benchmark: wall time and peak memory of probe, cost and eval on the embedded default model.

Why: these three stages are what every mixed-precision run pays before allocation; the issue's reference workload is
32 x 512 calibration tokens (probe, cost) and 16 x 512 held-out tokens (eval). Probe: the Fisher probe over every
quantizable Linear. Cost: every (Linear, exportable format) pair priced from that probe. Eval: KL of a uniform NVFP4
(W4A4) fake-quantized copy against the bf16 reference, full vocabulary at every position.

Run from the repo root:  python benchmarks/measure_bench.py [--device cpu|cuda] [--threads 1]
Text: ../shared/data/wikitext-2-valid-tokenized.txt (calibration) and wikitext-2-raw-test.txt (held-out), first
consecutive blocks, when present; else prismq's default text split. Peak memory: CPU = peak RSS (VmHWM) reset before
each stage; CUDA = torch.cuda.max_memory_allocated per stage. Writes benchmarks/results/measure_bench_<device>.json.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

from probe_bench import device_name, peak_rss_mib, reset_peak_rss, synchronize  # noqa: E402

from prismq.data import consecutive_blocks, text_splits  # noqa: E402
from prismq.model.checkpoint import SourceTensors  # noqa: E402
from prismq.formats import format_names  # noqa: E402
from prismq.measure.cost import measure_costs  # noqa: E402
from prismq.measure.evaluate import fake_quantized  # noqa: E402
from prismq.measure.fisher import probe  # noqa: E402
from prismq.measure.kl import evaluate_kl  # noqa: E402
from prismq.model.linears import linear_shapes, quantizable  # noqa: E402
from prismq.model.source import load_model, load_tokenizer, resolve_model  # noqa: E402

DATA = REPO_ROOT.parent / "shared" / "data"


def blocks_for(model_dir: Path, calib: int, heldout: int, seqlen: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Calibration and held-out blocks, and where they came from."""
    tokenizer = load_tokenizer(model_dir)
    valid, test = DATA / "wikitext-2-valid-tokenized.txt", DATA / "wikitext-2-raw-test.txt"
    if valid.is_file() and test.is_file():
        return (consecutive_blocks(tokenizer, valid.read_text(), calib, seqlen),
                consecutive_blocks(tokenizer, test.read_text(), heldout, seqlen), "WikiText-2 valid / test")
    splits = text_splits(None, None, None, tokenizer, calib, 0, heldout, seqlen)
    return splits.calibration, splits.report, "prismq default text, split"


def timed(device: torch.device, work: Callable[[], Any]) -> tuple[Any, float, float]:
    """(result, seconds, peak MiB) of one stage, the peak reset just before it."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()
    synchronize(device)
    started = time.perf_counter()
    result = work()
    synchronize(device)
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else peak_rss_mib()
    return result, seconds, peak


def synthetic_model(directory: Path) -> Path:
    """SmolLM2-135M's architecture (benchmarks/configs) with random bf16 weights, saved to `directory`: the same
    shapes and so the same time and memory as the real model, for machines the real weights cannot be carried to."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig.from_dict(json.loads((REPO_ROOT / "benchmarks" / "configs" / "smollm2-135m.json").read_text()))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(directory)
    return directory


def run(device: torch.device, calib_blocks: int, heldout_blocks: int, seqlen: int,
        synthetic: Path | None = None) -> dict[str, Any]:
    """Probe, cost and eval once each, timed."""
    if synthetic is None:
        model_dir = resolve_model(None)
        calib, heldout, text = blocks_for(model_dir, calib_blocks, heldout_blocks, seqlen)
    else:
        model_dir = synthetic_model(synthetic)
        tokens = torch.randint(0, 49152, (calib_blocks + heldout_blocks, seqlen), generator=torch.Generator().manual_seed(0))
        calib, heldout, text = tokens[:calib_blocks], tokens[calib_blocks:], "random tokens, random weights"
    names = list(quantizable(linear_shapes(model_dir)))
    formats = format_names(exportable_only=True)
    model = load_model(model_dir, device=device)
    stats, probe_s, probe_mib = timed(device, lambda: probe(model, calib, names, progress=False))

    def cost() -> list:
        with ExitStack() as stack:
            return measure_costs(SourceTensors(model_dir, stack), stats, names, formats, device, progress=False)

    rows, cost_s, cost_mib = timed(device, cost)
    quantized = fake_quantized(copy.deepcopy(model), {n: "NVFP4" for n in names}, {}, calib[:8], progress=False)
    result, eval_s, eval_mib = timed(device, lambda: evaluate_kl(model, quantized, heldout, progress=False))
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device), "device_type": device.type, "torch": torch.__version__, "python": platform.python_version(),
        "model": model_dir.name, "linears": len(names), "formats": formats, "text": text,
        "calib_tokens": int(calib.numel()), "heldout_tokens": int(heldout.numel()),
        "stages": {"probe": {"seconds": probe_s, "peak_mib": probe_mib},
                   "cost": {"seconds": cost_s, "peak_mib": cost_mib, "rows": len(rows)},
                   "eval": {"seconds": eval_s, "peak_mib": eval_mib, "mean_kl_nvfp4": result.mean_kl}},
    }


def table(result: dict[str, Any]) -> str:
    """The per-stage markdown table."""
    memory = "peak allocated MiB" if result["device_type"] == "cuda" else "peak RSS MiB"
    lines = [f"| stage | work | wall s | {memory} |", "|---|---|---|---|"]
    work = {"probe": f"{result['calib_tokens']} calibration tokens, {result['linears']} Linears",
            "cost": f"{result['stages']['cost']['rows']} (Linear, format) pairs, {len(result['formats'])} formats",
            "eval": f"{result['heldout_tokens']} held-out tokens, uniform NVFP4 vs bf16 "
                    f"(mean KL {result['stages']['eval']['mean_kl_nvfp4']:.4f})"}
    for stage, values in result["stages"].items():
        lines.append(f"| {stage} | {work[stage]} | {values['seconds']:.1f} | {values['peak_mib']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    """Parse arguments, run, print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--calib-blocks", type=int, default=32)
    parser.add_argument("--heldout-blocks", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--synthetic", type=Path, default=None, metavar="DIR",
                        help="use SmolLM2-135M's shapes with random weights saved to DIR (timing only)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    result = run(device, args.calib_blocks, args.heldout_blocks, args.seqlen, args.synthetic)
    result["command"] = " ".join(["python", "benchmarks/measure_bench.py", *sys.argv[1:]])
    print(f"{result['device']}; torch {result['torch']}; {result['model']}; text: {result['text']}")
    print(table(result))
    out = args.out or REPO_ROOT / "benchmarks" / "results" / f"measure_bench_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
