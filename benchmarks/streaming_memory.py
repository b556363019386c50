"""Peak memory of `prismq quantize` against the model's depth: the model must never be loaded whole.

Why: prismq's users bring 8B-671B models to one GPU box or a 128 GB machine, so every stage streams the decoder
layers from disk and keeps only hidden states resident. This writes synthetic Llama-shaped checkpoints (random
bf16 weights, the embedded model's tokenizer and vocabulary, the same width at several depths), runs
`prismq quantize --target-bits 4.75` on each in a fresh process, and reports that process's peak resident memory
(and peak GPU memory on CUDA) next to the checkpoint's size. Flat in the number of layers, and a fraction of the
checkpoint, is the target. Text sizes are small (`--calib-blocks`, `--calib-seqlen`): memory, not quality, is
measured here.

Run from the repo root:
    python benchmarks/streaming_memory.py [--layers 8,16,32] [--hidden 2048] [--intermediate 8192]
        [--experts 0] [--rounding gptq+sweep] [--rounding-largest rtn] [--device cpu] [--scratch /tmp/prismq-streaming]
Writes benchmarks/results/streaming_memory.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from prismq.export.shards import ShardWriter  # noqa: E402
from prismq.model.source import resolve_model  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")

# Runs the CLI in this child and reports its own peak memory (ru_maxrss is in KB on Linux).
CHILD = """
import resource, sys, torch
from prismq.cli import main
code = main(sys.argv[1:])
gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
print(f"PEAK {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss} {gpu}")
sys.exit(code)
"""


def write_synthetic(path: Path, layers: int, hidden: int, intermediate: int, tokenizer: Path | None,
                    seed: int = 0, experts: int = 0) -> int:
    """A Llama-shaped checkpoint of random bf16 weights written tensor by tensor (never whole in memory), with
    the tokenizer of `tokenizer` (a directory; None: the embedded model's); returns its bytes of tensor data.
    `experts` > 0: Qwen3-MoE-shaped instead, `experts` routed experts of `intermediate` per layer (8 per token),
    stored per expert as released MoE checkpoints are."""
    from transformers import AutoTokenizer, LlamaConfig, Qwen3MoeConfig

    source = tokenizer or resolve_model(None)
    vocab = len(AutoTokenizer.from_pretrained(source))
    heads = hidden // 128
    shape = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                 num_key_value_heads=max(1, heads // 4), vocab_size=vocab, max_position_embeddings=4096,
                 tie_word_embeddings=False, dtype="bfloat16")
    config = Qwen3MoeConfig(moe_intermediate_size=intermediate, num_experts=experts, num_experts_per_tok=8,
                            head_dim=128, **shape) if experts else LlamaConfig(intermediate_size=intermediate, **shape)
    return write_random_checkpoint(path, config, source, seed)


def write_random_checkpoint(path: Path, config, tokenizer: Path, seed: int = 0) -> int:
    """The checkpoint of `config` with random bf16 weights (N(0, 0.02); norms 1; a tied head not stored) and the
    tokenizer files of directory `tokenizer`, written tensor by tensor (never whole in memory); its bytes of
    tensor data. Routed experts are stored per expert, as released MoE checkpoints are."""
    from transformers import AutoModelForCausalLM

    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    config.save_pretrained(path)
    for name in TOKENIZER_FILES:
        if (tokenizer / name).exists():
            shutil.copy2(tokenizer / name, path / name)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    generator = torch.Generator().manual_seed(seed)
    writer = ShardWriter(path, 2 * 10**9)
    for name, tensor in skeleton.state_dict().items():
        if name == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
            continue
        for stored, shape in _stored_parts(name, tuple(tensor.shape)):
            if stored.endswith("norm.weight"):
                value = torch.ones(shape, dtype=torch.bfloat16)
            else:
                value = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
            writer.add(stored, value)
    return writer.close()


def _stored_parts(name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
    """How a Qwen3-MoE checkpoint stores parameter `name`: fused expert parameters as per-expert matrices."""
    block, _, leaf = name.rpartition(".experts.")
    if leaf == "gate_up_proj":
        return [(f"{block}.experts.{e}.{p}.weight", (shape[1] // 2, shape[2])) for e in range(shape[0])
                for p in ("gate_proj", "up_proj")]
    if leaf == "down_proj":
        return [(f"{block}.experts.{e}.down_proj.weight", shape[1:]) for e in range(shape[0])]
    return [(name, shape)]


def measure(model: Path, out: Path, rounding: str, args: argparse.Namespace) -> dict:
    """One `prismq quantize` in a fresh process: wall seconds, peak RSS and peak GPU bytes."""
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out.with_name(out.name + ".work"), ignore_errors=True)
    command = [sys.executable, "-c", CHILD, "quantize", str(model), "--target-bits", "4.75", "--rounding", rounding,
               "--calib-blocks", str(args.calib_blocks), "--rounding-blocks", str(args.calib_blocks),
               "--calib-seqlen", str(args.calib_seqlen), "--heldout-blocks", str(args.heldout_blocks),
               "--device", args.device, "--max-shard-size", "1GB", "--out", str(out)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT)
    seconds = time.perf_counter() - started
    peak = [line.split() for line in done.stdout.splitlines() if line.startswith("PEAK ")]
    if done.returncode or not peak:
        raise SystemExit(f"prismq quantize failed ({done.returncode}):\n{done.stderr[-3000:]}")
    # prismq resets the resident high-water mark at each stage (its per-stage peaks in summary.json), and Linux's
    # ru_maxrss follows that reset: the run's peak is the largest of the stages' peaks and ru_maxrss
    stages = json.loads((out.with_name(out.name + ".work") / "summary.json").read_text())["peak_memory_gb"]
    stage_peak = max((int(p["host"] * 1e9) for p in stages.values()), default=0)
    gpu_peak = max((int(p.get("gpu", 0) * 1e9) for p in stages.values()), default=0)  # reset per stage too
    return {"seconds": round(seconds, 1), "peak_rss_bytes": max(int(peak[-1][1]) * 1024, stage_peak),
            "peak_gpu_bytes": max(int(peak[-1][2]), gpu_peak),
            "peak_host_by_stage_gb": {k: p["host"] for k, p in stages.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="8,16,32")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=8192)
    parser.add_argument("--rounding", default="gptq+sweep")
    parser.add_argument("--rounding-largest", default="rtn", help="rounding for the deepest model (GPTQ on a CPU "
                        "takes long there; memory is what is measured)")
    parser.add_argument("--calib-blocks", type=int, default=4)
    parser.add_argument("--calib-seqlen", type=int, default=256)
    parser.add_argument("--heldout-blocks", type=int, default=2)
    parser.add_argument("--experts", type=int, default=0, help="routed experts per layer (Qwen3-MoE-shaped, "
                        "--intermediate per expert); 0: a dense Llama")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/prismq-streaming"))
    parser.add_argument("--tokenizer", type=Path, help="directory with the tokenizer files (default: the embedded "
                        "model's; where it is not installed, e.g. on a GPU machine without network, carry them)")
    parser.add_argument("--json", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "streaming_memory.json")
    args = parser.parse_args()
    depths = [int(v) for v in args.layers.split(",")]
    rows = []
    for layers in depths:
        model = args.scratch / f"{'moe' if args.experts else 'llama'}-{args.hidden}-{layers}L"
        size = write_synthetic(model, layers, args.hidden, args.intermediate, args.tokenizer, experts=args.experts)
        rounding = args.rounding_largest if layers == max(depths) and len(depths) > 1 else args.rounding
        result = measure(model, args.scratch / f"out-{layers}L", rounding, args)
        rows.append({"layers": layers, "hidden": args.hidden, "intermediate": args.intermediate,
                     "experts": args.experts, "checkpoint_bytes": size, "rounding": rounding, **result})
        shutil.rmtree(model, ignore_errors=True)
        print(f"{layers} layers: {result}", flush=True)
    print("| layers | experts | checkpoint GB | rounding | peak RSS GB | RSS / checkpoint | peak GPU GB | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['layers']} | {row['experts']} | {row['checkpoint_bytes'] / 1e9:.2f} | {row['rounding']} | "
              f"{row['peak_rss_bytes'] / 1e9:.2f} | {row['peak_rss_bytes'] / row['checkpoint_bytes']:.2f} | "
              f"{row['peak_gpu_bytes'] / 1e9:.2f} | {row['seconds']} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": args.device, "calib_blocks": args.calib_blocks, "calib_seqlen": args.calib_seqlen,
            "heldout_blocks": args.heldout_blocks, "torch": torch.__version__}
    args.json.write_text(json.dumps({"settings": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
