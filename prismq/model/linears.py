"""What a checkpoint's Linear layers are, read from its config alone (the model is built on the meta device)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from prismq.errors import PrismqError
from prismq.model.experts import EXPERTS_IMPLEMENTATION

LM_HEAD = "lm_head"
MTP_ROOT = re.compile(r"^((?:.*\.)?mtp)\.")  # Qwen3.5 / Qwen3-Next: `mtp.fc`, `mtp.layers.0. ...`
LAYER_ROOT = re.compile(r"^((?:model\.)?(?:language_model\.)?layers\.(\d+))\.")


def unloaded_root(key: str, num_layers: int | None) -> str | None:
    """The MTP head a checkpoint tensor belongs to (`mtp`, or `model.layers.N` for N >= `num_layers`), or None."""
    mtp, layer = MTP_ROOT.match(key), LAYER_ROOT.match(key)
    if mtp is not None:
        return mtp[1]
    if layer is not None and num_layers is not None and int(layer[2]) >= num_layers:
        return layer[1]
    return None


def meta_model(model_dir: Path) -> nn.Module:
    """The architecture of the checkpoint in `model_dir` built on the meta device (no memory, no weights read);
    an architecture transformers cannot build is a one-line error."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model_dir)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, experts_implementation=EXPERTS_IMPLEMENTATION)
    except (ValueError, KeyError, OSError) as exc:
        raise PrismqError(f"cannot build the architecture of {model_dir}: {str(exc).splitlines()[0]}") from None


def linear_shapes(model_dir: Path) -> dict[str, tuple[int, int]]:
    """Module name -> weight shape [out, in] of every nn.Linear, in model order, lm_head included (from the
    architecture on the meta device: no memory, no weights read)."""
    model = meta_model(model_dir)
    shapes = {name: (m.out_features, m.in_features) for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    if not any(name != LM_HEAD for name in shapes):
        raise PrismqError(f"{model_dir}: the model has no Linear layers to quantize")
    return shapes


def quantizable(shapes: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """The Linears prismq assigns formats to: all but lm_head (kept in the model dtype, see DESIGN.md §5)."""
    return {name: shape for name, shape in shapes.items() if name != LM_HEAD}


def model_dtype(model_dir: Path) -> torch.dtype:
    """The dtype the checkpoint stores its weights in, as config.json names it (`dtype` or `torch_dtype`);
    bfloat16 when unnamed. The codecs always see weights in this dtype."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    name = str(config.get("dtype") or config.get("torch_dtype") or "bfloat16").removeprefix("torch.")
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise PrismqError(f"{model_dir}: config.json names an unknown weight dtype {name!r}")
    return dtype


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of decoder layers: the ModuleList holding the most Linear layers, with its name."""
    best: tuple[str, nn.ModuleList, int] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module):
            count = sum(isinstance(m, nn.Linear) for m in module.modules())
            if count and (best is None or count > best[2]):
                best = (name, module, count)
    if best is None:
        raise PrismqError("cannot find the model's decoder layers (no list of modules holding Linear layers)")
    return best[0], best[1]


def unsupported_quantization(quantization: dict | None) -> str | None:
    """Why a checkpoint's `quantization_config` cannot be read (None: it can: none, compressed-tensors, which
    prismq decompresses with that library, or block FP8 as DeepSeek and MiniMax ship it, read dequantized:
    `prismq.model.checkpoint`). Other natively quantized sources (per-tensor FP8, MXFP4, GPTQ, AWQ, ...) are not
    read yet."""
    if quantization is None:
        return None
    method = str(quantization.get("quant_method", "unknown"))
    if method == "compressed-tensors":
        return None
    if method == "fp8" and quantization.get("weight_block_size") is not None:
        if str(quantization.get("fmt", "e4m3")) != "e4m3":
            return f"its block-FP8 weights are {quantization.get('fmt')!r}; prismq reads E4M3 block FP8 only"
        return None
    return (f"its weights are quantized (quant_method {method!r}); prismq reads bf16/fp16/fp32 checkpoints, block "
            "FP8 and compressed-tensors exports only for now (dequantize it to bf16 first)")
