"""The one registry of formats: names -> codecs, and a table for `prismq formats`."""

from __future__ import annotations

import torch

from prismq.errors import PrismqError
from prismq.formats.base import Format
from prismq.formats.fp8 import FP8
from prismq.formats.fp8_source import FP8Source
from prismq.formats.integer import IntegerGroup
from prismq.formats.mx import mx_formats
from prismq.formats.nvfp4 import NVFP4
from prismq.formats.passthrough import Passthrough


def _build() -> dict[str, Format]:
    formats: list[Format] = [NVFP4(activations=True), NVFP4(activations=False), *mx_formats(), FP8(),
                             FP8Source(), IntegerGroup(8), IntegerGroup(4), Passthrough()]
    return {f.name: f for f in formats}


FORMATS: dict[str, Format] = _build()  # immutable after import: codecs hold no state


def format_names(exportable_only: bool = False) -> list[str]:
    """Registered format names, in registry order."""
    return [n for n, f in FORMATS.items() if f.exportable or not exportable_only]


def get_format(name: str) -> Format:
    """The codec called `name` (case-insensitive); a clear error listing the known names otherwise."""
    key = name.strip().upper()
    if key not in FORMATS:
        raise PrismqError(f"unknown format {name!r}; known formats: {', '.join(FORMATS)}")
    return FORMATS[key]


def format_table(shape: tuple[int, int] = (4096, 4096)) -> str:
    """A plain-text table of every format: bits/param at `shape`, activations, vLLM support, description."""
    rows = [("format", f"bpp@{shape[0]}x{shape[1]}", "activations", "vLLM", "description")]
    for f in FORMATS.values():
        rows.append((f.name, f"{f.bits_per_weight(shape, torch.bfloat16):.3f}",
                     "quantized" if f.quantizes_activations else "bf16",
                     f">= {f.vllm_since}" if f.vllm_since else "not served", f.summary))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows)


def print_table() -> None:
    """Print `format_table()` (the `prismq formats` command)."""
    print(format_table())
