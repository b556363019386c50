"""Codec throughput: how fast every format encodes, decodes and fake-quantizes a bf16 weight, next to memory copy.

Why: cost, polish and export call these codecs on every Linear of a model, so their speed bounds how long a
quantization run takes; memory-copy bandwidth on the same device and tensor size says how far each codec is from
the speed of merely touching the weight once. The same run checks the codec contract on that device:
`qdq(w)` must equal `decode(encode(w))` bit for bit, and on CUDA the encoded tensors must be byte-identical to the
CPU encode of the same weight (the bytes shipped must not depend on where the quantization ran).

Run from the repo root:  python benchmarks/codec_throughput.py [--device cpu|cuda] [--shapes 4096x4096 ...]
Throughput is GB/s (1e9 bytes) of bf16 weight: 2*numel bytes / time. Memory copy is `dst.copy_(src)` of a
same-size bf16 tensor, counted as bytes read only (read+write traffic is twice that).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from prismq.formats import FORMATS, Format, Tensors  # noqa: E402

GPU_SHAPES = ((4096, 4096), (4096, 14336))
CPU_SHAPES = ((2048, 2048), (2048, 5632))  # ~1 minute on 2 cores with the CPU repetition defaults
QUICK_SHAPES = ((1024, 1024),)
INPUT_AMAX = 4.0  # a calibrated input absmax, for the formats with a static input scale (NVFP4 W4A4)
WEIGHT_STD = 0.02  # typical std of an LLM Linear weight


@dataclass
class Row:
    """One format at one shape: median times, throughputs and the two correctness checks."""

    format: str
    shape: tuple[int, int]
    bits_per_weight: float
    encode_ms: float | None = None
    decode_ms: float | None = None
    qdq_ms: float | None = None
    encdec_gbps: float | None = None
    qdq_gbps: float | None = None
    qdq_over_copy: float | None = None  # qdq time / memory-copy time
    qdq_matches_decode_encode: bool | None = None
    qdq_mismatch: str | None = None
    encode_matches_cpu: bool | None = None  # None: not checked (CPU run)
    encode_cpu_mismatch: str | None = None
    error: str | None = None


@dataclass
class ShapeResult:
    """Memory-copy bandwidth at one shape, and every format's row."""

    shape: tuple[int, int]
    copy_ms: float
    copy_read_gbps: float
    rows: list[Row] = field(default_factory=list)


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so wall-clock times cover the work and not just its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], Any], device: torch.device, warmup: int, reps: int) -> tuple[float, Any]:
    """Median wall time of `fn` over `reps` synchronized calls after `warmup` untimed ones; also its last result."""
    result = None
    for _ in range(warmup):
        result = fn()
    synchronize(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor (uint8, flat), so comparisons see -0 vs +0, NaN payloads, float8 codes."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def first_mismatch(got: torch.Tensor, want: torch.Tensor) -> str | None:
    """None when the two tensors are bit-identical; else where and how they first differ."""
    if got.dtype != want.dtype or tuple(got.shape) != tuple(want.shape):
        return f"dtype/shape {got.dtype}{tuple(got.shape)} vs {want.dtype}{tuple(want.shape)}"
    got, want = got.cpu(), want.cpu()
    element = max(got.element_size(), 1)
    differ = (bits(got).view(-1, element) != bits(want).view(-1, element)).any(dim=-1)
    count = int(differ.sum())
    if count == 0:
        return None
    flat = int(differ.nonzero()[0, 0])
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), got.shape)) if got.dim() else ()
    a, b = got.reshape(-1)[flat], want.reshape(-1)[flat]
    value = (lambda x: float(x.float())) if got.is_floating_point() else (lambda x: int(x))
    return f"{count}/{got.numel()} elements differ; first at {index}: {value(a)!r} vs {value(b)!r}"


def compare_tensors(got: Tensors, want: Tensors) -> str | None:
    """None when two encodings have the same keys and bit-identical tensors; else the first difference."""
    if set(got) != set(want):
        return f"keys {sorted(got)} vs {sorted(want)}"
    for key in sorted(want):
        problem = first_mismatch(got[key], want[key])
        if problem:
            return f"{key}: {problem}"
    return None


def encode_kwargs(fmt: Format) -> dict[str, Any]:
    """A calibrated input absmax for formats that need one; nothing for the others."""
    return {"input_amax": torch.tensor(INPUT_AMAX)} if fmt.quantizes_activations else {}


def bench_format(fmt: Format, weight: torch.Tensor, cpu_weight: torch.Tensor | None, copy_s: float,
                 warmup: int, reps: int) -> Row:
    """Time encode, decode and qdq of `weight` and run the correctness checks; an exception becomes `error`."""
    shape = (int(weight.shape[0]), int(weight.shape[1]))
    row = Row(fmt.name, shape, round(fmt.bits_per_weight(shape), 4))
    if not fmt.legal(shape):
        row.error = f"illegal shape: {fmt.illegal_reason(shape)}"
        return row
    device, weight_bytes, kwargs = weight.device, 2 * weight.numel(), encode_kwargs(fmt)
    stage = "encode"
    try:
        t_enc, encoded = median_seconds(lambda: fmt.encode(weight, **kwargs), device, warmup, reps)
        stage = "decode"
        t_dec, decoded = median_seconds(lambda: fmt.decode(encoded, weight.dtype), device, warmup, reps)
        stage = "qdq"
        t_qdq, fake = median_seconds(lambda: fmt.qdq(weight), device, warmup, reps)
        row.encode_ms, row.decode_ms, row.qdq_ms = 1e3 * t_enc, 1e3 * t_dec, 1e3 * t_qdq
        row.encdec_gbps = weight_bytes / (t_enc + t_dec) / 1e9
        row.qdq_gbps = weight_bytes / t_qdq / 1e9
        row.qdq_over_copy = t_qdq / copy_s
        stage = "qdq vs decode(encode)"
        row.qdq_mismatch = first_mismatch(fake, decoded)
        row.qdq_matches_decode_encode = row.qdq_mismatch is None
        if cpu_weight is not None:
            stage = "CPU reference encode"
            reference = fmt.encode(cpu_weight, **kwargs)
            row.encode_cpu_mismatch = compare_tensors(encoded, reference)
            row.encode_matches_cpu = row.encode_cpu_mismatch is None
    except Exception as exc:  # a failing code path is a result to report, not a reason to stop the table
        row.error = f"{stage}: {type(exc).__name__}: {exc}"
    return row


def bench_shape(shape: tuple[int, int], device: torch.device, warmup: int, reps: int) -> ShapeResult:
    """Memory copy and every format at one shape; on CUDA the CPU encode of the same weight is the reference."""
    generator = torch.Generator().manual_seed(shape[0] * 100003 + shape[1])
    cpu_weight = (torch.randn(shape, generator=generator) * WEIGHT_STD).to(torch.bfloat16)
    weight = cpu_weight.to(device)
    destination = torch.empty_like(weight)
    copy_s, _ = median_seconds(lambda out=destination: out.copy_(weight), device, warmup + 2, max(reps, 10))
    del destination
    result = ShapeResult(shape, 1e3 * copy_s, 2 * weight.numel() / copy_s / 1e9)
    reference = cpu_weight if device.type != "cpu" else None
    for fmt in FORMATS.values():
        result.rows.append(bench_format(fmt, weight, reference, copy_s, warmup, reps))
        print(f"  {shape[0]}x{shape[1]} {fmt.name}: done", file=sys.stderr, flush=True)
    return result


def device_name(device: torch.device) -> str:
    """The accelerator's name, or the CPU model and the threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model} ({torch.get_num_threads()} torch threads)"


def fmt_num(x: float | None, spec: str) -> str:
    """A number, or '-' where there is none."""
    return "-" if x is None else format(x, spec)


def check_cell(ok: bool | None) -> str:
    return "-" if ok is None else ("OK" if ok else "FAIL")


def table(results: list[ShapeResult], cuda: bool) -> str:
    """A plain-text table, one block per shape, headed by that shape's memory-copy bandwidth."""
    header = ["format", "bpw", "enc ms", "dec ms", "enc+dec GB/s", "qdq ms", "qdq GB/s", "qdq/copy",
              "qdq==dec(enc)"] + (["enc==cpu"] if cuda else [])
    lines = ["GB/s = bf16 weight bytes (2*numel) / time. copy = dst.copy_(src) of the same bf16 tensor, "
             "GB/s of bytes READ (read+write traffic is 2x). qdq/copy = qdq time / copy time."]
    for result in results:
        rows = [header]
        for r in result.rows:
            cells = [r.format, f"{r.bits_per_weight:.2f}", fmt_num(r.encode_ms, ".2f"), fmt_num(r.decode_ms, ".2f"),
                     fmt_num(r.encdec_gbps, ".2f"), fmt_num(r.qdq_ms, ".2f"), fmt_num(r.qdq_gbps, ".2f"),
                     fmt_num(r.qdq_over_copy, ".0f") + ("x" if r.qdq_over_copy is not None else ""),
                     "ERROR" if r.error else check_cell(r.qdq_matches_decode_encode)]
            if cuda:
                cells.append("ERROR" if r.error else check_cell(r.encode_matches_cpu))
            rows.append(cells)
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        shape = f"{result.shape[0]}x{result.shape[1]}"
        lines.append("")
        lines.append(f"shape {shape}: copy {result.copy_ms:.3f} ms = {result.copy_read_gbps:.1f} GB/s (bytes read)")
        for i, row in enumerate(rows):
            lines.append("| " + " | ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in
                                            enumerate(zip(row, widths))) + " |")
            if i == 0:
                lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def failures(results: list[ShapeResult]) -> list[str]:
    """One line per error or mismatch, with the format, the shape and what differed."""
    out = []
    for result in results:
        for r in result.rows:
            where = f"{r.format} @ {r.shape[0]}x{r.shape[1]}"
            if r.error:
                out.append(f"{where}: ERROR {r.error}")
            if r.qdq_matches_decode_encode is False:
                out.append(f"{where}: qdq != decode(encode): {r.qdq_mismatch}")
            if r.encode_matches_cpu is False:
                out.append(f"{where}: CUDA encode differs from CPU encode: {r.encode_cpu_mismatch}")
    return out


def parse_shape(text: str) -> tuple[int, int]:
    """'4096x14336' -> (4096, 14336)."""
    try:
        out, inp = (int(part) for part in text.lower().split("x"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"shape must look like 4096x4096, got {text!r}") from exc
    return out, inp


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table, write the JSON; exit status 1 if any check failed or a codec raised."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", type=parse_shape, nargs="+",
                        help=f"weight shapes OUTxIN (default: {GPU_SHAPES} on cuda, {CPU_SHAPES} on cpu)")
    parser.add_argument("--quick", action="store_true", help=f"smoke test: shapes {QUICK_SHAPES}, 1 warmup, 3 reps")
    parser.add_argument("--warmup", type=int, help="untimed calls before timing (default: 3 cuda, 1 cpu)")
    parser.add_argument("--reps", type=int, help="timed calls, median reported (default: 20 cuda, 5 cpu)")
    parser.add_argument("--threads", type=int, help="CPU intra-op threads (default: torch's own choice); on a "
                        "small VM one thread can be faster and far steadier than two")
    parser.add_argument("--json", type=Path, help="where to write results "
                        "(default: benchmarks/results/codec_throughput_<device>.json)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    cuda = device.type == "cuda"
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    shapes = args.shapes or (QUICK_SHAPES if args.quick else GPU_SHAPES if cuda else CPU_SHAPES)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3 if cuda else 1)
    reps = args.reps if args.reps is not None else (3 if args.quick else 20 if cuda else 5)
    json_path = args.json or REPO_ROOT / "benchmarks" / "results" / f"codec_throughput_{device.type}.json"

    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])]),
            "device": device.type, "device_name": device_name(device), "torch": torch.__version__,
            "python": platform.python_version(), "cpu_threads": torch.get_num_threads(), "warmup": warmup,
            "reps": reps, "input_amax": INPUT_AMAX,
            "weight": f"randn * {WEIGHT_STD}, bf16", "gb": "1e9 bytes",
            "copy_gbps": "dst.copy_(src), bytes read only"}
    print(f"device: {meta['device_name']} ({device.type}); torch {meta['torch']}; python {meta['python']}")
    print(f"shapes: {', '.join(f'{o}x{i}' for o, i in shapes)}; warmup {warmup}, median of {reps}")

    start = time.perf_counter()
    results = [bench_shape(shape, device, warmup, reps) for shape in shapes]
    meta["wall_s"] = round(time.perf_counter() - start, 1)

    print(table(results, cuda))
    problems = failures(results)
    print(f"\nchecks: {'all OK' if not problems else f'{len(problems)} FAILED'} ({meta['wall_s']} s)")
    for line in problems:
        print(f"  FAIL {line}")

    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({"meta": meta, "results": [asdict(r) for r in results],
                                     "failures": problems}, indent=2) + "\n")
    print(f"wrote {json_path}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
