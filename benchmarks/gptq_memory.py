"""Host memory of GPTQ (with the scale sweep) on one Linear: what a rounding layer adds on top of what is resident.

Why: the streaming engine keeps one layer resident, so on a CPU the largest Linear's GPTQ working set sets the peak
of a `--rounding gptq+sweep` run (an [in, in] fp32 Hessian and its damped, permuted and factorized copies). This
encodes one random bf16 weight through its format's codec with GPTQ as the rounding (what the exporter ships) and
reports the process's resident high-water mark above the resident size before it (Linux: VmHWM reset through
/proc/self/clear_refs), with and without act_order. Values are random; memory does not depend on them.

Run from the repo root:  python benchmarks/gptq_memory.py [--shapes 2048x8192] [--format NVFP4A16]
Writes benchmarks/results/gptq_memory.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from prismq.engine.memory import StageLog  # noqa: E402
from prismq.formats import get_format  # noqa: E402
from prismq.model.precision import device_description  # noqa: E402
from prismq.rounding.gptq import GPTQSettings, gptq  # noqa: E402


def measure(shape: tuple[int, int], format_name: str, act_order: bool, sweep: bool) -> dict:
    """Seconds and host bytes above the resident size of one GPTQ encode of a random [out, in] weight."""
    torch.manual_seed(0)
    weight = (torch.randn(shape) * 0.02).to(torch.bfloat16)
    inputs = torch.randn(1024, shape[1])
    hessian = inputs.T @ inputs
    del inputs
    settings = GPTQSettings(act_order=act_order, sweep=sweep)
    fmt = get_format(format_name)
    log = StageLog()
    with log.stage("resident"):
        pass
    started = time.perf_counter()
    with log.stage("gptq"):
        fmt.encode(weight, rounding=lambda grid, w, name: gptq(grid, w, hessian, settings).pack(grid))
    return {"shape": list(shape), "format": format_name, "act_order": act_order, "sweep": sweep,
            "seconds": round(time.perf_counter() - started, 1), "hessian_bytes": hessian.numel() * 4,
            "above_resident_bytes": log.peak_host["gptq"] - log.peak_host["resident"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="2048x8192", help="OUTxIN, comma-separated")
    parser.add_argument("--format", default="NVFP4A16")
    parser.add_argument("--json", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "gptq_memory.json")
    args = parser.parse_args()
    rows = []
    for text in args.shapes.split(","):
        shape = tuple(int(v) for v in text.split("x"))
        for act_order in (True, False):
            rows.append(measure(shape, args.format, act_order, sweep=True))  # type: ignore[arg-type]
            print(rows[-1], flush=True)
    print("| shape | act_order | H GB | above resident GB | x H | seconds |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['shape'][0]}x{row['shape'][1]} | {row['act_order']} | {row['hessian_bytes'] / 1e9:.2f} | "
              f"{row['above_resident_bytes'] / 1e9:.2f} | {row['above_resident_bytes'] / row['hessian_bytes']:.1f} | "
              f"{row['seconds']} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": device_description(torch.device("cpu")), "torch": torch.__version__, "format": args.format}
    args.json.write_text(json.dumps({"settings": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
