"""The compressed-tensors `quantization_config` for an assignment {Linear name -> format}."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from prismq.formats import get_format
from prismq.model.linears import LM_HEAD, unloaded_root
from prismq.model.siblings import EXPERT


def _ct_version() -> str:
    try:
        import compressed_tensors

        return str(compressed_tensors.__version__)
    except (ImportError, AttributeError):  # pragma: no cover - compressed-tensors is a dependency
        return "0.20.0"


def _pattern(name: str) -> str:
    """The regex (unanchored) over the modules the config target of `name` stands for: the name itself, or for a
    routed expert every expert of its layer and projection."""
    expert = EXPERT.match(name)
    if expert is None:
        return re.escape(name)
    return f"{re.escape(expert['block'])}\\.\\d+\\.{re.escape(name[expert.end():])}"


def _config_target(name: str) -> str:
    """How the config names a target: itself, or for a routed expert one regex over every expert of its layer and
    projection (they share one scheme: vLLM's FusedMoE reads expert 0's and applies it to all)."""
    return name if EXPERT.match(name) is None else f"re:^{_pattern(name)}$"


EXPERTS_TARGET = re.compile(r"^re:\^.*experts\\\.\\d\+\\\.[^.]+\$$")  # what _config_target writes for experts


def is_experts_target(target: str) -> bool:
    """Whether a config target is the regex `_config_target` writes over one layer's experts and projection."""
    return EXPERTS_TARGET.match(target) is not None


def unloaded_roots(keys: Iterable[str], num_layers: int | None, kept: Iterable[str] = ()) -> list[str]:
    """`ignore` entries for the checkpoint's MTP heads, which pass through: one `re:` entry per root, `mtp.` and
    each decoder layer past the model's `num_layers` (DeepSeek V3's MTP layer 61). vLLM builds an MTP model with the
    checkpoint's quantization config, under those names, and refuses a Linear that no target or ignore entry
    matches. `kept`: Linears of those roots shipped in a quantized format as stored (a block-FP8 source's MTP layer,
    FP8_SOURCE), each a target of its own group; their root's entry spares them (a negative lookahead, routed
    experts by one pattern per projection as `_config_target` writes them). `num_layers` None: the config states
    no depth, no layer is taken for an MTP layer."""
    roots: dict[str, dict[str, None]] = {}  # root -> the patterns of its kept Linears, relative to the root
    for key in keys:
        root = unloaded_root(key, num_layers)
        if root is not None:
            roots.setdefault(root, {})
    for name in kept:
        root = unloaded_root(name, num_layers)
        if root not in roots:
            raise ValueError(f"{name} is kept as an MTP head's Linear but lies in none of the checkpoint's MTP heads")
        roots[root][_pattern(name[len(root) + 1:])] = None
    return [f"re:^{re.escape(root)}\\." + (f"(?!(?:{'|'.join(spared)})$)" if spared else "")
            for root, spared in roots.items()]


def quantization_config(assignment: dict[str, str], unloaded: Iterable[str] = ()) -> dict[str, Any]:
    """One config group per quantized format with explicit module-name targets (a layer's routed experts: one
    regex per projection) and its own `format`; lm_head, every BF16 target and the `unloaded` entries
    (`unloaded_roots`) in `ignore`; status `compressed` (what transformers and vLLM require)."""
    by_format: dict[str, dict[str, None]] = {}  # format -> its targets (a dict: ordered, each once)
    ignored: dict[str, None] = {LM_HEAD: None, **dict.fromkeys(unloaded)}
    for name, format_name in assignment.items():
        listed = ignored if get_format(format_name).scheme() is None else \
            by_format.setdefault(get_format(format_name).name, {})
        listed[_config_target(name)] = None
    groups: dict[str, Any] = {}
    for index, (format_name, targets) in enumerate(by_format.items()):
        groups[f"group_{index}"] = {"targets": list(targets), **get_format(format_name).scheme(),
                                    "output_activations": None}
    formats = {group["format"] for group in groups.values()}
    return {
        "config_groups": groups,
        "format": formats.pop() if len(formats) == 1 else ("mixed-precision" if formats else "dense"),
        "global_compression_ratio": None,
        "ignore": list(ignored),
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": _ct_version(),
    }
