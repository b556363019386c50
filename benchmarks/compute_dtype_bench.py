"""Compute-dtype benchmark: probe, cost, rounding and eval on the embedded default model, float32 vs bf16 compute.

Why: on CPUs without native bf16 (AVX2-only x86, e.g. AMD EPYC before Zen 4) PyTorch's bf16 matmul is 5-60x slower
than its float32 one, which is why `--compute-dtype auto` computes in float32 there. This measures each stage's
speed in both dtypes on the machine at hand, and the shipped bytes' independence of the dtype (an RTN NVFP4 export
from either model is compared byte for byte).

Per dtype, each stage runs on a few blocks (bf16 on an AVX2 CPU is slow) and is reported per unit of work:
- probe: per-token Fisher (forward + backward) per 512-token calibration block;
- cost: every (Linear, format) pair of NVFP4 / MXFP8 from that probe (only activation quantization follows the
  compute dtype; the rest is float32 by design);
- rounding: GPTQ + scale sweep of every Linear to NVFP4, layer by layer, on the calibration blocks (its column loop is
  a fixed cost; the layer forwards grow with the blocks);
- eval: KL of an RTN NVFP4 copy against the reference per 512-token held-out block.
Both dtypes encode with the input ranges of the float32 probe, so they ship the same RTN export: its bytes' digest
must match (the weights reach the codecs in the checkpoint's dtype either way), and the two mean KLs are the same
export measured in two dtypes.

Before the stages, two kernel timings explain them: a 512x576x1536 matmul (one SmolLM2 MLP projection of a block) in
each dtype with one thread and with torch's default, and a small `clone` (a parallel region's fixed cost, which stalls
on some 2-vCPU VMs with two threads). `--kernels-only` stops after those.

Run from the repo root:  python benchmarks/compute_dtype_bench.py [--threads N] [--blocks 2] [--kernels-only]
Writes benchmarks/results/compute_dtype_<cpu|cuda>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

from measure_bench import blocks_for  # noqa: E402

from prismq.model.checkpoint import SourceTensors  # noqa: E402
from prismq.measure.cost import measure_costs  # noqa: E402
from prismq.measure.fisher import probe  # noqa: E402
from prismq.measure.kl import evaluate_kl  # noqa: E402
from prismq.model.linears import linear_shapes, model_dtype, quantizable  # noqa: E402
from prismq.model.precision import device_description  # noqa: E402
from prismq.model.source import load_model, resolve_model  # noqa: E402
from prismq.rounding.sequential import round_model  # noqa: E402

SEQLEN = 512


def _seconds(device: torch.device, work) -> tuple[Any, float]:
    """(result, wall seconds) of `work()`, synchronized on CUDA."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    result = work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - started


def _median_seconds(work, repeats: int) -> float:
    """Median wall seconds of `work()` over `repeats` calls after one warm-up call."""
    work()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def kernel_timings() -> dict[str, float]:
    """GFLOP/s of a 512x576x1536 matmul per dtype and thread count, and microseconds of a 1000-element clone."""
    default_threads = torch.get_num_threads()
    a, b, small = torch.randn(512, 576), torch.randn(576, 1536), torch.randn(1000)
    out: dict[str, float] = {}
    for threads in sorted({1, default_threads}):
        torch.set_num_threads(threads)
        for dtype in (torch.float32, torch.bfloat16):
            x, y = a.to(dtype), b.to(dtype)
            seconds = _median_seconds(lambda: x @ y, 5 if dtype == torch.float32 else 3)
            out[f"matmul_gflops_{str(dtype).removeprefix('torch.')}_{threads}t"] = 2 * 512 * 576 * 1536 / seconds / 1e9
        out[f"clone_us_{threads}t"] = _median_seconds(lambda: small.clone(), 2000) * 1e6
    torch.set_num_threads(default_threads)
    return out


def run_dtype(model_dir: Path, dtype: torch.dtype, device: torch.device, calib: torch.Tensor,
              heldout: torch.Tensor, amax: dict[str, torch.Tensor] | None) -> dict[str, Any]:
    """Each stage once in `dtype`; seconds per unit of work, the RTN NVFP4 bytes' digest and the mean KL. `amax`:
    the input ranges to encode with (None: this probe's own), so both dtypes can ship the same export."""
    names = list(quantizable(linear_shapes(model_dir)))
    stored = model_dtype(model_dir)
    model = load_model(model_dir, dtype, device)
    stats, probe_s = _seconds(device, lambda: probe(model, calib, names, progress=False))

    def cost() -> list:
        with ExitStack() as stack:
            return measure_costs(SourceTensors(model_dir, stack), stats, names, ["NVFP4", "MXFP8"], device,
                                 progress=False, dtype=dtype)

    rows, cost_s = _seconds(device, cost)
    amax = amax or {n: stats[f"{n}.x_absmax"].reshape(()).float().cpu() for n in names}
    assignment = dict.fromkeys(names, "NVFP4")
    gptq_model = load_model(model_dir, dtype, device)
    _, round_s = _seconds(device, lambda: round_model(gptq_model, assignment, "gptq+sweep", calib, amax,
                                                      progress=False, weight_dtype=stored))
    rtn_model = load_model(model_dir, dtype, device)
    rtn = round_model(rtn_model, assignment, "rtn", calib[:1], amax, progress=False, weight_dtype=stored)
    digest = torch.cat([t.contiguous().view(torch.uint8).flatten().cpu() for n in names
                        for t in rtn.encoded[n].values()])
    result, eval_s = _seconds(device, lambda: evaluate_kl(model, rtn_model, heldout, progress=False))
    blocks, held = calib.shape[0], heldout.shape[0]
    return {"dtype": str(dtype).removeprefix("torch."), "probe_s_per_block": probe_s / blocks,
            "cost_s": cost_s, "cost_rows": len(rows), "round_gptq_sweep_s": round_s,
            "eval_s_per_block": eval_s / held, "mean_kl_rtn_nvfp4": result.mean_kl,
            "rtn_bytes_sha": _sha(digest), "amax": amax}


def _sha(data: torch.Tensor) -> str:
    """sha256 of a uint8 tensor's bytes (first 16 hex digits)."""
    import hashlib

    return hashlib.sha256(data.numpy().tobytes()).hexdigest()[:16]


def main() -> None:
    """Parse arguments, run both dtypes, print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--blocks", type=int, default=2, help="calibration and held-out blocks per stage (default 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--kernels-only", action="store_true", help="only the matmul and clone timings")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    kernels = kernel_timings()
    result: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_description(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(), "kernels": kernels,
        "command": " ".join(["python", "benchmarks/compute_dtype_bench.py", *sys.argv[1:]])}
    print(f"{result['device']}, {result['threads']} thread(s); torch {result['torch']}")
    print("| kernel | value |\n|---|---|\n" + "\n".join(f"| {k} | {v:.2f} |" for k, v in kernels.items()))
    out = args.out or REPO_ROOT / "benchmarks" / "results" / (
        f"compute_dtype_{device.type}" + ("_kernels" if args.kernels_only else "") + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.kernels_only:
        out.write_text(json.dumps(result, indent=1) + "\n")
        return
    model_dir = resolve_model(None)
    calib, heldout, text = blocks_for(model_dir, args.blocks, args.blocks, SEQLEN)
    rows = [run_dtype(model_dir, torch.float32, device, calib, heldout, None)]
    rows.append(run_dtype(model_dir, torch.bfloat16, device, calib, heldout, rows[0].pop("amax")))
    rows[1].pop("amax")
    result.update({"model": model_dir.name, "text": text, "blocks": args.blocks, "seqlen": SEQLEN, "rows": rows})
    print(f"| compute | probe s/block | cost s | GPTQ+sweep s ({args.blocks} block) | eval s/block | "
          "mean KL (RTN NVFP4) | RTN bytes sha |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['dtype']} | {row['probe_s_per_block']:.2f} | {row['cost_s']:.1f} | "
              f"{row['round_gptq_sweep_s']:.1f} | {row['eval_s_per_block']:.2f} | "
              f"{row['mean_kl_rtn_nvfp4']:.5f} | {row['rtn_bytes_sha']} |")
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
