"""report.md and summary.json of a `prismq quantize` run: what was chosen, what it costs, how it measures."""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from prismq.artifacts import write_json

_LAYER = re.compile(r"^(.*?layers)\.(\d+)\.(.+)$")


def layer_table(assignment: dict[str, str]) -> str:
    """A markdown table: one row per layer, one column per Linear role (e.g. self_attn.q_proj), the chosen format."""
    rows: dict[int, dict[str, str]] = defaultdict(dict)
    roles: list[str] = []
    others: list[tuple[str, str]] = []
    for name, fmt in assignment.items():
        match = _LAYER.match(name)
        if match is None:
            others.append((name, fmt))
            continue
        role = match.group(3)
        if role not in roles:
            roles.append(role)
        rows[int(match.group(2))][role] = fmt
    lines = ["| layer | " + " | ".join(roles) + " |", "|---|" + "---|" * len(roles)]
    lines += [f"| {layer} | " + " | ".join(rows[layer].get(r, "") for r in roles) + " |" for layer in sorted(rows)]
    lines += [f"| {name} | {fmt} |" for name, fmt in others]
    return "\n".join(lines)


def vision_lines(vision: dict[str, Any]) -> list[str]:
    """The vision tower's line: its Linears' formats and bytes (not part of the allocation, nor measured)."""
    if not vision.get("linears"):
        return []
    formats = ", ".join(f"{count} {fmt}" for fmt, count in vision["linears"].items())
    how = "kept as stored" if set(vision["linears"]) == {"BF16"} else \
        "rounded to nearest and not measured (no images in the text splits)"
    return [f"- vision tower (`--vision-format {vision['format']}`): {formats} Linears; {vision['params']:,} weights, "
            f"{vision['bytes']:,} bytes = {8 * vision['bytes'] / max(vision['params'], 1):.3f} bits/param, {how}; "
            "not in the bits/param above"]


def _routed_expert_lines(experts: dict[str, Any]) -> list[str]:
    """The report's lines on routed experts: how many matrices, and the experts no calibration token reached."""
    if not experts.get("matrices"):
        return []
    idle = experts.get("without_tokens") or []
    line = f"- routed experts: {experts['matrices']:,} expert matrices quantized, each on the tokens routed to it"
    if idle:
        line += (f"; **{len(idle)} experts received no calibration token** (zero Fisher: they take their layer's "
                 f"format, rounded to the least weight error): {', '.join(idle[:8])}" + (" ..." if len(idle) > 8
                                                                                         else ""))
    return [line]


def _selection_lines(selection: dict[str, Any]) -> list[str]:
    """The report's section on how the mix was selected (surrogate only, or re-decided on measured KL)."""
    if not selection:
        return []
    if selection["mode"] != "measured":
        return ["## Selection", "", "The knapsack's mix on predicted costs (`--selection surrogate`).", ""]
    lines = ["## Selection (measured KL)", "",
             f"{selection['units_measured']} decision units the surrogate was least sure of were measured end to end "
             f"({selection['flips_measured']} alternative formats, each the full model's KL on the selection split "
             f"with only that unit changed); the knapsack was solved again on those measured costs "
             f"(surrogate costs rescaled by {selection['surrogate_scale'] or 1:.3g} to the measured scale) and "
             f"changed {selection['units_changed']} units. Details: selection.json."]
    frontier = selection.get("frontier") or []
    if frontier:
        knee = selection.get("knee") or {}
        lines += ["", "Candidates measured end to end on the selection split (round-to-nearest weights; the knapsack "
                  "on those costs at each budget): a point is on the measured front if it beats every cheaper one "
                  "by two standard errors. Shipped to rounding: the lowest KL within the budget "
                  f"(**{selection.get('chosen')}**); knee of the measured front: {knee.get('name')} "
                  f"({knee.get('bits', 0):.3f} bits/param, "
                  + ("stable when any other point is left out" if knee.get("stable") else
                     f"moves to {', '.join(knee.get('moved_to') or [])} when a point is left out") + ").", "",
                  "| candidate | bits/param | mean KL | stderr | predicted (rescaled) | on front |",
                  "|---|---|---|---|---|---|",
                  *(f"| {p['name']} | {p['bits']:.3f} | {p['mean_kl']:.5f} | {p['stderr']:.5f} | "
                    f"{p['predicted']:.5f} | {'yes' if p['on_front'] else ''} |"
                    for p in sorted(frontier, key=lambda p: p["bits"])), "",
                  "![measured frontier](frontier_measured.png)"]
    if selection.get("shipped") not in (None, "mix"):
        lines += [f"The round stage measured {selection['shipped']} better on the selection split and shipped it."]
    return lines + [""] + _polish_lines(selection.get("polish") or {})


def _polish_lines(polish: dict[str, Any]) -> list[str]:
    """The report's lines on the polish (coordinate descent on the weights as they ship)."""
    if polish.get("mode") != "polished":
        return []
    lines = ["### Polish (weights as they ship)", "",
             f"Each other format of the units the surrogate is least sure of, rounded exactly as it would ship, "
             f"measured on the selection split; a move (one flip, or two paying for each other's bytes) kept only "
             f"if it lowered the measured KL within the budget. Selection-split mean KL "
             f"{polish['start_kl']:.5f} -> {polish['final_kl']:.5f}; stopped: {polish['stopped']}.", ""]
    kept = [r["kept"] for r in polish.get("rounds", []) if r.get("kept")]
    lines += [f"- kept: {', '.join(f'{n} -> {f}' for n, f in k['changes'].items())} (KL {k['mean_kl']:.5f})"
              for k in kept] or ["- no move kept"]
    return lines + [""]


def write_report(work_dir: Path, summary: dict[str, Any], assignment: dict[str, str],
                 plot: Path | None) -> Path:
    """Write WORK/summary.json (machine-readable) and WORK/report.md (for people); return the report's path."""
    write_json(work_dir / "summary.json", "summary", {**summary, "assignment": assignment})
    s = summary
    counts = Counter(assignment.values())
    lines = [
        f"# prismq report: {s['model']}",
        "",
        "## Settings",
        "",
        *(f"- {key}: `{value}`" for key, value in s["settings"].items()),
        "",
        "## Result",
        "",
        f"- checkpoint: `{s['out']}` ({s['checkpoint_bytes'] / 1e9:.4f} GB of tensors in all)",
        f"- allocated Linears: {len(assignment)}, {s['linear_params']:,} weights, {s['linear_bytes']:,} bytes = "
        f"**{s['bits_per_param']:.4f} bits/param** (every scale and global scale counted)",
        *([f"- every quantizable weight, routed experts kept in the model dtype included: "
           f"{s['all_weights_bits_per_param']:.4f} bits/param over {s['all_weights_params']:,} weights"]
          if s.get("all_weights_params", s["linear_params"]) != s["linear_params"] else []),
        *_routed_expert_lines(s.get("routed_experts") or {}),
        *vision_lines(s.get("vision") or {}),
        f"- budget: {s['budget']}",
        f"- kept unquantized by policy: {', '.join(s['kept'])}",
        f"- computed in {s['compute_dtype']} on {s['device']} (forwards, backwards, KL; the shipped bytes do not "
        "depend on it; vLLM serves in bf16)",
        "",
        "| format | Linears | bytes | bits/param |",
        "|---|---|---|---|",
        *(f"| {f} | {counts[f]} | {b['bytes']:,} | {8 * b['bytes'] / b['params']:.3f} |"
          for f, b in s["per_format"].items()),
        "",
        "## Held-out KL of the exported checkpoint against the source",
        "",
        f"Loaded through transformers + compressed-tensors; {s['eval']['tokens']} tokens of the report split, "
        "disjoint from the calibration text and from the selection text every decision was measured on; full "
        "vocabulary, every position.",
        "",
        "| mean KL | median | p99 | p99.9 | max | same top-1 | PPL ref | PPL quant | PPL ratio |",
        "|---|---|---|---|---|---|---|---|---|",
        "| {mean_kl:.5f} | {median_kl:.5f} | {p99_kl:.4f} | {p999_kl:.4f} | {max_kl:.3f} | {same_top1:.2%} | "
        "{ppl_ref:.3f} | {ppl_quant:.3f} | {ppl_ratio:.4f} |".format(**s["eval"]),
        "",
    ]
    rounding = s.get("rounding")
    if rounding:
        lines += ["## Rounding", "", f"Shipped: **{rounding['chosen']}**."]
        if rounding["mean_kl"]:
            lines += ["Selection-split mean KL of each rounding of this assignment (the lowest ships): "
                      + ", ".join(f"{m} {kl:.5f}" for m, kl in rounding["mean_kl"].items()) + "."]
        if rounding["output_error_vs_rtn_geomean"] is not None:
            lines += [f"Per-Linear output error on the calibration inputs relative to round-to-nearest (geomean): "
                      f"{rounding['output_error_vs_rtn_geomean']:.3f}; Linears where GPTQ did not beat "
                      f"round-to-nearest and kept it: {rounding['rtn_kept']}."]
        lines += [""]
    lines += _selection_lines(s.get("selection") or {})
    if s.get("comparison"):
        lines += ["## Against the alternatives of the same budget", "", *s["comparison"], ""]
    if plot is not None:
        lines += ["## Frontier (predicted)", "", f"![frontier]({plot.name})", "",
                  f"Knee of the predicted frontier: {s.get('knee_bits', 'n/a')} bits/param; "
                  f"chosen point: {s['bits_per_param']:.3f} bits/param.", ""]
    if s.get("seconds"):
        peaks = s.get("peak_memory_gb") or {}
        gpu = any("gpu" in peak for peak in peaks.values())

        def memory(stage: str) -> str:
            peak = peaks.get(stage, {})
            host = f"{peak['host']:.2f}" if "host" in peak else "-"
            return f" {host} |" + (f" {peak['gpu']:.2f} |" if gpu and "gpu" in peak else " - |" if gpu else "")

        lines += ["## Time and memory", "", f"Wall seconds and peak memory per stage on {s['device']} "
                  f"({s['compute_dtype']}); stages resumed from the work directory count their reading only. Peak "
                  "host memory is the process's resident high-water mark during the stage.", "",
                  "| stage | seconds | peak host GB |" + (" peak GPU GB |" if gpu else ""),
                  "|---|---|---|" + ("---|" if gpu else ""),
                  *(f"| {stage} | {sec:.1f} |{memory(stage)}" for stage, sec in s["seconds"].items()),
                  f"| total | {sum(s['seconds'].values()):.1f} |" + (
                      f" {max((p['host'] for p in peaks.values()), default=0):.2f} |" if peaks else " - |")
                  + (f" {max((p.get('gpu', 0) for p in peaks.values()), default=0):.2f} |" if gpu else ""), ""]
    lines += ["## Formats per layer", "", layer_table(assignment), ""]
    path = work_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
