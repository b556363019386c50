"""Vision towers: the Linears of a multimodal checkpoint's vision encoder and the format they ship in.

prismq measures the language model on text; a vision tower it cannot measure (no images among the calibration
blocks), so it is not part of the allocation. `--vision-format` gives every vision Linear one format (default BF16:
the tower's bytes pass through unchanged). Another format is rounded to nearest (nothing to calibrate GPTQ on) and
must have no static input scale (no image activations to take one from); a Linear whose shape the format cannot
take stays BF16. Either way every vision Linear is named in the export's quantization config, as a target of its
format's group or in `ignore`: vLLM builds the tower's Linears with the checkpoint's quantization config and refuses
a Linear that no target or ignore entry matches. A quantized tower is offered only for the families whose vision
Linears vLLM builds quantized, as read in vLLM 0.34's model files (`VISION_CHECKED`).
"""

from __future__ import annotations

import json
import logging
import re
from contextlib import ExitStack
from pathlib import Path

import torch
from torch import nn

from prismq.errors import PrismqError
from prismq.formats import get_format
from prismq.model.checkpoint import SourceTensors
from prismq.model.layout import CheckpointLayout

logger = logging.getLogger(__name__)

VISION_PART = re.compile(r"(^|\.)(visual|vision_tower|vision_model|vision)\.")
# model types whose vision tower vLLM builds with the quantization config (qkv, proj, linear_fc1/2, the merger's)
VISION_CHECKED = ("qwen3_5", "qwen3_5_moe")
BF16 = "BF16"


def vision_linears(model_dir: Path) -> dict[str, tuple[int, int]]:
    """Every nn.Linear of the checkpoint's vision tower, by the name its weight is stored under (without
    `.weight`), with its [out, in] shape; empty for a checkpoint without a vision tower. The checkpoint's own
    architecture class (config `architectures`) is built on the meta device: no weight is read."""
    import transformers

    model_dir = Path(model_dir)
    config = transformers.AutoConfig.from_pretrained(model_dir)
    if getattr(config, "vision_config", None) is None:
        return {}
    architecture = getattr(transformers, (getattr(config, "architectures", None) or [""])[0], None)
    if architecture is None:
        raise PrismqError(f"{model_dir}: config.json names no architecture transformers has "
                          f"({getattr(config, 'architectures', None)}): cannot find the vision tower's Linears")
    try:
        with torch.device("meta"):
            model = architecture._from_config(config)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise PrismqError(f"cannot build {architecture.__name__} to find its vision tower's Linears: "
                          f"{str(exc).splitlines()[0]}") from None
    with ExitStack() as stack:
        layout = CheckpointLayout(model, SourceTensors(model_dir, stack).location)
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and VISION_PART.search(name):
            parts = layout.parts(f"{name}.weight", (module.out_features, module.in_features))
            if parts is not None and len(parts) == 1 and parts[0].index is None:
                found[parts[0].key.removesuffix(".weight")] = (module.out_features, module.in_features)
    return found


def check_vision_format(name: str) -> str:
    """The canonical name of a format a vision tower can ship in (see the module docstring), else a one-line
    error."""
    fmt = get_format(name)
    if fmt.scheme() is None:
        return BF16
    if fmt.needs_input_amax or not fmt.rounds_weights or not fmt.exportable:
        raise PrismqError(f"--vision-format {fmt.name}: a vision tower takes BF16 or a format without a static input "
                          "scale that stock vLLM serves (e.g. FP8, NVFP4A16, MXFP8A16, INT4_W4A16); there are no "
                          "image activations to calibrate one on")
    return fmt.name


def vision_assignment(model_dir: Path, vision_format: str = BF16) -> dict[str, str]:
    """Each vision Linear's format under `--vision-format` (see the module docstring): the format, or BF16 where
    the Linear's shape cannot take it."""
    fmt_name = check_vision_format(vision_format)
    linears = vision_linears(model_dir)
    if fmt_name == BF16 or not linears:
        return dict.fromkeys(linears, BF16)
    model_type = json.loads((Path(model_dir) / "config.json").read_text()).get("model_type")
    if model_type not in VISION_CHECKED:
        raise PrismqError(f"--vision-format {fmt_name}: vLLM's {model_type} vision tower is not checked to load a "
                          f"quantized tower (checked: {', '.join(VISION_CHECKED)}); keep the default BF16")
    fmt = get_format(fmt_name)
    assignment = {name: fmt_name if fmt.legal(shape) else BF16 for name, shape in linears.items()}
    kept = [name for name, chosen in assignment.items() if chosen == BF16]
    if kept:
        logger.info("vision tower: %d of %d Linears cannot take %s (shape), kept BF16, e.g. %s", len(kept),
                    len(assignment), fmt_name, kept[0])
    return assignment
