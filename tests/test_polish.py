"""The polish: moves built from measured flips on a hand-made problem; coordinate descent never raises its
evaluator's KL and keeps the budget; variants measured as shipped equal rounding the changed assignment from scratch;
a quantize run ships exactly the tensors the polish measured."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from prismq.allocate.budget import Problem
from prismq.engine.stream import LayerStream
from prismq.measure.kl import KLResult, kl_result
from prismq.rounding.gptq import GPTQSettings
from prismq.rounding.lanes import round_lanes
from prismq.rounding.store import EncodedStore, variant_key
from prismq.select.measured import Flip, FlipMeasure
from prismq.select.polish import moves, polish
from prismq.select.shipped import measure_variants
from test_select import _assignment


def _problem() -> Problem:
    """Three units with a small option A and a large option B (10 and 20 bytes)."""
    cost = np.array([[0.2, 0.0], [0.3, 0.0], [0.1, 0.0]])
    size = np.array([[10, 20], [10, 20], [10, 20]], dtype=np.int64)
    return Problem([["a"], ["b"], ["c"]], ["A", "B"], cost, size, params=60)


SINGLES = [FlipMeasure(Flip(("a",), "A"), 0.05, 0.01, 1.05), FlipMeasure(Flip(("b",), "B"), -0.2, 0.01, 0.8),
           FlipMeasure(Flip(("c",), "B"), -0.01, 0.01, 0.99)]


def test_moves_are_the_flips_and_pairs_that_fit_and_promise_less_kl() -> None:
    problem = _problem()
    choice = np.array([1, 0, 0])  # 40 bytes
    # no slack: only a's downgrade paying for b's upgrade (-0.15); a with c sums above zero, b with c does not fit
    (pair,) = moves(problem, choice, SINGLES, budget=40)
    assert pair.flips == (Flip(("a",), "A"), Flip(("b",), "B")) and pair.bytes_delta == 0
    assert pair.expected == pytest.approx(-0.15)
    # 10 bytes of slack: b's upgrade alone first, then the pair, then c's upgrade
    found = moves(problem, choice, SINGLES, budget=50)
    assert [(m.changes(), m.bytes_delta) for m in found] == [({"b": "B"}, 10), ({"a": "A", "b": "B"}, 0),
                                                              ({"c": "B"}, 10)]


class _Additive:
    """A made-up KL: per-unit costs plus an interaction (b and c both large costs 0.25), the same at every
    position."""

    def __init__(self, problem: Problem, assignment: dict[str, str]) -> None:
        self.problem, self.assignment, self.calls = problem, dict(assignment), []

    def kl(self, assignment: dict[str, str]) -> KLResult:
        value = sum(self.problem.cost[u, self.problem.formats.index(assignment[m[0]])]
                    for u, m in enumerate(self.problem.units))
        value += 0.25 if assignment["b"] == assignment["c"] == "B" else 0.0
        kl = torch.full((2, 4), value, dtype=torch.float64)
        return kl_result(kl, torch.ones(2, 4), torch.zeros(2, 3), torch.zeros(2, 3))

    def measure(self, step: str, variants: list[dict[str, str]]) -> list[KLResult]:
        self.calls.append(step)
        return [self.kl(self.assignment), *(self.kl({**self.assignment, **v}) for v in variants)]

    def accept(self, changes: dict[str, str]) -> None:
        self.assignment.update(changes)


@pytest.mark.parametrize("budget", [40, 50, 60])
def test_the_polish_never_raises_its_evaluators_kl_and_keeps_the_budget(budget: int) -> None:
    problem = _problem()
    start = {"a": "B", "b": "A", "c": "A"}
    evaluator = _Additive(problem, start)
    polished, log = polish(problem, start, budget, unit_count=3, rounds=4, evaluator=evaluator)
    sizes = {u: problem.size[u, problem.formats.index(polished[m[0]])] for u, m in enumerate(problem.units)}
    assert sum(sizes.values()) <= budget
    values = [r["base_kl"] for r in log.rounds]
    assert evaluator.kl(polished).mean_kl == log.final_kl <= log.start_kl == evaluator.kl(start).mean_kl
    assert all(later < earlier for earlier, later in zip(values, values[1:]))  # each kept move lowered it
    assert polished == evaluator.assignment
    if budget == 60:  # room for everything, but upgrading c beside b measures worse (the interaction)
        assert polished == {"a": "B", "b": "B", "c": "A"}
    if budget == 40:  # a's downgrade pays for b's upgrade (0.3 - 0.2 saved), nothing else fits
        assert polished == {"a": "A", "b": "B", "c": "A"}


class _Noisy(_Additive):
    """The made-up KL of `_Additive` plus, for every assignment other than the starting one, +-0.1 alternating over
    the 8 positions: each move's paired change keeps its mean but gets a standard error of about 0.038."""

    def __init__(self, problem: Problem, assignment: dict[str, str]) -> None:
        super().__init__(problem, assignment)
        self.start = dict(assignment)

    def kl(self, assignment: dict[str, str]) -> KLResult:
        result = super().kl(assignment)
        if assignment == self.start:
            return result
        noise = 0.1 * torch.tensor([1.0, -1.0]).repeat(4).reshape(2, 4).double()
        return kl_result(result.kl + noise, torch.ones(2, 4), torch.zeros(2, 3), torch.zeros(2, 3))


@pytest.mark.parametrize("margin", [0.0, 2.0])
def test_the_polish_keeps_only_moves_whose_gain_exceeds_the_margin(margin: float) -> None:
    """Room for one upgrade; only b's pays. Lowering the KL by 0.1 (about 2.6 standard errors of its paired change)
    it is kept under a margin of 2; lowering it by 0.05 (1.3 standard errors), only without a margin."""
    start = {"a": "B", "b": "A", "c": "A"}  # 40 bytes; one upgrade fits a budget of 50
    for gain, kept in ((0.1, True), (0.05, margin == 0)):
        problem = _problem()
        problem.cost[1, 0], problem.cost[2, 0] = gain, 0.0  # c's upgrade gains nothing
        evaluator = _Noisy(problem, start)
        polished, log = polish(problem, start, 50, unit_count=3, rounds=1, evaluator=evaluator, margin=margin)
        assert polished == ({**start, "b": "B"} if kept else start)
        (move,) = [m for m in log.rounds[0]["moves"] if m["changes"] == {"b": "B"}]
        assert move["delta_kl"] == pytest.approx(-gain) and move["stderr"] == pytest.approx(0.1 / 7 ** 0.5)


def test_a_variant_measured_as_shipped_equals_rounding_it_from_scratch(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Base: an assignment rounded by GPTQ + sweep in a round-stage walk. A variant changing units of the last
    layer rounds them on the base's hidden states there, which are those a walk rounding the changed assignment
    from scratch sees: the same tensors and the same KL. The base's own KL is the round stage's."""
    base = _assignment()
    amax = {n: torch.tensor(2.5) for n in base}
    generator = torch.Generator().manual_seed(6)
    calibration = torch.randint(0, 512, (4, 16), generator=generator)
    blocks = torch.randint(0, 512, (2, 16), generator=generator)
    last = {"model.layers.1.mlp.down_proj": "BF16", "model.layers.1.self_attn.o_proj": "MXFP8"}
    variants = [dict.fromkeys(("model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"), "MXFP8"), last]
    settings = GPTQSettings()
    with LayerStream(tiny_llama_dir, torch.float32) as stream:
        scratch = round_lanes(stream, [(a, "gptq+sweep") for a in [base, *({**base, **v} for v in variants)]],
                              calibration, blocks, amax, settings, spill_dir=tmp_path / "lanes", progress=False)
        store = EncodedStore(tmp_path / "variants")
        measured = measure_variants(stream, base, scratch.rounded[0].encoded, variants, blocks, calibration,
                                    "gptq+sweep", amax, settings, store, progress=False).kl
    assert measured[0].mean_kl == scratch.kl[0].mean_kl
    for variant, direct, rounded in zip(variants, scratch.kl[1:], scratch.rounded[1:]):
        for name, fmt in variant.items():
            mine, theirs = store[variant_key(name, fmt)], rounded.encoded[name]
            assert set(mine) == set(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine), name
    for result, direct in zip(measured[1:], scratch.kl[1:]):
        assert result.mean_kl == pytest.approx(direct.mean_kl, rel=1e-6)
    assert measured[1].mean_kl != measured[0].mean_kl


def test_quantize_polishes_and_ships_exactly_the_tensors_the_polish_measured(small_vocab_llama: Path,
                                                                            tmp_path: Path) -> None:
    """quantize runs the polish and the report states it. Then the same round stage's result polished under a
    larger budget (room for upgrades, so moves are kept): its final KL on the selection split is the KL of the
    checkpoint written from it, read back by compressed-tensors, on the same blocks."""
    from prismq.allocate.stage import allocation_problem, offered_formats
    from prismq.cli import main
    from prismq.config import QuantizeConfig
    from prismq.export.stage import stage_eval, stage_export
    from prismq.rounding.ranges import needing_ranges, stage_ranges
    from prismq.rounding.stage import Rounding
    from prismq.select.polish_stage import stage_polish
    from prismq.stages import calibration_blocks, selection_blocks, stage_cost

    out = tmp_path / "out"
    settings = {"calib_blocks": 4, "calib_seqlen": 32, "heldout_blocks": 2, "selection_blocks": 2,
                "rounding": "gptq", "select_units": 2, "select_recost": 0, "polish_units": 6, "device": "cpu",
                "compute_dtype": "fp32"}  # the stages called below compute in float32 on any CPU
    assert main(["quantize", str(small_vocab_llama), "--out", str(out), "--target-bits", "5",
                 *(f"--{k.replace('_', '-')}={v}" for k, v in settings.items())]) == 0
    work = tmp_path / "out.work"
    polished = json.loads((work / "polish.json").read_text())["polish"]
    assert polished["mode"] == "polished" and polished["rounds"]
    assert polished["final_kl"] <= polished["start_kl"]
    summary = json.loads((work / "summary.json").read_text())
    assert summary["selection"]["polish"]["final_kl"] == polished["final_kl"]
    assert "### Polish (weights as they ship)" in (work / "report.md").read_text()

    config = QuantizeConfig(model=str(small_vocab_llama), out=tmp_path / "roomy", target_bits=7,
                            **settings)  # type: ignore[arg-type]
    formats, fallback = offered_formats(config)
    rows = stage_cost(work, [*formats, *fallback], "cpu", "auto")
    rounding = Rounding.model_validate(json.loads((work / "rounding.json").read_text())["rounding"])
    calibration = calibration_blocks(work)[:config.rounding_blocks]
    input_amax = stage_ranges(work, small_vocab_llama, torch.float32, "cpu", calibration,
                              needing_ranges(allocation_problem(config, small_vocab_llama, rows)))
    roomy = stage_polish(work, config, small_vocab_llama, rows, rounding, torch.float32, "cpu",
                         selection_blocks(work), calibration, input_amax)
    assert roomy.assignment != rounding.assignment and roomy.final_kl < roomy.start_kl  # type: ignore[operator]
    assert roomy.start_kl == pytest.approx(rounding.mix_eval["mean_kl"], rel=1e-9)  # the round stage's own
    stage_export(config, small_vocab_llama, roomy.shipped(rounding, input_amax))
    (work / "check").mkdir()
    evaluation = stage_eval(work / "check", tmp_path / "roomy", small_vocab_llama, selection_blocks(work),
                            torch.float32, "cpu")
    assert evaluation["mean_kl"] == pytest.approx(roomy.final_kl, rel=1e-5)
