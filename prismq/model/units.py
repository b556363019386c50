"""Decision units: the sets of quantization targets that take one format together, because vLLM serves them as one
layer.

The allocator chooses one format per unit, never per Linear. A unit is the vLLM layer its members are loaded into
(the grouping rule is `prismq.model.siblings`, shared with the exporter and the cost stage):

- Llama, Mistral, Qwen2, Qwen3, Gemma: q/k/v -> `self_attn.qkv_proj`, gate/up -> `mlp.gate_up_proj`; o_proj and
  down_proj alone (vLLM's `packed_modules_mapping` for these model classes).
- Phi-3: qkv_proj and gate_up_proj are single Linears in the checkpoint already: every Linear is its own unit.
- Qwen3.5: linear attention's in_proj_qkv/in_proj_z -> `in_proj_qkvz`, in_proj_b/in_proj_a -> `in_proj_ba`
  (Qwen3-Next stores both fused already). DeepSeek V2/V3: q_a_proj/kv_a_proj_with_mqa -> `fused_qkv_a_proj`.
- MoE (Mixtral, Qwen2/3-MoE, Qwen3.5-MoE, DeepSeek, GLM-4 MoE, MiniMax M2, Gemma 4): vLLM serves all routed
  experts of a layer as one FusedMoE layer with one scheme for gate, up and down, so the expert targets
  `<block>.experts.<i>.*` (each expert's matrices inside transformers 5's fused 3-D parameters,
  `prismq.model.targets`) form one unit per layer, offered only `MOE_FORMATS`. Routers (`mlp.gate` Linears,
  Gemma 4's `router.proj`) and Qwen2-MoE's `shared_expert_gate` are built unquantized by vLLM (`quant_config=None`,
  a plain torch Linear): their units are pinned to BF16. Shared experts are ordinary MLPs: gate/up fused, down
  alone. A MoE family whose experts stay in the model dtype (GPT-OSS's fused layout) is warned about.

lm_head and the embeddings are policy, not units: `quantizable` drops lm_head (kept BF16: vLLM's ParallelLMHead
takes no compressed scheme) and embeddings are not Linears. DESIGN.md §5.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

from prismq.errors import PrismqError
from prismq.formats import get_format
from prismq.formats.fp8_source import partial_rows_last
from prismq.model.linears import quantizable
from prismq.model.siblings import EXPERT, fused_name, stacking_order, unit_groups
from prismq.model.targets import model_targets

# model_type values whose fusion the rule above was checked against (vLLM model files, packed_modules_mapping).
VERIFIED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "phi3",
                                  "mixtral", "qwen2_moe", "qwen3_moe", "qwen3_next", "qwen3_5", "qwen3_5_text",
                                  "qwen3_5_moe", "qwen3_5_moe_text", "deepseek_v2", "deepseek_v3"})
MOE_MODEL_TYPES = frozenset({"mixtral", "qwen2_moe", "qwen3_moe"})

# Leaf names of Linears vLLM builds without a quantization method: MoE routers and the shared-expert gate.
UNQUANTIZED_LEAVES = frozenset({"gate", "router", "shared_expert_gate"})
RUNTIME_FORMAT = "BF16"

# Formats vLLM's compressed-tensors MoE path (CompressedTensorsMoEMethod.get_moe_method) runs as prismq measures
# them. Left out: MXFP4A16 and MXFP8A16, whose activations that path quantizes anyway (MXFP4 W4A4 on GPUs with
# CUTLASS MXFP4 kernels, MXFP8 always), and the research formats. On Hopper, NVFP4 and MXFP4 experts run on Marlin
# with bf16 activations: better than measured, never worse.
MOE_FORMATS = frozenset({"NVFP4", "NVFP4A16", "MXFP4", "MXFP8", "FP8", "FP8_SOURCE", "INT4_W4A16", "INT8_W8A16",
                         "BF16"})


@dataclass(frozen=True)
class Unit:
    """One decision: `members` (model order, with their [out, in] `shapes`) take one format.

    name: the vLLM layer they form, e.g. 'model.layers.3.self_attn.qkv_proj'. pinned: the only format the runtime
    accepts for it (BF16 for routers), or None when the allocator is free to choose."""

    name: str
    members: tuple[str, ...]
    shapes: tuple[tuple[int, int], ...]
    pinned: str | None = None

    @property
    def params(self) -> int:
        """Weights in the unit (sum of out * in over its members)."""
        return sum(out * in_ for out, in_ in self.shapes)


def decision_units(shapes: dict[str, tuple[int, int]], model_type: str | None = None) -> list[Unit]:
    """The decision units of a model's Linears {name: [out, in]} in model order (by first member).

    lm_head is dropped (policy, not a decision). model_type (config.json's) selects no different rule; it says when
    the rule was not checked for the family, and when a MoE family's experts are missing from `shapes` (transformers
    5 holds them as 3-D parameters: they stay in the model dtype)."""
    shapes = quantizable(shapes)
    if model_type is not None:
        _notice(model_type, shapes)
    units = []
    for group in unit_groups(shapes):
        pinned = RUNTIME_FORMAT if any(_unquantized(name) for name in group) else None
        units.append(Unit(fused_name(group[0]), tuple(group), tuple(tuple(shapes[n]) for n in group), pinned))
    return units


def _unquantized(name: str) -> bool:
    """Whether vLLM builds Linear `name` without quantization: a router or gate (`mlp.gate`, Gemma 4's
    `router.proj`, Qwen2-MoE's `shared_expert_gate`)."""
    parent, _, leaf = name.rpartition(".")
    return leaf in UNQUANTIZED_LEAVES or parent.rpartition(".")[2] == "router"


def legal_formats(unit: Unit, formats: list[str], block_fp8: Collection[str] = ()) -> list[str]:
    """The formats of `formats` (canonical names, first-seen order) legal for every member's shape (and, for routed
    experts, served by vLLM's MoE path: `MOE_FORMATS`; FP8_SOURCE where every member is in `block_fp8`, the
    targets a block-FP8 source stores so).

    A pinned unit offers its pinned format alone, whatever `formats` says: the runtime accepts nothing else, and
    keeping the model dtype is always possible."""
    if unit.pinned is not None:
        return [get_format(unit.pinned).name]
    stacked = [shape for _, shape in sorted(zip(unit.members, unit.shapes), key=lambda m: stacking_order(m[0]))]
    return formats_legal_for(stacked, formats, experts=bool(EXPERT.match(unit.members[0])),
                             block_fp8=all(member in block_fp8 for member in unit.members))


def formats_legal_for(shapes: Iterable[tuple[int, int]], formats: Iterable[str], experts: bool = False,
                      block_fp8: bool = False) -> list[str]:
    """The formats (canonical names, first-seen order) every one of `shapes` can take: fused siblings take one
    format, so one member's shape that a format cannot take rules it out for all. `experts`: the shapes are routed
    experts', which take only `MOE_FORMATS`; `block_fp8`: all of them are stored in block FP8 by the source, the
    only weights FP8_SOURCE can keep."""
    shapes = list(shapes)
    offered: list[str] = []
    for name in formats:
        fmt = get_format(name)
        if experts and fmt.name not in MOE_FORMATS or fmt.keeps_source and not block_fp8:
            continue
        if fmt.keeps_source and not partial_rows_last(shapes):
            continue
        if fmt.name not in offered and all(fmt.legal(shape) for shape in shapes):
            offered.append(fmt.name)
    return offered


def model_units(model_dir: Path) -> list[Unit]:
    """The decision units of the checkpoint in `model_dir` (its architecture is built on the meta device)."""
    try:
        model_type = json.loads((Path(model_dir) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError) as exc:
        raise PrismqError(f"cannot read {model_dir}/config.json: {exc}") from exc
    return decision_units({name: t.shape for name, t in model_targets(Path(model_dir)).items()}, model_type)


def _notice(model_type: str, shapes: dict[str, tuple[int, int]]) -> None:
    """Warn where the units may not be what vLLM serves: an unchecked family, or MoE experts that are no Linears."""
    if model_type not in VERIFIED_MODEL_TYPES:
        warnings.warn(f"model_type {model_type!r}: fused layers follow the Llama rule (q/k/v, gate/up, MoE experts "
                      f"per layer); prismq checked it against vLLM for {', '.join(sorted(VERIFIED_MODEL_TYPES))} only",
                      stacklevel=3)
    if model_type in MOE_MODEL_TYPES and not any(EXPERT.match(name) for name in shapes):
        warnings.warn(f"{model_type}: no routed expert is a quantization target (they are stored in a layout "
                      f"prismq does not quantize yet): they stay in the model dtype (BF16); only the Linears "
                      f"(attention, dense and shared-expert MLPs) are allocated", stacklevel=3)
