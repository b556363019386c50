"""Probe benchmark: wall time and peak memory of the Fisher probe on the embedded default model.

Why: the probe runs one forward + backward per calibration block over the whole model, so it is the most expensive
measurement before selection; its memory must stay near that of a plain forward + backward (no per-Linear `.grad`,
no per-token tensors kept past a block). The baseline row times that plain forward + backward (parameters frozen,
input embeddings requiring grad, no hooks) on the first blocks, so the probe's hook overhead is visible.

Run from the repo root:  python benchmarks/probe_bench.py [--device cpu|cuda] [--blocks 32] [--seqlen 512]
Text: ../shared/data/wikitext-2-valid-tokenized.txt (consecutive blocks from its start) when present, else
prismq's default text (prismq.data.read_text(None)). Peak memory: CPU = the process's peak RSS during the probe
(VmHWM, reset just before it through /proc/self/clear_refs; it includes the loaded model and the Python runtime, so
the RSS right before the probe is printed next to it; where the reset is refused it is getrusage's ru_maxrss over the
whole run); CUDA =
torch.cuda.max_memory_allocated during the probe (and the model's own allocation before it). Writes
benchmarks/results/probe_bench_<device>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from prismq.data import read_text  # noqa: E402
from prismq.measure.fisher import probe  # noqa: E402
from prismq.model.linears import linear_shapes, quantizable  # noqa: E402
from prismq.model.source import load_model, load_tokenizer, resolve_model  # noqa: E402

CALIB_TEXT = REPO_ROOT.parent / "shared" / "data" / "wikitext-2-valid-tokenized.txt"


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so wall-clock times cover the work and not just its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rss_mib() -> float:
    """Current resident set size of this process in MiB (from /proc/self/statm)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) so the next reading covers only what follows; False if the kernel
    refuses (then the peak also covers model loading and tokenization)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    """Peak resident set size in MiB: VmHWM from /proc/self/status (resettable), else getrusage's ru_maxrss."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def calibration_blocks(model_dir: Path, n_blocks: int, seqlen: int) -> tuple[torch.Tensor, str]:
    """The first n_blocks x seqlen tokens of the calibration text, and the text's name."""
    if CALIB_TEXT.is_file():
        text, source = CALIB_TEXT.read_text(encoding="utf-8"), CALIB_TEXT.name
    else:
        text, source = read_text(None), "prismq default text (pydoc_data)"
    ids = load_tokenizer(model_dir)(text)["input_ids"]
    if len(ids) < n_blocks * seqlen:
        sys.exit(f"{source} has {len(ids)} tokens, fewer than {n_blocks} x {seqlen}")
    return torch.tensor(ids[: n_blocks * seqlen], dtype=torch.long).view(n_blocks, seqlen), source


def plain_backward_seconds(model: torch.nn.Module, blocks: torch.Tensor, device: torch.device) -> float:
    """Seconds per block of a hook-free forward + backward built like the probe's (frozen parameters, input
    embeddings requiring grad): the floor the probe's own time is compared with."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    embed = model.get_input_embeddings()
    synchronize(device)
    started = time.perf_counter()
    for block in blocks:
        block = block.to(device)
        embeds = embed(block[None]).detach().requires_grad_(True)
        logits = model(inputs_embeds=embeds, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), block[1:], reduction="sum")
        torch.autograd.grad(loss, [embeds])
    synchronize(device)
    return (time.perf_counter() - started) / len(blocks)


def device_name(device: torch.device) -> str:
    """A human-readable name of the device the benchmark ran on."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return f"{model}, {torch.get_num_threads()} torch thread(s)"


def run(device: torch.device, n_blocks: int, seqlen: int, sample_rows: int, baseline_blocks: int) -> dict[str, Any]:
    """Load the default model, run the probe once (timed), then the plain forward + backward baseline."""
    model_dir = resolve_model(None)
    blocks, source = calibration_blocks(model_dir, n_blocks, seqlen)
    names = list(quantizable(linear_shapes(model_dir)))
    model = load_model(model_dir, device=device)
    result: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device), "torch": torch.__version__, "python": platform.python_version(),
        "model": model_dir.name, "dtype": str(model.dtype).removeprefix("torch."), "linears": len(names),
        "text": source, "blocks": int(blocks.shape[0]), "seqlen": int(blocks.shape[1]),
        "tokens": int(blocks.numel()), "sample_rows": sample_rows,
    }
    if device.type == "cuda":
        synchronize(device)
        result["model_allocated_mib"] = torch.cuda.memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
    else:
        result["peak_rss_before_probe_mib"] = peak_rss_mib()
        result["rss_before_probe_mib"] = rss_mib()
        result["peak_rss_reset"] = reset_peak_rss()
    synchronize(device)
    started = time.perf_counter()
    tensors = probe(model, blocks, names, sample_rows=sample_rows, seed=0, progress=True)
    synchronize(device)
    seconds = time.perf_counter() - started
    if device.type == "cuda":
        result["peak_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        result["peak_rss_mib"] = peak_rss_mib()
    traces = torch.stack([t for k, t in tensors.items() if k.endswith(".fisher_trace")])
    result.update(probe_s=seconds, tokens_per_s=blocks.numel() / seconds, ms_per_block=1e3 * seconds / len(blocks),
                  calib_nll=float(tensors["loss"]), fisher_trace_sum=float(traces.sum()),
                  output_mib=sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20)
    if baseline_blocks:
        del tensors
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        else:
            reset_peak_rss()
        per_block = plain_backward_seconds(model, blocks[:baseline_blocks], device)
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else peak_rss_mib()
        result.update(baseline_blocks=baseline_blocks, baseline_ms_per_block=1e3 * per_block,
                      overhead=result["ms_per_block"] / (1e3 * per_block), baseline_peak_mib=peak)
    return result


def table(result: dict[str, Any]) -> str:
    """The result as a small markdown table."""
    memory = (f"peak allocated {result['peak_allocated_mib']:.0f} MiB (model {result['model_allocated_mib']:.0f})"
              if "peak_allocated_mib" in result else
              f"peak RSS {result['peak_rss_mib']:.0f} MiB (RSS before probe {result['rss_before_probe_mib']:.0f})")
    rows = [("device", result["device"]), ("model", f"{result['model']} ({result['dtype']}, {result['linears']} "
                                                   "Linears)"),
            ("text", f"{result['text']}: {result['blocks']} x {result['seqlen']} = {result['tokens']} tokens"),
            ("probe wall time", f"{result['probe_s']:.1f} s ({result['ms_per_block']:.0f} ms/block, "
                                f"{result['tokens_per_s']:.0f} tokens/s)"),
            ("memory", memory), ("calibration NLL", f"{result['calib_nll']:.4f}"),
            ("probe output", f"{result['output_mib']:.1f} MiB")]
    if "baseline_ms_per_block" in result:
        rows.append(("plain fwd+bwd", f"{result['baseline_ms_per_block']:.0f} ms/block over "
                                      f"{result['baseline_blocks']} blocks (probe/plain = {result['overhead']:.2f}x), "
                                      f"peak {result['baseline_peak_mib']:.0f} MiB"))
    width = max(len(k) for k, _ in rows)
    return "\n".join([f"| {'what':<{width}} | value |", f"|{'-' * (width + 2)}|-------|",
                      *(f"| {k:<{width}} | {v} |" for k, v in rows)])


def main() -> None:
    """Parse arguments, run, print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--blocks", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--sample-rows", type=int, default=128)
    parser.add_argument("--baseline-blocks", type=int, default=4, help="blocks of plain fwd+bwd to time (0: skip)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/...)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: this torch sees no CUDA GPU")
    result = run(device, args.blocks, args.seqlen, args.sample_rows, args.baseline_blocks)
    result["command"] = " ".join(["python", "benchmarks/probe_bench.py", *sys.argv[1:]])
    print(table(result))
    out = args.out or REPO_ROOT / "benchmarks" / "results" / f"probe_bench_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
