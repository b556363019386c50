"""The allocation problem built from cost rows, --force pins, budgets, and the input-range calibration."""

from __future__ import annotations

import re

import numpy as np
import pytest

from prismq.allocate.budget import budget_bytes, build_problem
from prismq.errors import PrismqError
from prismq.measure.cost import CostRow
from prismq.model.siblings import sibling_groups

SHAPES = {
    "model.layers.0.self_attn.q_proj": (64, 256), "model.layers.0.self_attn.k_proj": (32, 256),
    "model.layers.0.self_attn.v_proj": (32, 256), "model.layers.0.self_attn.o_proj": (256, 64),
    "model.layers.0.mlp.gate_proj": (96, 256), "model.layers.0.mlp.up_proj": (96, 256),
    "model.layers.0.mlp.down_proj": (256, 96),
}
FORMATS = ["NVFP4A16", "INT4_W4A16", "MXFP8", "BF16"]


def rows_for(shapes, formats) -> list[CostRow]:
    """Cost rows as the cost stage writes them: legal formats only, cheaper formats predicted worse."""
    from prismq.formats import get_format

    rows = []
    for i, (name, shape) in enumerate(shapes.items()):
        for fmt in formats:
            f = get_format(fmt)
            if f.legal(shape):
                bits = f.bits_per_weight(shape)
                rows.append(CostRow(name, f.name, f.nbytes(shape), shape[0] * shape[1], 0.0, 0.0, 0.0,
                                    0.0 if fmt == "BF16" else (i + 1) / bits ** 2))
    return rows


def test_units_sum_their_members_and_offer_only_formats_legal_for_all() -> None:
    problem = build_problem(rows_for(SHAPES, FORMATS), sibling_groups(SHAPES), FORMATS)
    assert [len(u) for u in problem.units] == [3, 1, 2, 1]
    k_int4 = problem.formats.index("INT4_W4A16")
    assert np.isinf(problem.cost[1, k_int4]) and np.isinf(problem.cost[3, k_int4])  # in=64 and in=96
    assert problem.size[0, 0] == sum(r.bytes for r in rows_for(SHAPES, ["NVFP4A16"]) if "self_attn" in r.linear
                                     and "o_proj" not in r.linear)
    assert problem.params == sum(a * b for a, b in SHAPES.values())
    assert problem.bytes_of("INT4_W4A16") is None and problem.bytes_of("BF16") == 2 * problem.params
    choice = np.array([0, 3, 2, 3])
    assignment = problem.assignment(choice)
    assert assignment["model.layers.0.mlp.up_proj"] == "MXFP8" and assignment["model.layers.0.self_attn.k_proj"] == "NVFP4A16"


def test_force_rules_pin_units_and_may_not_split_siblings() -> None:
    rows = rows_for(SHAPES, FORMATS)
    rules = [(re.compile(r"mlp\.(gate|up)_proj"), "MXFP8"), (re.compile("down"), "BF16")]
    problem = build_problem(rows, sibling_groups(SHAPES), FORMATS, rules)
    assert np.isfinite(problem.cost[2]).sum() == 1 and np.isfinite(problem.cost[2, FORMATS.index("MXFP8")])
    assert np.isfinite(problem.cost[3]).sum() == 1
    with pytest.raises(PrismqError, match="split the fused unit"):
        build_problem(rows, sibling_groups(SHAPES), FORMATS, [(re.compile("k_proj"), "MXFP8")])
    with pytest.raises(PrismqError, match="--force INT4_W4A16.*o_proj cannot take it"):
        build_problem(rows, sibling_groups(SHAPES), FORMATS, [(re.compile("o_proj"), "INT4_W4A16")])
    with pytest.raises(PrismqError, match="not among --formats"):
        build_problem(rows, sibling_groups(SHAPES), FORMATS, [(re.compile("o_proj"), "FP8")])


def test_a_format_legal_nowhere_and_a_unit_with_no_format_are_clear_errors() -> None:
    odd = {"model.layers.0.mlp.down_proj": (256, 96)}
    with pytest.raises(PrismqError, match="INT4_W4A16 is legal for no Linear"):
        build_problem(rows_for(odd, ["INT4_W4A16", "BF16"]), [[*odd]], ["INT4_W4A16", "BF16"])
    with pytest.raises(PrismqError, match="no format in INT4_W4A16 can take.*add BF16"):
        build_problem(rows_for(odd, ["INT4_W4A16"]), [[*odd]], ["INT4_W4A16"])


def test_budgets_in_bits_and_whole_checkpoint_size() -> None:
    problem = build_problem(rows_for(SHAPES, FORMATS), sibling_groups(SHAPES), FORMATS)
    assert budget_bytes(problem, 4.75, None, 0) == int(4.75 * problem.params / 8)
    assert budget_bytes(problem, None, 0.001, 400_000) == 1_000_000 - 400_000
    with pytest.raises(PrismqError, match="below the 0.002 GB the non-quantized tensors"):
        budget_bytes(problem, None, 0.001, 2_000_000)


def test_bf16_fallback_is_offered_only_where_no_listed_format_fits() -> None:
    rows = rows_for(SHAPES, FORMATS)
    problem = build_problem(rows, sibling_groups(SHAPES), ["INT4_W4A16"], fallback=["BF16"])
    assert problem.formats == ["INT4_W4A16", "BF16"]
    assert np.isinf(problem.cost[0, 1]) and np.isfinite(problem.cost[0, 0])  # qkv takes INT4: no BF16
    assert np.isfinite(problem.cost[1, 1]) and np.isinf(problem.cost[1, 0])  # o_proj (in=64): BF16 only
    pinned = build_problem(rows, sibling_groups(SHAPES), ["INT4_W4A16"], [(re.compile(r"self_attn\.[qkv]_proj"), "BF16")],
                           fallback=["BF16"])
    assert np.isfinite(pinned.cost[0, 1]) and np.isinf(pinned.cost[0, 0])


def test_a_uniform_format_that_measures_better_in_the_same_bytes_is_shipped_instead() -> None:
    from prismq.rounding.stage import better_uniform

    assert better_uniform(0.0426, {"MXFP8": 0.0380, "NVFP4": 0.448}) == "MXFP8"
    assert better_uniform(0.333, {"NVFP4": 0.448}) is None
    assert better_uniform(0.0, {"BF16": 0.0}) is None  # a tie keeps the allocated mix
    assert better_uniform(0.1, {}) is None


def test_force_formats_outside_the_list_are_offered_to_their_units_only() -> None:
    rows = rows_for(SHAPES, [*FORMATS, "FP8"])
    problem = build_problem(rows, sibling_groups(SHAPES), ["NVFP4A16"], [(re.compile("down_proj"), "FP8")],
                            fallback=["FP8", "BF16"])
    k_fp8 = problem.formats.index("FP8")
    assert np.isfinite(problem.cost[3, k_fp8]) and np.isfinite(problem.cost[3]).sum() == 1
    assert np.isinf(problem.cost[0, k_fp8]) and np.isinf(problem.cost[2, k_fp8])
