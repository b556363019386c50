"""llmcompressor's GPTQ (and RTN) NVFP4 on the embedded default model, measured with prismq's own evaluator.

Why: prismq's GPTQ rounding needs an outside reference point. This script quantizes SmolLM2-135M-Instruct (the bf16
copy prismq converted from its GGUF) to uniform NVFP4 (W4A4, FP4 E2M1 groups of 16, FP8 E4M3 group scales + fp32
global scale; compressed-tensors "nvfp4-pack-quantized") with llmcompressor's GPTQModifier and, as its own baseline,
its QuantizationModifier (round-to-nearest), both on exactly the 32 x 512 calibration token blocks `prismq quantize`
uses by default, and evaluates the checkpoints with `prismq.measure.evaluate.run_eval` (loaded through transformers +
compressed-tensors, as `prismq eval` does) on the default held-out split that `prismq quantize` reports on. prismq's
own RTN NVFP4 (an assignment file: the same codecs the export uses, input ranges = absmax over the same calibration
blocks) is evaluated in the same way as an anchor.

llmcompressor must not become a prismq dependency, so it lives in its own virtualenv (benchmarks/.venv-llmcompressor,
git-ignored), created on first use (torch first, pinned to the project's CPU build, then llmcompressor). This file is
both the driver (run with the project venv) and the worker (`--worker`, run by the driver with the other venv); the
worker needs only torch, safetensors, transformers, datasets and llmcompressor, never prismq.

Run from the repo root:  .venv/bin/python benchmarks/llmcompressor_gptq.py [--threads 1] [--reuse]
Writes benchmarks/results/llmcompressor_gptq.json and prints a markdown table; checkpoints go to
out/llmcompressor_gptq/ (git-ignored).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
VENV = REPO_ROOT / "benchmarks" / ".venv-llmcompressor"
WORK = REPO_ROOT / "out" / "llmcompressor_gptq"
RESULTS = REPO_ROOT / "benchmarks" / "results" / "llmcompressor_gptq.json"
TORCH_VERSION = "2.13.0"  # the project's CPU build (a local wheel); an unpinned install pulls GBs of CUDA wheels
# newest release whose pins accept torch 2.13 (it pins compressed-tensors 0.19 and transformers <= 5.17)
LLMCOMPRESSOR_VERSION = "0.14.0.1"
CALIB_BLOCKS, HELDOUT_BLOCKS, SEQLEN = 32, 16, 512  # prismq quantize's defaults (QuantizeConfig)
METHODS = ("rtn", "gptq")


# ----------------------------------------------------------------------------------------------------------------
# worker: runs inside the llmcompressor venv


def worker(method: str, model_dir: Path, calib_path: Path, out_dir: Path, info_path: Path) -> None:
    """Quantize `model_dir` to NVFP4 with llmcompressor (`method` rtn or gptq) on the token blocks stored in
    `calib_path`, save a compressed checkpoint to `out_dir` and write versions and timings to `info_path`."""
    import compressed_tensors
    import llmcompressor
    import transformers
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    ids = load_file(str(calib_path))["input_ids"]
    n_blocks, seqlen = ids.shape
    # already tokenized: llmcompressor sees the `input_ids` column and skips its own tokenization
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    common: dict[str, Any] = {"targets": "Linear", "scheme": "NVFP4", "ignore": ["lm_head"]}
    # GPTQModifier's defaults: block_size 128, dampening_frac 0.01, actorder "static"
    recipe = GPTQModifier(**common) if method == "gptq" else QuantizationModifier(**common)
    load_s = time.perf_counter() - started

    started = time.perf_counter()
    oneshot(model=model, tokenizer=tokenizer, dataset=dataset, recipe=recipe, num_calibration_samples=n_blocks,
            max_seq_length=seqlen, shuffle_calibration_samples=False)
    quantize_s = time.perf_counter() - started

    started = time.perf_counter()
    model.save_pretrained(out_dir, save_compressed=True)
    tokenizer.save_pretrained(out_dir)
    save_s = time.perf_counter() - started
    info = {"method": method, "recipe": repr(recipe), "calibration": [n_blocks, seqlen],
            "versions": {"llmcompressor": llmcompressor.__version__,
                         "compressed-tensors": compressed_tensors.__version__,
                         "transformers": transformers.__version__, "torch": torch.__version__,
                         "python": platform.python_version()},
            "load_s": load_s, "quantize_s": quantize_s, "save_s": save_s, "threads": torch.get_num_threads()}
    info_path.write_text(json.dumps(info, indent=1) + "\n")
    print(f"llmcompressor {method}: quantized in {quantize_s:.1f} s, saved {out_dir}", flush=True)


# ----------------------------------------------------------------------------------------------------------------
# driver: runs in the project venv


def venv_python() -> Path:
    """The llmcompressor venv's interpreter, creating the venv and installing into it when needed.

    torch is installed first and pinned, so llmcompressor's `torch>=...` requirement is met by the local CPU wheel
    instead of pulling a CUDA build; the install is skipped when the pinned llmcompressor already imports."""
    python = VENV / "bin" / "python"
    probe = "import importlib.metadata as m; print(m.version('llmcompressor'), m.version('torch'))"
    if python.exists():
        found = subprocess.run([str(python), "-c", probe], capture_output=True, text=True)
        if found.returncode == 0 and found.stdout.split() == [LLMCOMPRESSOR_VERSION, f"{TORCH_VERSION}+cpu"]:
            return python
    print(f"setting up {VENV} (torch {TORCH_VERSION}, llmcompressor {LLMCOMPRESSOR_VERSION})",
          flush=True)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, f"torch=={TORCH_VERSION}"], check=True)
    subprocess.run([*pip, f"llmcompressor=={LLMCOMPRESSOR_VERSION}", f"torch=={TORCH_VERSION}"], check=True)
    return python


def calibration_blocks(model_dir: Path) -> torch.Tensor:
    """prismq's default calibration blocks [32, 512], checked against what `prismq quantize` calibrates on."""
    from prismq.data import text_splits
    from prismq.measure.evaluate import default_calibration_blocks
    from prismq.model.source import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    calib = text_splits(None, None, None, tokenizer, CALIB_BLOCKS, 0, HELDOUT_BLOCKS, SEQLEN).calibration
    if not torch.equal(calib, default_calibration_blocks(model_dir)):
        sys.exit("text_splits(None, None, None, ...) no longer matches prismq quantize's default blocks")
    return calib


def run_llmcompressor(python: Path, method: str, model_dir: Path, calib_path: Path, threads: int,
                      reuse: bool) -> dict[str, Any]:
    """Run the worker for `method` in the llmcompressor venv (unless `reuse` finds its checkpoint) and return its
    info record, with the checkpoint path and the worker's whole wall time (venv start-up and imports included)."""
    out_dir, info_path = WORK / method, WORK / f"{method}.info.json"
    if not (reuse and info_path.is_file() and (out_dir / "config.json").is_file()):
        info_path.unlink(missing_ok=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
               "CUDA_VISIBLE_DEVICES": ""}
        started = time.perf_counter()
        subprocess.run([str(python), str(Path(__file__).resolve()), "--worker", method, "--model", str(model_dir),
                        "--calib", str(calib_path), "--out", str(out_dir), "--info", str(info_path),
                        "--threads", str(threads)], env=env, check=True)
        info = json.loads(info_path.read_text())
        info["worker_wall_s"] = time.perf_counter() - started
        info_path.write_text(json.dumps(info, indent=1) + "\n")
    return {**json.loads(info_path.read_text()), "checkpoint": str(out_dir)}


def prismq_rtn_assignment(model_dir: Path, calib: torch.Tensor) -> tuple[Path, dict[str, float]]:
    """prismq's own uniform NVFP4 (RTN) as an assignment file, input ranges measured on the same blocks."""
    from prismq.measure.input_range import input_absmax
    from prismq.model.linears import linear_shapes, quantizable
    from prismq.model.source import load_model

    names = list(quantizable(linear_shapes(model_dir)))
    amax = input_absmax(load_model(model_dir, device="cpu"), calib, names)
    path = WORK / "prismq_rtn_assignment.json"
    path.write_text(json.dumps({"assignment": {n: "NVFP4" for n in names},
                                "input_amax": {n: float(v) for n, v in amax.items()}}, indent=1) + "\n")
    return path, {n: float(v) for n, v in amax.items()}


def input_range_ratios(checkpoint: Path, prismq_amax: dict[str, float]) -> dict[str, float]:
    """llmcompressor's calibrated input absmax (6 * 448 / input_global_scale) over prismq's (unquantized model,
    same blocks): min / median / max over the Linears. llmcompressor observes inputs while earlier layers already
    carry their quantized weights, so the two need not agree."""
    from safetensors import safe_open

    ratios = []
    for shard in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for key in f.keys():
                if key.endswith(".input_global_scale"):
                    name = key[: -len(".input_global_scale")]
                    ratios.append(6.0 * 448.0 / float(f.get_tensor(key).float().reshape(-1)[0]) / prismq_amax[name])
    ratios.sort()
    if not ratios:
        return {}
    return {"n": len(ratios), "min": ratios[0], "median": ratios[len(ratios) // 2], "max": ratios[-1]}


def evaluate(label: str, quantized: Path) -> dict[str, Any]:
    """`prismq eval` (no reference: the embedded default model; no text: the default held-out split), timed."""
    from prismq.measure.evaluate import run_eval

    started = time.perf_counter()
    result = run_eval(None, str(quantized), None, HELDOUT_BLOCKS, SEQLEN, WORK / f"{label}.eval.json", device="cpu",
                      progress=False)
    return {**result.to_json(), "eval_s": time.perf_counter() - started}


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table of the results."""
    lines = ["| method | mean KL | median KL | p99 KL | p99.9 KL | max KL | same top-1 | PPL ratio | quantize s "
             "| eval s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        quantize_s = f"{r['quantize_s']:.1f}" if r.get("quantize_s") is not None else "-"
        lines.append(f"| {r['method']} | {r['mean_kl']:.4f} | {r['median_kl']:.4f} | {r['p99_kl']:.3f} "
                     f"| {r['p999_kl']:.3f} | {r['max_kl']:.2f} | {100 * r['same_top1']:.2f} % | {r['ppl_ratio']:.4f} "
                     f"| {quantize_s} | {r['eval_s']:.1f} |")
    return "\n".join(lines)


def driver(args: argparse.Namespace) -> int:
    """Set up the venv, dump the calibration blocks, quantize with llmcompressor, evaluate everything, report."""
    from safetensors.torch import save_file

    from prismq import __version__
    from prismq.model.source import resolve_model

    started = time.perf_counter()
    WORK.mkdir(parents=True, exist_ok=True)
    python = venv_python()
    model_dir = resolve_model(None)
    calib = calibration_blocks(model_dir)
    calib_path = WORK / "calibration_ids.safetensors"
    save_file({"input_ids": calib.contiguous()}, str(calib_path))

    rows: list[dict[str, Any]] = []
    workers = {method: run_llmcompressor(python, method, model_dir, calib_path, args.threads, args.reuse)
               for method in METHODS}
    assignment, prismq_amax = prismq_rtn_assignment(model_dir, calib)
    for method, info in workers.items():
        row = {"method": f"llmcompressor {method}", **evaluate(f"llmcompressor_{method}", Path(info["checkpoint"])),
               "quantize_s": info["quantize_s"], "worker_wall_s": info.get("worker_wall_s"),
               "input_amax_ratio_vs_prismq": input_range_ratios(Path(info["checkpoint"]), prismq_amax)}
        rows.append(row)
        print(f"{row['method']}: mean KL {row['mean_kl']:.4f}", flush=True)
    rows.append({"method": "prismq rtn (anchor)", **evaluate("prismq_rtn", assignment), "quantize_s": None})
    total_s = time.perf_counter() - started

    first = next(iter(workers.values()))
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"), "threads": args.threads,
            "model": str(model_dir), "scheme": "NVFP4 (W4A4), targets Linear, ignore lm_head",
            "calibration": f"prismq default calibration split, {CALIB_BLOCKS} x {SEQLEN} tokens",
            "heldout": f"prismq default held-out split, {HELDOUT_BLOCKS} x {SEQLEN} tokens",
            "llmcompressor_env": first["versions"],
            "llmcompressor_recipes": {m: w["recipe"] for m, w in workers.items()},
            "eval_env": {"prismq": __version__, "torch": torch.__version__, "python": platform.python_version(),
                         **_eval_versions()},
            "reused_checkpoints": args.reuse, "total_s": total_s}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"\nllmcompressor {first['versions']['llmcompressor']} (compressed-tensors "
          f"{first['versions']['compressed-tensors']}, transformers {first['versions']['transformers']}, torch "
          f"{first['versions']['torch']}); eval with prismq {__version__}; {args.threads} thread(s); total "
          f"{total_s:.0f} s\n")
    print(table(rows))
    print(f"\nwrote {RESULTS.relative_to(REPO_ROOT)}")
    return 0


def _eval_versions() -> dict[str, str]:
    """Versions of the libraries that load the checkpoints in the project venv."""
    import importlib.metadata as metadata

    return {name: metadata.version(name) for name in ("transformers", "compressed-tensors")}


def main(argv: list[str] | None = None) -> int:
    """Parse flags and run the driver, or the worker when `--worker` is given."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads, both venvs (default 1: 2 stall here)")
    parser.add_argument("--reuse", action="store_true", help="keep llmcompressor checkpoints already in out/")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--calib", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--info", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        worker(args.worker, args.model, args.calib, args.out, args.info)
        return 0
    sys.path.insert(0, str(REPO_ROOT))
    return driver(args)


if __name__ == "__main__":
    raise SystemExit(main())
