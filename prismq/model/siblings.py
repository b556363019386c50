"""Fused siblings: quantization targets that vLLM loads into one layer and that must therefore share one format,
and the smaller groups among them that share one weight global scale (NVFP4) and one GPTQ pass.

The grouping rules live here, by name alone, so the exporter, the cost stage, rounding and the decision units
(`prismq.model.units`) cannot disagree. One format (`unit_groups`, by `fused_name`):

- q_proj, k_proj, v_proj of one parent -> `qkv_proj` (vLLM's QKVParallelLinear);
- gate_proj, up_proj of one parent -> `gate_up_proj` (MergedColumnParallelLinear), also inside a shared expert;
- w1, w3 of one parent -> `w13` (Mixtral's per-expert naming in vLLM's FusedMoE);
- in_proj_qkv, in_proj_z -> `in_proj_qkvz` and in_proj_b, in_proj_a -> `in_proj_ba` (Qwen3.5's linear attention);
- q_a_proj, kv_a_proj_with_mqa -> `fused_qkv_a_proj` (DeepSeek V2/V3 multi-head latent attention);
- every expert Linear `<block>.experts.<i>.<leaf>` of one MoE block -> `<block>.experts`: vLLM builds one FusedMoE
  layer from all experts' gate/up/down and picks a single scheme for it (compressed-tensors' `get_moe_method` raises
  "All MoE projections need to have same quantization scheme" when gate, up and down differ).

Every other Linear is a group of its own. One weight global scale, one input (`sibling_groups`, by `scale_name`):
the same groups, except that a MoE layer's experts each keep their own: expert e's gate and up share one (vLLM
reads gate's `weight_global_scale` for both), its down stands alone.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# Fused layer name -> the leaf names vLLM loads into it (packed_modules_mapping of its model classes), in the
# order vLLM stacks them (shard 0 first).
FUSED_LEAVES: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "w13": ("w1", "w3"),
    "in_proj_qkvz": ("in_proj_qkv", "in_proj_z"),  # Qwen3.5 linear attention (Gated DeltaNet)
    "in_proj_ba": ("in_proj_b", "in_proj_a"),
    "fused_qkv_a_proj": ("q_a_proj", "kv_a_proj_with_mqa"),  # DeepSeek V2/V3 MLA, Kimi
}


def stacking_order(name: str) -> int:
    """Where Linear `name` lies in the vLLM layer it is fused into (0: first; a Linear fused into none: 0)."""
    leaf = name.rpartition(".")[2]
    return next((leaves.index(leaf) for leaves in FUSED_LEAVES.values() if leaf in leaves), 0)


# The member of each fused layer that keeps the probe's input sample for all of them (they read one input).
SAMPLE_LEAF = {"qkv_proj": "q_proj", "gate_up_proj": "gate_proj", "w13": "w1", "in_proj_qkvz": "in_proj_qkv",
               "in_proj_ba": "in_proj_b", "fused_qkv_a_proj": "q_a_proj"}

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


def scale_name(linear: str) -> str:
    """The group `linear` shares its weight global scale, its input and its GPTQ pass with: its fused layer, except
    for a routed expert: its own fused gate/up (`<block>.experts.<i>.gate_up_proj`), or itself (down)."""
    if EXPERT.match(linear):
        parent, dot, leaf = linear.rpartition(".")
        return next((f"{parent}{dot}{fused}" for fused, leaves in FUSED_LEAVES.items() if leaf in leaves), linear)
    return fused_name(linear)


def sample_owner(linear: str) -> str:
    """The target whose probe entry holds `linear`'s sampled input rows: the first of the targets that read one
    input (q of q/k/v, gate of gate/up, an expert's gate of its gate/up), which all record the same rows; the probe
    keeps them once."""
    scale = scale_name(linear)
    parent, dot, fused = scale.rpartition(".")
    return f"{parent}{dot}{SAMPLE_LEAF[fused]}" if scale != linear and fused in SAMPLE_LEAF else linear


def input_name(linear: str) -> str:
    """The group `linear` shares its static input scale with: its scale group, except that a MoE layer's routed
    experts share one per projection kind (all gates and ups, `<block>.experts.w13_input`; all downs,
    `<block>.experts.w2_input`), so every vLLM MoE backend (some keep one input scale per layer) computes the same."""
    expert = EXPERT.match(linear)
    if expert:
        leaf = linear.rpartition(".")[2]
        gate_or_up = any(leaf in leaves for leaves in FUSED_LEAVES.values())
        return f"{expert['block']}.{'w13' if gate_or_up else 'w2'}_input"
    return scale_name(linear)


def input_groups(names: Iterable[str]) -> list[list[str]]:
    """Partition target names into the groups that share one static input scale (see `input_name`)."""
    return _grouped(names, input_name)


def _grouped(names: Iterable[str], key) -> list[list[str]]:  # noqa: ANN001
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(key(name), []).append(name)
    return list(groups.values())


def unit_groups(names: Iterable[str]) -> list[list[str]]:
    """Partition target names into the groups that take one format (one vLLM layer each), in model order (by first
    member; members keep model order too)."""
    return _grouped(names, fused_name)


def sibling_groups(names: Iterable[str]) -> list[list[str]]:
    """Partition target names into the groups that share one weight global scale, one input and one GPTQ pass
    (see `scale_name`), in model order."""
    return _grouped(names, scale_name)
