"""Selection on measured KL (SCOUT) against the surrogate's mix and the uniform formats, per budget, on a real model.

Why: the select stage exists to beat the knapsack's mix chosen on predicted costs; this measures by how much, on
the report split no decision saw, and what it costs. For each --target-bits value, `prismq quantize` runs with the
default selection into one shared work directory (probe and cost are measured once). The round stage rounds the
selected mix and measures the knapsack's own mix and every uniform format that fits the same bytes as variants of
it (the units where they differ rounded by the same method on the mix's calibration inputs, the rest the mix's
tensors), all on the selection and report splits, so one run per budget gives the whole row.

Per budget the table states bits per parameter and bytes of each, report-split mean KL, p99.9 KL and same-top-1,
the polish's moves kept (the shipped export's KL is after the polish), the select stage's seconds per level (L2,
L3, the validated frontier with its number of candidates, each a full forward), the polish's seconds, and the flips
measured with their cost in full forwards (a flip at layer k of L re-runs L - k layers: (L - k) / L of a forward,
plus its share of the head).

With `--extra "--select-units N"` for N at least the number of decision units, L3 measures every unit's every
other format, and the last column states what those measurements promise at best: the mix of least summed measured
change in the base's bytes (the allocator's exact knapsack on measured costs), as the selection-split KL it would
have if single flips added up, and that KL over the base's. Being a minimum over noisy estimates it is optimistic;
a budget where even it is far from a target ratio cannot reach that ratio by re-selecting among these formats. The
JSON also gives the correlation of the surrogate's predicted changes with the measured ones over the flips
(`surrogate_correlation`).

Run from the repo root:
    python benchmarks/select_bench.py [--bits 4.75,5.0,5.5,6.0,8.25] [--rounding gptq+sweep] [--work-dir DIR]
        [--calib FILE] [--heldout FILE] [--device cpu] [--model MODEL | --synthetic LAYERS,HIDDEN,INTERMEDIATE]
        [--extra "more quantize flags"]
Writes benchmarks/results/select_bench.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
DATA = REPO_ROOT.parent / "shared" / "data"

from prismq.allocate.knapsack import solve  # noqa: E402
from prismq.cli import main as prismq_main  # noqa: E402

LAYER = re.compile(r"\.layers\.(\d+)\.")


def _row(work: Path, bits: float, seconds: float) -> dict[str, Any]:
    """One budget's numbers from the work directory's artifacts."""
    summary = json.loads((work / "summary.json").read_text())
    rounding = json.loads((work / "rounding.json").read_text())["rounding"]
    selection = json.loads((work / "selection.json").read_text())["selection"]
    allocation = json.loads((work / "allocation.json").read_text())["allocation"]
    layers = summary.get("layers") or 1 + max(int(m.group(1)) for n in summary["assignment"]
                                              if (m := LAYER.search(n)))
    forwards = sum((layers - int(LAYER.search(f["unit"][0]).group(1))) / layers for f in selection["flips"])
    report = {"selected": rounding["mix_report"], **rounding["baseline_reports"]}
    if "knapsack mix" not in report:  # selection kept the knapsack's mix
        report["knapsack mix"] = rounding["mix_report"]
    uniform = {name: report[name] for name in allocation["baselines"]}
    best_uniform = min(uniform, key=lambda n: uniform[n]["mean_kl"]) if uniform else None
    return {"target_bits": bits, "bits_per_param": summary["bits_per_param"],
            "linear_bytes": summary["linear_bytes"], "checkpoint_bytes": summary["checkpoint_bytes"],
            "shipped": rounding["shipped"], "units_changed": len(selection["changed"]),
            "flips": len(selection["flips"]), "flip_forwards": round(forwards, 2),
            "select_seconds": summary["seconds"].get("select"), "run_seconds": round(seconds, 1),
            "level_seconds": selection.get("seconds", {}), "frontier_candidates": len(selection.get("frontier", [])),
            "report": {name: {k: r[k] for k in ("mean_kl", "p999_kl", "same_top1", "tokens")}
                       for name, r in report.items()},
            "uniform_bits": {name: bits for name, (_, bits) in allocation["baselines"].items()},
            "best_uniform": best_uniform, "export_report_kl": summary["eval"]["mean_kl"],
            "polish": _polish(work), "polish_seconds": summary["seconds"].get("polish"),
            "additive_best": _additive_best(selection), "surrogate_correlation": _correlation(selection["flips"])}


def _correlation(flips: list[dict[str, Any]]) -> float | None:
    """Pearson correlation of the surrogate's predicted change with the measured one over L3's flips."""
    if len(flips) < 3:
        return None
    return float(np.corrcoef([f["predicted_delta"] for f in flips], [f["measured_delta_kl"] for f in flips])[0, 1])


def _additive_best(selection: dict[str, Any]) -> dict[str, float] | None:
    """What L3's own single-flip measurements promise at best, when they cover every unit (`--select-units` at least
    the number of units): the mix of least summed measured change within the base's bytes, solved exactly as the
    allocator does, as (its selection-split KL if flips added up, that KL over the base's). An optimistic bound on
    what any re-selection from these measurements can reach: the minimum over noisy estimates is biased low."""
    options: dict[tuple[str, ...], dict[str, tuple[float, int]]] = {}
    for flip in selection["flips"]:
        unit = tuple(flip["unit"])
        options.setdefault(unit, {flip["from"]: (0.0, 0)})[flip["to"]] = (flip["measured_delta_kl"],
                                                                         flip["bytes_delta"])
    if not selection.get("decision_units") or len(selection["units"]) < selection["decision_units"]:
        return None  # L3 left units unmeasured (or the run predates the count)
    formats = sorted({f for unit in options.values() for f in unit})
    cost = np.full((len(options), len(formats)), np.inf)
    size = np.zeros((len(options), len(formats)), dtype=np.int64)
    for u, unit in enumerate(options.values()):
        low = min(b for _, b in unit.values())  # sizes relative to the unit's smallest option: all non-negative
        for name, (delta, extra) in unit.items():
            cost[u, formats.index(name)], size[u, formats.index(name)] = delta, extra - low
    room = int(-sum(min(b for _, b in unit.values()) for unit in options.values()))
    best = solve(cost, size, room)
    base = selection["base_kl"]["mean_kl"]
    return {"kl": base + best.cost, "ratio": (base + best.cost) / base}


def _polish(work: Path) -> dict[str, Any] | None:
    """The polish's moves kept and its selection-split KL before and after (None when it did not run)."""
    path = work / "polish.json"
    if not path.exists():
        return None
    polish = json.loads(path.read_text())["polish"]
    return {"mode": polish["mode"], "start_kl": polish["start_kl"], "final_kl": polish["final_kl"],
            "kept": [r["kept"] for r in polish["rounds"] if r["kept"]], "stopped": polish["stopped"],
            "flips": sum(len(r["flips"]) for r in polish["rounds"])}


def _ratio(best: dict[str, float] | None) -> str:
    """The additive best as 'KL (ratio)', or '-' when the flips did not cover every unit."""
    return f"{best['kl']:.5f} ({best['ratio']:.3f})" if best else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", default="4.75,5.0,5.5,6.0,8.25")
    parser.add_argument("--rounding", default="gptq+sweep")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/prismq-select-bench/work"))
    parser.add_argument("--calib", default=str(DATA / "wikitext-2-valid-tokenized.txt"))
    parser.add_argument("--heldout", default=str(DATA / "wikitext-2-raw-test.txt"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", help="MODEL to quantize (default: the embedded SmolLM2-135M)")
    parser.add_argument("--synthetic", metavar="LAYERS,HIDDEN,INTERMEDIATE",
                        help="quantize a Llama-shaped model of random bf16 weights of these sizes instead (written "
                        "beside the work directory by streaming_memory.write_synthetic)")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer directory of --synthetic (default: the embedded "
                        "model's)")
    parser.add_argument("--extra", default="", help="more quantize flags, space-separated")
    parser.add_argument("--json", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "select_bench.json")
    args = parser.parse_args()
    model = [args.model] if args.model else []
    if args.synthetic:
        from streaming_memory import write_synthetic  # this script's folder is on sys.path

        layers, hidden, intermediate = (int(v) for v in args.synthetic.split(","))
        path = args.work_dir.parent / f"synthetic-{layers}x{hidden}x{intermediate}"
        if not (path / "config.json").exists():
            write_synthetic(path, layers, hidden, intermediate, args.tokenizer)
        model = [str(path)]
    rows = []
    for bits in (float(b) for b in args.bits.split(",")):
        out = args.work_dir.parent / f"out-{bits}"
        started = time.perf_counter()
        code = prismq_main(["quantize", "--target-bits", str(bits), "--work-dir", str(args.work_dir), "--out",
                            str(out), "--overwrite", "--rounding", args.rounding, "--calib", args.calib,
                            "--heldout", args.heldout, "--device", args.device, *model, *args.extra.split()])
        if code != 0:
            sys.exit(f"quantize --target-bits {bits} failed ({code})")
        rows.append(_row(args.work_dir, bits, time.perf_counter() - started))
        print(json.dumps(rows[-1]), flush=True)
    print("| target bits | bpp | units changed | knapsack mix KL | selected mix KL | shipped | polish moves | "
          "shipped export KL | ratio to knapsack | best uniform (bpp) KL | selected p99.9 / same top-1 | "
          "flips (forwards) | select s (L2 / L3 / frontier, candidates) | polish s | flips' additive best / base |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        rep, best = r["report"], r["best_uniform"]
        uniform = (f"{best} ({r['uniform_bits'][best]:.3f}) {rep[best]['mean_kl']:.5f}" if best else "none fits")
        levels = " / ".join(str(r["level_seconds"].get(level, "-")) for level in ("L2", "L3", "frontier"))
        print(f"| {r['target_bits']} | {r['bits_per_param']:.3f} | {r['units_changed']} | "
              f"{rep['knapsack mix']['mean_kl']:.5f} | {rep['selected']['mean_kl']:.5f} | {r['shipped']} | "
              f"{len(r['polish']['kept']) if r['polish'] else '-'} | {r['export_report_kl']:.5f} | "
              f"{r['export_report_kl'] / max(rep['knapsack mix']['mean_kl'], 1e-12):.3f} | {uniform} | "
              f"{rep['selected']['p999_kl']:.4f} / {rep['selected']['same_top1']:.2%} | "
              f"{r['flips']} ({r['flip_forwards']}) | {r['select_seconds']} ({levels}, {r['frontier_candidates']}) | "
              f"{r['polish_seconds']} | {_ratio(r['additive_best'])} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"settings": vars(args) | {"json": str(args.json), "work_dir": str(args.work_dir)},
                                     "rows": rows}, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
