"""Vision towers: the Linears of a multimodal checkpoint's vision encoder and the format they ship in.

prismq measures the language model on text; a vision tower it cannot measure (no images among the calibration
blocks), so it is not part of the allocation. `--vision-format` gives every vision Linear one format (default BF16:
the tower's bytes pass through unchanged). Another format is rounded to nearest (nothing to calibrate GPTQ on) and
must have no static input scale (no image activations to take one from); a Linear whose shape the format cannot
take stays BF16, and so does the fused attention `qkv` under a format with a per-tensor global scale (NVFP4A16:
vLLM loads that tensor without shard ids, so it would read one scale for three). Either way every Linear outside
the language model (the tower, projectors, an audio tower) is named in the export's quantization config, as a
target of its format's group or in `ignore`: vLLM builds them with the checkpoint's quantization config and refuses
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
LANGUAGE_MODEL = ("model.language_model.", "lm_head")  # the multimodal classes' text model and head


def vision_linears(model_dir: Path) -> dict[str, tuple[int, int]]:
    """Every nn.Linear of a multimodal checkpoint outside its language model (vision tower, projectors, an audio
    tower), by the name its weight is stored under (without `.weight`), with its [out, in] shape; empty for a
    checkpoint without a vision config. The checkpoint's own architecture class (config `architectures`) is built
    on the meta device: no weight is read. An architecture transformers cannot build is a PrismqError."""
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
    except Exception as exc:  # noqa: BLE001 - any failure of a foreign class is one line to the user
        raise PrismqError(f"cannot build {architecture.__name__} to find its vision tower's Linears: "
                          f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    names = [name for name, _ in model.named_modules()]
    split = any(name.startswith(LANGUAGE_MODEL[0]) for name in names)
    with ExitStack() as stack:
        layout = CheckpointLayout(model, SourceTensors(model_dir, stack).location)
    found = {}
    for name, module in model.named_modules():
        outside = not name.startswith(LANGUAGE_MODEL) if split else bool(VISION_PART.search(name))
        if isinstance(module, nn.Linear) and outside:
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
        why = "there are no image activations to calibrate a static input scale on" if fmt.needs_input_amax else \
            "it keeps a source's stored bytes" if not fmt.rounds_weights else "stock vLLM does not serve it"
        raise PrismqError(f"--vision-format {fmt.name}: {why}; a vision tower takes BF16 or a served format without "
                          "a static input scale (e.g. FP8, NVFP4A16, MXFP8A16, INT4_W4A16)")
    return fmt.name


def vision_assignment(model_dir: Path, vision_format: str = BF16) -> dict[str, str]:
    """The format of each Linear outside the language model under `--vision-format` (see the module docstring):
    the vision tower's take the format where their shape can (and, for a format with a per-tensor global scale,
    not the fused `qkv`, which vLLM loads without shard ids: one scale would be read for three), every other one
    (projectors, audio) BF16. With BF16, an architecture that cannot be built leaves the tower unnamed, with a
    warning."""
    fmt_name = check_vision_format(vision_format)
    try:
        linears = vision_linears(model_dir)
    except PrismqError as exc:
        if fmt_name != BF16:
            raise
        logger.warning("%s; its Linears are passed through but not named in the export's config, which vLLM may "
                       "refuse", exc)
        return {}
    if fmt_name == BF16 or not linears:
        if fmt_name != BF16:
            logger.info("--vision-format %s: %s has no vision tower", fmt_name, model_dir)
        return dict.fromkeys(linears, BF16)
    model_type = json.loads((Path(model_dir) / "config.json").read_text()).get("model_type")
    if model_type not in VISION_CHECKED:
        raise PrismqError(f"--vision-format {fmt_name}: vLLM's {model_type} vision tower is not checked to load a "
                          f"quantized tower (checked: {', '.join(VISION_CHECKED)}); keep the default BF16")
    fmt = get_format(fmt_name)
    per_tensor = "weight_global_scale" in fmt.tensor_specs((1, fmt.in_features_multiple))

    def takes(name: str, shape: tuple[int, int]) -> bool:
        return bool(VISION_PART.search(name)) and fmt.legal(shape) and not (per_tensor and name.endswith(".qkv"))

    assignment = {name: fmt_name if takes(name, shape) else BF16 for name, shape in linears.items()}
    kept = [name for name, chosen in assignment.items() if chosen == BF16]
    if kept:
        logger.info("vision tower: %d of %d Linears kept BF16 (outside the tower, a shape %s cannot take, or a "
                    "fused qkv), e.g. %s", len(kept), len(assignment), fmt_name, kept[0])
    return assignment
