"""End-to-end time of `prismq quantize --target-bits 4.75` with default settings on synthetic Llama-shaped models.

Why: the GPU-speed issue asks for an 8B model quantized and selected in minutes on one GPU, and a SmolLM2-sized one
in under a minute. Every stage runs as a user would run it (probe, cost, allocate, round with GPTQ + sweep, select,
export, eval; calibration 32 x 512 tokens of the default text, selection and report splits as configured by
default); only the weights are random (bf16, N(0, 0.02), norms 1) and the tokenizer is the embedded model's. The
8B shape is timed at a few depths and scaled to 32 layers by the per-layer slope between the two deepest: writing a
16 GB synthetic checkpoint does not fit a device call. Stage seconds come from the run's summary.json.

With `--llmcompressor SITE` (a directory where llmcompressor and its own compressed-tensors are importable, e.g.
installed there with `pip install --target SITE` from carried wheels), each depth is also quantized to uniform NVFP4
by llm-compressor's GPTQ (its GPTQModifier defaults, on prismq's default calibration blocks; its sequential
pipeline onloads each layer to the GPU: `benchmarks/llmcompressor_gptq.py`'s worker) and by prismq with
`--uniform NVFP4 --rounding gptq` (the same job: no selection), and the times are put side by side.

With `--gpus 1,2,4` each depth is also quantized with `--gpus N` (one process per GPU, rank 0 leading: the
several-GPU issue's benchmark), and the wall time and scaling efficiency (one GPU's seconds / (N x N GPUs'
seconds)) are printed and kept under `on_gpus` in the JSON.

Run from the repo root:
    python benchmarks/gpu_quantize.py --shape 8b --layers 2,4 [--device cuda] [--tokenizer DIR]
    python benchmarks/gpu_quantize.py --shape smollm2
    python benchmarks/gpu_quantize.py --shape 8b --layers 1,2 --llmcompressor /tmp/llmc
    python benchmarks/gpu_quantize.py --shape 8b --layers 4 --gpus 1,2,4      (on a machine with 4 GPUs)
Writes benchmarks/results/gpu_quantize_SHAPE.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.streaming_memory import write_random_checkpoint  # noqa: E402
from prismq.model.source import resolve_model  # noqa: E402

SHAPES = {  # Llama-3-8B's and SmolLM2-135M's layer shapes
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
               tie_word_embeddings=False, full_depth=32),
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                    tie_word_embeddings=True, full_depth=30),
}


def write_model(path: Path, shape: str, layers: int, tokenizer: Path) -> int:
    """A synthetic checkpoint of `shape` with `layers` decoder layers, written tensor by tensor; its bytes."""
    from transformers import AutoTokenizer, LlamaConfig

    fields = {k: v for k, v in SHAPES[shape].items() if k != "full_depth"}
    config = LlamaConfig(num_hidden_layers=layers, vocab_size=len(AutoTokenizer.from_pretrained(tokenizer)),
                         max_position_embeddings=4096, dtype="bfloat16", **fields)
    return write_random_checkpoint(path, config, tokenizer)


def quantize(model: Path, out: Path, device: str, job: tuple[str, ...] = ("--target-bits", "4.75")) -> dict:
    """One `prismq quantize` (default: --target-bits 4.75, default settings) in a fresh process: wall and stage
    seconds, and when each progress bar and log line appeared (`_timeline`)."""
    for stale in (out, out.with_name(out.name + ".work")):
        shutil.rmtree(stale, ignore_errors=True)
    command = [sys.executable, "-m", "prismq.cli", "quantize", str(model), *job, "--device", device,
               "--out", str(out)]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO_ROOT,
                               env=_bytecode_cached(os.environ))
    timeline, tail = _timeline(process.stdout, started)
    seconds = time.perf_counter() - started
    if process.wait():
        raise SystemExit(f"prismq quantize failed ({process.returncode}):\n{tail[-3000:]}")
    summary = json.loads((out.with_name(out.name + ".work") / "summary.json").read_text())
    return {"seconds": round(seconds, 1), "stages": summary.get("seconds", {}),
            "mean_kl": summary["eval"]["mean_kl"], "bits_per_param": summary["bits_per_param"],
            "first_output_s": timeline[0][0] if timeline else None,
            "after_last_output_s": round(seconds - timeline[-1][1], 1) if timeline else None,
            "timeline": timeline}


def _bytecode_cached(env: Mapping[str, str]) -> dict[str, str]:
    """`env` letting Python cache the bytecode it compiles, as a pip install does: an environment that forbids it
    (PYTHONDONTWRITEBYTECODE) recompiles every module of torch and transformers in each process, seconds that a
    user does not pay. Both tools' processes get it."""
    return {k: v for k, v in env.items() if k != "PYTHONDONTWRITEBYTECODE"}


def _timeline(stream, started: float) -> tuple[list[list], str]:
    """Seconds since `started` at which each progress bar or log line of a run's output first and last appeared
    (as [first, last, label]), in order, and the output's last characters: what the stages' own clocks leave out
    (start-up before the first stage, the report after the last) shows as the gap before the first and after the
    last entry."""
    entries: dict[str, list] = {}
    tail, line = "", ""
    for char in iter(lambda: stream.read(1), ""):
        tail = (tail + char)[-4000:]
        if char not in "\r\n":
            line += char
            continue
        text, line = line.strip(), ""
        if not text:
            continue
        label = text.split(":")[0] if "|" in text else text[:80]  # a tqdm bar's description, or a log line
        now = round(time.perf_counter() - started, 2)
        entries.setdefault(label, [now, now, label])[1] = now
    return list(entries.values()), tail


def llmcompressor_gptq(model: Path, site: Path, scratch: Path) -> dict:
    """llm-compressor's GPTQ to uniform NVFP4 of `model` in a fresh process with `site` first on its path: the
    process's wall seconds and the worker's own record (load, quantize, save seconds; versions)."""
    from safetensors.torch import save_file

    from benchmarks.llmcompressor_gptq import calibration_blocks

    calib, out, info = scratch / "llmc-calibration.safetensors", scratch / "llmc-out", scratch / "llmc-info.json"
    shutil.rmtree(out, ignore_errors=True)
    save_file({"input_ids": calibration_blocks(model).contiguous()}, str(calib))
    env = {**_bytecode_cached(os.environ), "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "llmcompressor_gptq.py"), "--worker",
                           "gptq", "--model", str(model), "--calib", str(calib), "--out", str(out), "--info",
                           str(info), "--threads", str(os.cpu_count() or 1)], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"llm-compressor failed ({done.returncode}):\n{done.stderr[-3000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return {"seconds": round(seconds, 1), **json.loads(info.read_text())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--layers", help="depths to time, comma-separated (default: the model's full depth)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokenizer", type=Path, help="directory with the tokenizer (default: the embedded model's)")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/prismq-gpu-quantize"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--llmcompressor", type=Path, metavar="SITE",
                        help="also time llm-compressor's GPTQ (uniform NVFP4), importable from SITE")
    parser.add_argument("--gpus", default="1", help="GPU counts to run each depth on, comma-separated (--gpus N of "
                        "prismq quantize; e.g. 1,2,4): wall time and scaling efficiency against one GPU")
    args = parser.parse_args()
    counts = [int(v) for v in args.gpus.split(",")]
    full = SHAPES[args.shape]["full_depth"]
    depths = [int(v) for v in (args.layers or str(full)).split(",")]
    tokenizer = args.tokenizer or resolve_model(None)
    rows = []
    for layers in depths:
        model = args.scratch / f"{args.shape}-{layers}L"
        size = write_model(model, args.shape, layers, tokenizer)
        result = quantize(model, args.scratch / f"out-{layers}L", args.device)
        row = {"layers": layers, "checkpoint_bytes": size, **result}
        print(f"{layers} layers: {result}", flush=True)
        row["on_gpus"] = {count: quantize(model, args.scratch / f"out-{layers}L-{count}gpus", args.device,
                                          ("--target-bits", "4.75", "--gpus", str(count)))
                          for count in counts if count > 1}
        for count, spread in row["on_gpus"].items():
            print(f"  on {count} GPUs: {spread['seconds']} s (one GPU {result['seconds']} s: scaling efficiency "
                  f"{result['seconds'] / (count * spread['seconds']):.0%})", flush=True)
        if args.llmcompressor is not None:
            row["prismq_uniform_nvfp4_gptq"] = quantize(model, args.scratch / f"uniform-{layers}L", args.device,
                                                        ("--uniform", "NVFP4", "--rounding", "gptq"))
            row["llmcompressor_gptq"] = llmcompressor_gptq(model, args.llmcompressor, args.scratch)
            print(f"  prismq --uniform NVFP4 --rounding gptq: {row['prismq_uniform_nvfp4_gptq']['seconds']} s; "
                  f"llm-compressor GPTQ NVFP4: {row['llmcompressor_gptq']['seconds']} s (its quantize step "
                  f"{row['llmcompressor_gptq']['quantize_s']:.1f} s)", flush=True)
        shutil.rmtree(model, ignore_errors=True)
        rows.append(row)
    estimate = scaled(rows, full, lambda r: r["seconds"])
    device = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    stages = list(rows[0]["stages"])
    print(f"\n{args.shape}-shaped on {device}, torch {torch.__version__}")
    print("| layers | checkpoint GB | seconds | " + " | ".join(stages) + " |")
    print("|---" * (3 + len(stages)) + "|")
    for r in rows:
        print(f"| {r['layers']} | {r['checkpoint_bytes'] / 1e9:.2f} | {r['seconds']} | "
              + " | ".join(f"{r['stages'].get(s, 0):.1f}" for s in stages) + " |")
    if estimate is not None:
        print(f"scaled to {full} layers: {estimate:.0f} s ({estimate / 60:.1f} min)")
    compared = {}
    if args.llmcompressor is not None:
        for key, label in (("prismq_uniform_nvfp4_gptq", "prismq --uniform NVFP4 --rounding gptq"),
                           ("llmcompressor_gptq", "llm-compressor GPTQ NVFP4")):
            at_depth = {r["layers"]: r[key]["seconds"] for r in rows}
            compared[key] = {"seconds": at_depth, "scaled_to_full_depth_seconds": scaled(rows, full,
                                                                                         lambda r: r[key]["seconds"])}
            print(f"{label}: " + ", ".join(f"{n} layers {t} s" for n, t in at_depth.items()))
        for r in rows:
            print(f"{r['layers']} layers: llm-compressor's GPTQ / prismq's default run "
                  f"{r['llmcompressor_gptq']['seconds'] / r['seconds']:.2f}x, / prismq's uniform GPTQ "
                  f"{r['llmcompressor_gptq']['seconds'] / r['prismq_uniform_nvfp4_gptq']['seconds']:.2f}x")
    target = args.json or REPO_ROOT / "benchmarks" / "results" / f"gpu_quantize_{args.shape}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps({"device": device, "torch": torch.__version__, "shape": args.shape,
                                  "rows": rows, "scaled_to_full_depth_seconds": estimate, "compared": compared},
                                 indent=1) + "\n")


def scaled(rows: list[dict], full: int, seconds) -> float | None:
    """Seconds at the model's full depth from the two deepest rows' per-layer slope (None without two depths, or
    when the full depth was run)."""
    ordered = sorted(rows, key=lambda r: r["layers"])
    if len(ordered) < 2 or ordered[-1]["layers"] >= full:
        return None
    (a, ta), (b, tb) = [(r["layers"], seconds(r)) for r in ordered[-2:]]
    return tb + (full - b) * (tb - ta) / (b - a)


if __name__ == "__main__":
    main()
