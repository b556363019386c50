"""SCOUT selection: flips measured by tail replay equal a direct whole-model KL; the uncertain units, the surrogate
scale and the re-solve on hand-made problems; a quantize run with selection never ships worse than the knapsack."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import build_tiny_llama
from prismq.allocate.budget import Problem
from prismq.engine.stream import LayerStream
from prismq.engine.walkstate import WalkState
from prismq.measure.kl import evaluate_candidates
from prismq.model.source import load_model
from prismq.rounding.sequential import round_model
from prismq.select.measured import Flip, FlipMeasure, measure_flips
from prismq.allocate.knapsack import solve
from prismq.select.scout import flips_for, measured_costs, surrogate_scale, uncertain_units


def _assignment() -> dict[str, str]:
    names = [n for n, m in build_tiny_llama().named_modules() if isinstance(m, torch.nn.Linear)]
    assignment = {n: ("BF16" if n == "lm_head" else "NVFP4") for n in names}
    assignment["model.layers.1.mlp.down_proj"] = "MXFP8"
    return assignment


QKV1 = ("model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj")
FLIPS = [Flip(("model.layers.0.mlp.down_proj",), "BF16"), Flip(("model.layers.0.self_attn.o_proj",), "MXFP8"),
         Flip(QKV1, "MXFP8"), Flip(("model.layers.1.mlp.down_proj",), "NVFP4")]


def test_a_flip_measured_by_tail_replay_equals_the_whole_model_kl(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Each flip's KL (the walk re-runs only the layers from its unit on) equals the KL of a whole model rounded
    with that one unit changed, and its paired cost is that KL minus the base's, position by position."""
    base = _assignment()
    amax = {n: torch.tensor(2.5) for n in base}
    blocks = torch.randint(0, 512, (3, 24), generator=torch.Generator().manual_seed(4))
    with LayerStream(tiny_llama_dir, torch.float32) as stream:
        measured = measure_flips(stream, base, FLIPS, blocks, amax, progress=False)
    models = []
    for assignment in [base, *({**base, **dict.fromkeys(f.unit, f.format)} for f in FLIPS)]:
        model = load_model(tiny_llama_dir, torch.float32)
        round_model(model, assignment, "rtn", None, amax, progress=False, weight_dtype=torch.bfloat16)
        models.append(model)
    expected = evaluate_candidates(load_model(tiny_llama_dir, torch.float32), models, blocks, progress=False)
    assert measured.base.mean_kl == pytest.approx(expected[0].mean_kl, rel=1e-6)
    for flip, direct in zip(measured.flips, expected[1:]):
        assert flip.mean_kl == pytest.approx(direct.mean_kl, rel=1e-6)
        difference = (direct.kl.double() - expected[0].kl.double()).flatten()
        assert flip.delta_kl == pytest.approx(float(difference.mean()), rel=1e-5, abs=1e-9)
        assert flip.stderr == pytest.approx(float(difference.std()) / difference.numel() ** 0.5, rel=1e-4)
    assert measured.flips[0].delta_kl < 0  # a unit made BF16 lowers the KL: the measurement can see it


def test_the_flips_walk_resumes_after_its_last_saved_layer(tiny_llama_dir: Path, tmp_path: Path,
                                                            monkeypatch) -> None:
    monkeypatch.setattr(WalkState, "min_interval", 0.0)  # a snapshot after every layer
    base = _assignment()
    amax = {n: torch.tensor(2.5) for n in base}
    blocks = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(5))
    with LayerStream(tiny_llama_dir, torch.float32) as stream:
        whole = measure_flips(stream, base, FLIPS, blocks, amax, progress=False)
        state = WalkState(tmp_path / "walk", {"test": 1})
        read: list[int] = []
        original = stream.layer

        def counted(index: int):
            read.append(index)
            if index == 1 and read.count(1) == 1:
                raise KeyboardInterrupt
            return original(index)

        stream.layer = counted  # type: ignore[method-assign]
        with pytest.raises(KeyboardInterrupt):
            measure_flips(stream, base, FLIPS, blocks, amax, progress=False, state=state)
        resumed = measure_flips(stream, base, FLIPS, blocks, amax, progress=False, state=state)
    assert read == [0, 1, 1]  # the rerun read only the layer not finished
    assert [f.delta_kl for f in resumed.flips] == [f.delta_kl for f in whole.flips]


def _problem() -> Problem:
    """Four units, options (A: small, B: large); unit 3 offers A only."""
    cost = np.array([[1.0, 0.0], [0.30, 0.0], [0.25, 0.0], [0.5, np.inf]])
    size = np.array([[10, 20], [10, 20], [10, 20], [10, 0]], dtype=np.int64)
    return Problem([["a"], ["b"], ["c"], ["d"]], ["A", "B"], cost, size, params=80)


def test_uncertain_units_are_the_small_margins_and_the_large_costs() -> None:
    problem = _problem()
    choice = np.array([1, 0, 0, 0])  # a upgraded; b and c small
    # at 0.028 nats per byte: b's upgrade gains 0.30 for 10 bytes (margin |-0.30 + 0.28| / 0.58 = 0.034), c's 0.25
    # (0.03 / 0.53 = 0.057), a's downgrade loses 1.0 for 10 bytes (0.72 / 1.28): b is the closest call; then by
    # predicted cost at the chosen option: c (0.25; d, 0.5, has one option, a is at 0)
    picked = uncertain_units(problem, choice, 0.028, 2)
    assert [(p.unit, p.reason) for p in picked] == [(1, "margin"), (2, "cost")]
    assert picked[0].margin == pytest.approx(0.02 / 0.58) and picked[1].margin == pytest.approx(0.03 / 0.53)
    assert all(p.unit != 3 for p in uncertain_units(problem, choice, 0.028, 4))  # one option: never measured
    assert flips_for(problem, choice, [0, 1]) == [Flip(("a",), "A"), Flip(("b",), "B")]


def test_measured_costs_replace_the_surrogate_and_the_knapsack_follows_them() -> None:
    problem = _problem()
    choice = np.array([1, 0, 0, 0])
    # the surrogate says a's upgrade matters most; measured: a barely matters, c's upgrade matters a lot
    measured = [FlipMeasure(Flip(("a",), "A"), 0.01, 0.001, 0.1), FlipMeasure(Flip(("c",), "B"), -0.5, 0.01, 0.1)]
    # least squares through the origin: predicted changes (1.0, -0.25), measured (0.01, -0.5)
    assert surrogate_scale(problem, choice, measured) == pytest.approx((0.01 + 0.125) / (1 + 0.0625))
    alpha = surrogate_scale(problem, choice, measured)
    cost = measured_costs(problem, choice, measured, alpha)  # precise measurements: they decide
    assert cost[0, 0] - cost[0, 1] == pytest.approx(0.01, rel=1e-3)
    assert cost[2, 1] - cost[2, 0] == pytest.approx(-0.5, rel=1e-3)
    assert cost[1, 0] - cost[1, 1] == pytest.approx(alpha * 0.30)
    new_choice = solve(cost, problem.size, 50).choice  # room for one upgrade: c's, not a's
    assert new_choice.tolist() == [0, 0, 1, 0]


def test_a_noisy_measurement_moves_the_estimate_part_of_the_way() -> None:
    from prismq.select.scout import estimates, surrogate_error

    problem = _problem()
    choice = np.array([1, 0, 0, 0])
    measured = [FlipMeasure(Flip(("a",), "A"), 1.2, 0.01, 0.1), FlipMeasure(Flip(("b",), "B"), -0.6, 0.1, 0.1),
                FlipMeasure(Flip(("c",), "B"), -0.25, 0.01, 0.1)]
    alpha = surrogate_scale(problem, choice, measured)
    predicted = alpha * np.array([1.0, -0.30, -0.25])
    residual = np.array([1.2, -0.6, -0.25]) - predicted
    tau2 = float(np.mean(residual ** 2)) - float(np.mean(np.array([0.01, 0.1, 0.01]) ** 2))
    assert tau2 > 0 and surrogate_error(problem, choice, measured, alpha) == pytest.approx(tau2)
    got = estimates(problem, choice, measured, alpha)
    # b's measurement (stderr 0.1) is about as precise as the surrogate (tau ~ 0.12): the estimate lies between
    expected_b = (-0.6 / 0.01 + predicted[1] / tau2) / (1 / 0.01 + 1 / tau2)
    assert got[1] == pytest.approx(expected_b) and -0.6 < got[1] < predicted[1]
    assert got[0] == pytest.approx(1.2, abs=0.01) and got[2] == pytest.approx(-0.25, abs=0.01)


def test_a_surrogate_scale_that_does_not_fit_is_one() -> None:
    problem = _problem()
    choice = np.array([1, 0, 0, 0])
    assert surrogate_scale(problem, choice, []) == 1.0
    assert surrogate_scale(problem, choice, [FlipMeasure(Flip(("a",), "A"), -0.2, 0.01, 0.1)]) == 1.0


def test_quantize_with_selection_audits_every_flip_and_never_ships_worse_than_the_knapsack(
        small_vocab_llama: Path, tmp_path: Path) -> None:
    from prismq.cli import main

    out = tmp_path / "out"
    assert main(["quantize", str(small_vocab_llama), "--out", str(out), "--calib-blocks", "4", "--calib-seqlen",
                 "32", "--heldout-blocks", "2", "--selection-blocks", "2", "--target-bits", "6", "--rounding", "rtn",
                 "--select-units", "3", "--device", "cpu"]) == 0
    selection = json.loads((tmp_path / "out.work" / "selection.json").read_text())["selection"]
    assert selection["mode"] == "measured" and 1 <= len(selection["units"]) <= 3
    assert len(selection["flips"]) >= len(selection["units"])
    assert all({"measured_delta_kl", "stderr", "predicted_delta", "bytes_delta"} <= set(f) for f in selection["flips"])
    summary = json.loads((tmp_path / "out.work" / "summary.json").read_text())
    rounding = json.loads((tmp_path / "out.work" / "rounding.json").read_text())["rounding"]
    shipped_kl = (rounding["mix_eval"] if rounding["shipped"] == "mix"
                  else rounding["baseline_evals"][rounding["shipped"]])["mean_kl"]
    assert all(shipped_kl <= b["mean_kl"] for b in rounding["baseline_evals"].values())
    if selection["changed"]:
        assert "knapsack mix" in rounding["baseline_evals"]
    assert summary["bits_per_param"] <= 6.0
    assert summary["selection"]["flips_measured"] == len(selection["flips"])
    assert set(rounding["baseline_reports"]) == set(rounding["baseline_evals"])
    card = (out / "README.md").read_text()  # the model card travels with the checkpoint
    assert f"vllm serve {out.name} --quantization compressed-tensors" in card
    assert f"**{summary['bits_per_param']:.4f} bits per parameter**" in card
    assert f"| this checkpoint | {summary['eval']['mean_kl']:.5f} |" in card and "| uniform NVFP4 |" in card


def test_recosting_installs_exactly_the_rounded_weights(tiny_llama_dir: Path) -> None:
    """L2's layers carry the weights a whole model rounded to nearest with the same assignment carries."""
    from prismq.select.perturbed import QuantizedWeights

    base = _assignment()
    amax = {n: torch.tensor(2.5) for n in base}
    model = load_model(tiny_llama_dir, torch.float32)
    round_model(model, base, "rtn", None, amax, progress=False, weight_dtype=torch.bfloat16)
    expected = dict(model.named_parameters())
    with LayerStream(tiny_llama_dir, torch.float32) as stream:
        quantized = QuantizedWeights(stream, base, amax)
        assert len(quantized) == 2 and quantized.targets is stream.targets
        for index in range(2):
            with quantized.layer(index) as layer:
                for name, parameter in layer.named_parameters():
                    assert torch.equal(parameter, expected[f"model.layers.{index}.{name}"]), name
                assert not any(m._forward_pre_hooks for m in layer.modules() if m is not layer)  # weights only


def test_the_fixed_point_stops_on_convergence_or_on_a_cycle() -> None:
    from prismq.select.perturbed import changed_share, fixed_point

    params = {"a": 10, "b": 30}
    a, b, c = {"a": "X", "b": "X"}, {"a": "Y", "b": "X"}, {"a": "Y", "b": "Y"}
    assert changed_share(a, b, params) == 0.25 and changed_share(a, c, params) == 1.0
    steps = {str(a): b, str(b): c, str(c): c}
    settled = fixed_point(a, lambda x: steps[str(x)], params, 0.0, 10)
    assert settled.assignments == [a, b, c, c] and settled.changed == [0.25, 0.75, 0.0]
    assert settled.stopped == "converged"
    flipping = fixed_point(a, lambda x: b if x == a else a, params, 0.0, 10)
    assert flipping.assignments == [a, b, a] and flipping.stopped == "cycle"
    assert fixed_point(a, lambda x: b if x == a else c, params, 0.0, 1).stopped == "iterations"


def test_the_measured_front_keeps_only_points_that_pay_for_their_bytes() -> None:
    from prismq.select.frontier import MeasuredPoint, best_within, measured_front

    points = [MeasuredPoint("c", 6.0, 60, 0.10, 0.01), MeasuredPoint("a", 4.5, 45, 0.30, 0.01),
              MeasuredPoint("b", 5.0, 50, 0.29, 0.01),  # 0.01 better than a: within 2 standard errors, dropped
              MeasuredPoint("d", 8.0, 80, 0.05, 0.01), MeasuredPoint("e", 7.0, 70, 0.12, 0.01)]  # e worse than c
    assert measured_front(points) == [1, 0, 3]
    assert measured_front(points, margin=0.5) == [1, 2, 0, 3]
    assert best_within(points, 55) == 2 and best_within(points, 44) is None and best_within(points, 100) == 3


def test_the_knee_and_its_leave_one_out_stability_on_hand_made_frontiers() -> None:
    from prismq.select.frontier import leave_one_out

    x = np.array([4.5, 5.0, 5.5, 6.0, 7.0, 8.0])
    elbow = np.array([1.0, 0.5, 0.1, 0.08, 0.06, 0.05])  # a sharp bend at 5.5
    assert leave_one_out(x, elbow) == {"knee": 2, "stable": True, "moved_to": []}
    gentle = np.array([1.0, 0.62, 0.40, 0.26, 0.12, 0.05])  # convex, no sharp bend: the knee moves
    result = leave_one_out(x, gentle)
    assert result["knee"] == 3 and not result["stable"] and result["moved_to"]
