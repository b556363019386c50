"""Fused siblings: Linears that vLLM loads into one layer and that must therefore share one format
(and, for NVFP4, one weight global scale).

The grouping rule lives here, by name alone, so the exporter, the cost stage and the decision units
(`prismq.model.units`) cannot disagree:

- q_proj, k_proj, v_proj of one parent -> `qkv_proj` (vLLM's QKVParallelLinear);
- gate_proj, up_proj of one parent -> `gate_up_proj` (MergedColumnParallelLinear), also inside a shared expert;
- w1, w3 of one parent -> `w13` (Mixtral's per-expert naming in vLLM's FusedMoE);
- every expert Linear `<block>.experts.<i>.<leaf>` of one MoE block -> `<block>.experts`: vLLM builds one FusedMoE
  layer from all experts' gate/up/down and picks a single scheme for it (compressed-tensors' `get_moe_method` raises
  "All MoE projections need to have same quantization scheme" when gate, up and down differ).

Every other Linear is a group of its own.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# Fused layer name -> the leaf names vLLM loads into it (packed_modules_mapping of its model classes).
FUSED_LEAVES: dict[str, frozenset[str]] = {
    "qkv_proj": frozenset({"q_proj", "k_proj", "v_proj"}),
    "gate_up_proj": frozenset({"gate_proj", "up_proj"}),
    "w13": frozenset({"w1", "w3"}),
}

# A per-expert Linear: `<block>.experts.<index>.<anything>` (transformers 4 style MoE, remote-code models).
EXPERT = re.compile(r"^(?P<block>(?:.+\.)?experts)\.\d+\.")


def fused_name(linear: str) -> str:
    """The name of the vLLM layer `linear` is loaded into: its MoE block's `experts`, its fused layer
    (`...qkv_proj`, `...gate_up_proj`, `...w13`), or its own name."""
    expert = EXPERT.match(linear)
    if expert:
        return expert["block"]
    parent, dot, leaf = linear.rpartition(".")
    for fused, leaves in FUSED_LEAVES.items():
        if leaf in leaves:
            return f"{parent}{dot}{fused}"
    return linear


def sibling_groups(linear_names: Iterable[str]) -> list[list[str]]:
    """Partition Linear names into decision groups: fused siblings together, every other Linear alone.

    Groups keep model order (by first member); members keep model order too."""
    groups: dict[str, list[str]] = {}
    for name in linear_names:
        groups.setdefault(fused_name(name), []).append(name)
    return list(groups.values())
