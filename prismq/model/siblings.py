"""Fused siblings: Linears that vLLM packs into one kernel and that must therefore share one format
(and, for NVFP4, one weight global scale)."""

from __future__ import annotations

from collections.abc import Iterable

# Per parent module, the leaf names vLLM fuses into one layer (qkv_proj, gate_up_proj, Mixtral's w13).
FUSED_LEAVES: tuple[frozenset[str], ...] = (
    frozenset({"q_proj", "k_proj", "v_proj"}),
    frozenset({"gate_proj", "up_proj"}),
    frozenset({"w1", "w3"}),
)


def sibling_groups(linear_names: Iterable[str]) -> list[list[str]]:
    """Partition Linear names into decision groups: fused siblings together, every other Linear alone.

    Groups keep model order (by first member); members keep model order too."""
    names = list(linear_names)
    group_of: dict[tuple[str, frozenset[str]], list[str]] = {}
    groups: list[list[str]] = []
    for name in names:
        parent, _, leaf = name.rpartition(".")
        fused = next((leaves for leaves in FUSED_LEAVES if leaf in leaves), None)
        if fused is None:
            groups.append([name])
            continue
        key = (parent, fused)
        if key not in group_of:
            group_of[key] = []
            groups.append(group_of[key])
        group_of[key].append(name)
    return groups
