"""The model card written into the exported checkpoint (README.md): what the checkpoint is, how it was chosen, how it
measures, and how to serve it, from the run's summary."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from prismq import __version__
from prismq.report import vision_lines

CARD = "README.md"


def _kl_table(rows: dict[str, dict[str, Any]]) -> list[str]:
    """A markdown table of KL statistics, one row per named result."""
    lines = ["| | mean KL | median | p99 | p99.9 | max | same top-1 | PPL ratio |", "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['mean_kl']:.5f} | {r['median_kl']:.5f} | {r['p99_kl']:.4f} | {r['p999_kl']:.4f} "
                     f"| {r['max_kl']:.3f} | {r['same_top1']:.2%} | {r['ppl_ratio']:.4f} |")
    return lines


def model_card(summary: dict[str, Any], assignment: dict[str, str], frontier: dict[str, Any] | None) -> str:
    """The card's markdown: precision mix, per-format counts, bits per parameter and size, the predicted frontier,
    KL statistics on the report text (the exported checkpoint and the alternatives of the same budget), how the
    mix was selected, and the serve command."""
    counts = Counter(assignment.values())
    out = Path(summary["out"])
    selection = summary.get("selection") or {}
    lines = [
        f"# {out.name}", "",
        f"A mixed-precision compressed-tensors checkpoint of `{summary['model']}` made by prismq {__version__}: each "
        "Linear (and each layer's routed experts) takes its own number format, chosen on measured KL.", "",
        "```", f"vllm serve {out.name} --quantization compressed-tensors", "```", "",
        "## Precision mix", "",
        f"- {summary['linear_params']:,} quantizable weights in {len(assignment)} matrices: "
        f"**{summary['bits_per_param']:.4f} bits per parameter** ({summary['linear_bytes']:,} bytes, every scale "
        "counted)",
        f"- whole checkpoint: {summary['checkpoint_bytes'] / 1e9:.4f} GB of tensors",
        f"- budget: {summary['budget']}",
        f"- kept unquantized: {', '.join(summary['kept'])}",
        *vision_lines(summary.get("vision") or {}), "",
        "| format | matrices | bytes | bits/param |", "|---|---|---|---|",
        *(f"| {f} | {counts[f]} | {b['bytes']:,} | {8 * b['bytes'] / b['params']:.3f} |"
          for f, b in summary["per_format"].items()), "",
        "## Quality on held-out text", "",
        f"KL divergence against the source model over the full vocabulary at every position of "
        f"{summary['eval']['tokens']} report tokens (text disjoint from calibration and from the selection text every "
        "decision was measured on), the checkpoint read back by compressed-tensors:", "",
        *_kl_table({"this checkpoint": summary["eval"]}), "",
    ]
    rounding = summary.get("rounding") or {}
    reports = {(name if name == "knapsack mix" else f"uniform {name}"): r
               for name, r in (summary.get("alternatives_report") or {}).items()}
    if reports:
        lines += ["The alternatives of the same budget, as variants of the mix (the units where they differ "
                  f"rounded by {rounding.get('chosen', 'n/a')} on the mix's calibration inputs, the rest with the "
                  "mix's tensors), on the same report tokens:", "", *_kl_table(reports), ""]
    if selection:
        lines += ["## How the mix was chosen", "",
                  f"Selection: {selection['mode']}"
                  + (f"; {selection['units_measured']} units measured end to end ({selection['flips_measured']} "
                     f"alternatives), {selection['units_changed']} changed from the surrogate's knapsack"
                     if selection["mode"] == "measured" else " (the knapsack on predicted costs)")
                  + f"; shipped: {selection.get('shipped', 'mix')}; rounding: {rounding.get('chosen', 'n/a')}"
                  + _polish_note(selection.get("polish") or {}) + ".", ""]
    measured = selection.get("frontier") or []
    if measured:
        lines += ["## Measured frontier (selection text, round-to-nearest weights)", "",
                  "| candidate | bits/param | mean KL | on the measured front |", "|---|---|---|---|",
                  *(f"| {p['name']} | {p['bits']:.3f} | {p['mean_kl']:.5f} | {'yes' if p['on_front'] else ''} |"
                    for p in sorted(measured, key=lambda p: p["bits"])), ""]
    if frontier and frontier.get("points"):
        points = [p for k, p in enumerate(frontier["points"])
                  if k == 0 or p["bits_per_param"] != frontier["points"][k - 1]["bits_per_param"]]
        lines += ["## Predicted frontier (knapsack on predicted costs)", "",
                  "| bits/param | predicted delta-loss | units per format |", "|---|---|---|",
                  *(f"| {p['bits_per_param']:.3f} | {p['predicted_dloss']:.5g} | "
                    + ", ".join(f"{f} {n}" for f, n in (p.get("units_per_format") or {}).items() if n) + " |"
                    for p in points), ""]
    return "\n".join(lines)


def write_model_card(out: Path, summary: dict[str, Any], assignment: dict[str, str],
                     frontier: dict[str, Any] | None) -> Path:
    """Write README.md into the exported checkpoint directory; returns its path."""
    path = Path(out) / CARD
    path.write_text(model_card(summary, assignment, frontier))
    return path


def _polish_note(polish: dict[str, Any]) -> str:
    """The card's clause on the polish: moves kept and the selection-text KL before and after."""
    if polish.get("mode") != "polished":
        return ""
    kept = sum(1 for r in polish.get("rounds", []) if r.get("kept"))
    return (f"; polish on the shipped weights: {kept} move(s) kept, selection-text mean KL "
            f"{polish['start_kl']:.5f} -> {polish['final_kl']:.5f}")
