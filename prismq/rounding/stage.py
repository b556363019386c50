"""The round stage: the chosen mix in, the exact tensors to ship and their measured KL out.

The mix (the select stage's, else the knapsack's) is rounded, with the ranges stage's static input ranges, as one
lane of a streamed walk, by the last method asked for (gptq+sweep unless `--rounding` names another); with
`--rounding best`, rtn and gptq are variants of that lane, rounded on its calibration hidden states and Hessians
(one calibration pass), and the method with the lowest KL on the selection blocks is kept. The alternatives that fit
the same budget (the knapsack's own mix when selection changed it, the uniform baselines) are variants too, one per
method: the units where an alternative's tensors differ from the lane's are rounded by that method on the lane's
calibration hidden states and Hessians, every other unit keeps the lane's tensors (with the lane's own method the
mix's upgrades are a few percent of the weights, so this costs a fraction of a lane), and its held-out hidden
states branch off the lane's at its first difference. If one measures lower selection KL than the mix, it ships
instead, exactly as measured (predictions can misrank; measured KL decides). Then a second walk measures the kept
method's mix and its alternatives, with the tensors the first walk rounded, on the report (held-out) blocks, for the
report to state (no decision reads those numbers; the methods not kept are not walked over them). Writes
WORK/rounding.json (what ships, every KL measured), the walk's tensors under WORK/rounded/, and the reference's final
hidden states on the report blocks (WORK/reference_hidden) for the eval stage. Rerunning with the same inputs and
settings reuses all of it; an interrupted walk resumes from its last snapshot. On several processes (`--gpus N`)
every rank walks the mix, encoding its share of each layer's groups (`round_layer`); the leader keeps the tensors.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel

from prismq.allocate.stage import Allocation
from prismq.artifacts import fingerprint_model, fingerprint_tokens, read_current, read_tensors, write_json, \
    write_tensors
from prismq.config import QuantizeConfig
from prismq.engine.distributed import run_everywhere
from prismq.engine.memory import StageLog
from prismq.engine.walkstate import WalkState
from prismq.formats import Tensors
from prismq.model.source import resolve_device
from prismq.rounding.ranges import ranges_fingerprint, ranges_for
from prismq.rounding.gptq import GPTQSettings
from prismq.rounding.lanes import rounding_walk
from prismq.rounding.sequential import METHODS, Method, RoundedModel
from prismq.rounding.store import EncodedStore, variant_key
from prismq.select.shipped import RoundedVariants, VariantsKL, variants_walk

logger = logging.getLogger(__name__)

ROUNDING = "rounding"
REFERENCE_HIDDEN = "reference_hidden"


KNAPSACK_MIX = "knapsack mix"  # the allocate stage's mix, an alternative when selection changed it


class Rounding(BaseModel):
    """What the round stage measured and what ships: the methods' selection-split mean KL and the one kept, the
    output error of GPTQ relative to round-to-nearest, the input ranges, every KL measured (the mix and the
    alternatives, on the selection split and on the report split), and the shipped assignment with the directory of
    its tensors."""

    methods: list[str]
    mean_kl: dict[str, float]
    chosen: str
    output_error_vs_rtn_geomean: float | None
    rtn_kept: int
    input_amax: dict[str, float]
    mix_eval: dict[str, Any]
    baseline_evals: dict[str, dict[str, Any]]  # the alternatives: the knapsack's mix, uniform formats
    mix_report: dict[str, Any]
    baseline_reports: dict[str, dict[str, Any]]
    shipped: str  # "mix", or the alternative shipped instead
    assignment: dict[str, str]
    store: str


def _settings(config: QuantizeConfig) -> dict[str, Any]:
    return {key: getattr(config, key) for key in ("rounding", "rounding_blocks", "gptq_act_order", "gptq_damping",
                                                  "gptq_block_size")}


def assignment_fingerprint(assignment: dict[str, str]) -> str:
    """A short hash of an assignment (name -> format), independent of its order."""
    return hashlib.sha256(json.dumps(sorted(assignment.items())).encode()).hexdigest()[:16]


def stage_round(work: Path, config: QuantizeConfig, allocation: Allocation, model_dir: Path, dtype: torch.dtype,
                device: str, calibration: torch.Tensor, selection: torch.Tensor, report: torch.Tensor,
                log: StageLog, input_amax: dict[str, torch.Tensor], mix: dict[str, str] | None = None) -> Rounding:
    """Run (or resume) the round stage for `mix` (default: the allocation's own; see the module docstring);
    `input_amax`: the ranges stage's static input ranges (`prismq.rounding.ranges`)."""
    mix = mix or allocation.assignment
    alternatives = {**({KNAPSACK_MIX: allocation.assignment} if mix != allocation.assignment else {}),
                    **{name: allocation.baselines[name][0] for name in sorted(allocation.baselines)}}
    input_amax = ranges_for(input_amax, [mix, *alternatives.values()])
    expect = {"allocation": hashlib.sha256((work / "allocation.json").read_bytes()).hexdigest()[:16],
              "mix": assignment_fingerprint(mix), "settings": _settings(config),
              "dtype": str(dtype).removeprefix("torch."), "ranges": ranges_fingerprint(input_amax)}
    done = read_current(work / "rounding.json", ROUNDING, expect)
    if done is not None:
        return Rounding.model_validate(done["rounding"])
    settings = GPTQSettings(config.gptq_block_size, config.gptq_act_order, tuple(config.gptq_damping))
    methods = list(METHODS) if config.rounding == "best" else [config.rounding]
    primary = methods[-1]  # the lane; every other (method, assignment) is its variant, on its inputs and Hessians
    candidates = {"mix": mix, **alternatives}
    measured = [(m, name) for m in methods for name in candidates if (m, name) != (primary, "mix")]
    walk_expect = {**expect, "model": fingerprint_model(model_dir), "calibration": fingerprint_tokens(calibration),
                   "selection": fingerprint_tokens(selection), "report": fingerprint_tokens(report),
                   "device": resolve_device(device).type,
                   "variants": [f"{m}:{assignment_fingerprint(candidates[n])}" for m, n in measured]}  # walk order
    state = WalkState(work / "rounded" / "lanes.walk", walk_expect)
    spill_dir = work / "rounded" / "lanes"
    with log.stage("rounding + selection KL"):
        walk = run_everywhere(rounding_walk, model_dir=model_dir, dtype=dtype, device=device,
                              max_memory=config.max_memory_bytes, candidates=[(mix, primary)], calibration=calibration,
                              heldout=selection, input_amax=input_amax, settings=settings, spill_dir=spill_dir,
                              state=state, variants=[(0, candidates[n], m) for m, n in measured])
    walked = [(primary, "mix"), *measured]  # the walk's order: the lane, then its variants
    kl_of, rounded_of = dict(zip(walked, walk.kl)), dict(zip(walked, walk.rounded))
    kls = {m: kl_of[m, "mix"].mean_kl for m in methods}
    chosen = min(kls, key=kls.__getitem__)
    if len(methods) > 1:
        logger.info("rounding %s measured best (%s selection-split mean KL)", chosen,
                    ", ".join(f"{m} {kl:.5f}" for m, kl in kls.items()))
    ours = rounded_of[primary, "mix"].encoded  # a variant's store holds only where it differs from the lane
    if chosen != primary:
        ours = EncodedStore.overlay(work / "rounded" / "chosen", ours, rounded_of[chosen, "mix"].encoded)
    own = {name: (alternatives[name], rounded_of[chosen, name].encoded) for name in alternatives}
    with log.stage("report KL"):
        report_state = WalkState(work / "rounded" / "report.walk", {**walk_expect, "chosen": chosen})
        reported = _report_kl(model_dir, dtype, device, config.max_memory_bytes, mix, ours, own, report, chosen,
                              input_amax, settings, report_state)
    reference_report = torch.stack(reported.reference_hidden).cpu()
    write_tensors(work / REFERENCE_HIDDEN, REFERENCE_HIDDEN, {"hidden": reference_report},
                  reference_expect(model_dir, report, dtype))
    mix_eval, mix_report = kl_of[chosen, "mix"].to_json(), reported.kl[0].to_json()
    baseline_evals = {name: kl_of[chosen, name].to_json() for name in alternatives}
    baseline_reports = {name: r.to_json() for name, r in zip(alternatives, reported.kl[1:])}
    better = better_uniform(mix_eval["mean_kl"], {n: b["mean_kl"] for n, b in baseline_evals.items()})
    shipped = better or "mix"
    store = spill_dir / "candidate-0" if chosen == primary else work / "rounded" / "chosen"
    if better is not None:
        logger.info("the mix measured worse on the selection split (mean KL %.5f) than %s in the same bytes (%.5f): "
                    "shipping %s instead", mix_eval["mean_kl"], shipped, baseline_evals[shipped]["mean_kl"], shipped)
        store = work / "rounded" / "alternative"
        EncodedStore.overlay(store, ours, own[shipped][1])
    result = Rounding(methods=methods, mean_kl=kls if len(methods) > 1 else {}, chosen=chosen,
                      **_error_summary(rounded_of[chosen, "mix"]),
                      input_amax={n: float(v) for n, v in input_amax.items()},
                      mix_eval=mix_eval, baseline_evals=baseline_evals, mix_report=mix_report,
                      baseline_reports=baseline_reports, shipped=shipped,
                      assignment=mix if shipped == "mix" else alternatives[shipped], store=str(store))
    write_json(work / "rounding.json", ROUNDING, {**expect, "rounding": result.model_dump()})
    state.clear()
    report_state.clear()
    return result


def _report_kl(model_dir: Path, dtype: torch.dtype, device: str, max_memory: int | None, mix: dict[str, str],
               tensors: Mapping[str, Tensors], alternatives: dict[str, tuple[dict[str, str], Mapping[str, Tensors]]],
               report: torch.Tensor, method: Method, input_amax: dict[str, torch.Tensor], settings: GPTQSettings,
               state: WalkState) -> VariantsKL:
    """The report-split KL of the mix (with `tensors`, the kept lane's) and of each alternative (the mix's tensors
    with the alternative's own, `(assignment, its tensors where it differs)`), in that order, and the reference's
    final hidden states on those blocks: one walk with the tensors already rounded, nothing rounded again."""
    changes = [{n: f for n, f in assignment.items() if f != mix[n]} for assignment, _ in alternatives.values()]
    store = RoundedVariants({variant_key(n, f): (own, n) for change, (_, own) in zip(changes, alternatives.values())
                             for n, f in change.items()})
    walked = [change for change in changes if change]
    measured = run_everywhere(variants_walk, model_dir=model_dir, dtype=dtype, device=device, max_memory=max_memory,
                              base=mix, base_tensors=tensors, variants=walked, blocks=report, calibration=None,
                              method=method, input_amax=input_amax, settings=settings, store=store, state=state)
    kls = iter(measured.kl[1:])
    # an alternative equal to the mix measures what the mix does
    return VariantsKL([measured.kl[0], *(next(kls) if change else measured.kl[0] for change in changes)],
                      measured.reference_hidden)


def better_uniform(mixed_kl: float, uniform_kl: dict[str, float]) -> str | None:
    """The alternative (a uniform format, the knapsack's own mix) to ship instead of the mix: the one with the lowest
    measured KL, when it is lower than the mix's (predictions can misrank; measured KL decides). None when the mix
    measures best."""
    if not uniform_kl:
        return None
    best = min(uniform_kl, key=uniform_kl.__getitem__)
    return best if uniform_kl[best] < mixed_kl else None


def reference_expect(model_dir: Path, heldout: torch.Tensor, dtype: torch.dtype) -> dict[str, Any]:
    """What the stored reference hidden states were computed from."""
    return {"model": fingerprint_model(model_dir), "text": fingerprint_tokens(heldout),
            "dtype": str(dtype).removeprefix("torch.")}


def read_reference_hidden(work: Path, model_dir: Path, heldout: torch.Tensor,
                          dtype: torch.dtype) -> list[torch.Tensor] | None:
    """The reference's final hidden states per held-out block kept by the round stage (None if not there)."""
    stored = read_tensors(work / REFERENCE_HIDDEN, REFERENCE_HIDDEN, reference_expect(model_dir, heldout, dtype))
    return None if stored is None else list(stored[0]["hidden"])


def _error_summary(rounded: RoundedModel) -> dict[str, Any]:
    """GPTQ's output error relative to round-to-nearest (geomean over the Linears) and how many kept RTN."""
    ratios = list(rounded.error_ratios().values())
    geomean = float(np.exp(np.mean(np.log(np.maximum(ratios, 1e-30))))) if ratios else None
    return {"output_error_vs_rtn_geomean": geomean,
            "rtn_kept": sum(1 for method, _, _ in rounded.details.values() if method == "rtn")}
