"""prismq: per-Linear mixed-precision quantization selected on measured KL, exported as compressed-tensors.

Python API (the command line is a thin layer over it)::

    import prismq
    result = prismq.quantize("path/to/model", target_bits=4.75, out="out/model")   # every stage, like the CLI
    allocation = prismq.quantize("path/to/model", target_bits=4.75, work_dir="work", until="allocate").allocation

Settings are the fields of `prismq.config.QuantizeConfig` (the CLI flags with underscores). The stages themselves
are `prismq.stages.stage_probe` / `stage_cost`, `prismq.allocate.stage.stage_allocate`,
`prismq.rounding.stage.stage_round`, `prismq.export.stage.stage_export` / `stage_eval`; models are run layer by layer
through `prismq.engine.stream.LayerStream`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from prismq.pipeline import QuantizeResult

__version__ = "0.1.0"


def quantize(model: str | None = None, *, until: Literal["allocate", "export"] = "export",
             **settings: Any) -> QuantizeResult:
    """Quantize `model` (a Hugging Face directory or .gguf; None: the embedded default) with `settings` (fields of
    QuantizeConfig), running the stages up to `until`; returns the allocation and, through export, the checkpoint,
    its evaluation and the report. Invalid settings raise PrismqError with the same one-line message as the CLI."""
    from prismq.config import QuantizeConfig, validate_config
    from prismq.errors import PrismqError
    from prismq.pipeline import quantize as run

    config = validate_config(QuantizeConfig, {"model": model, **settings})
    if until == "export" and config.out is None:
        raise PrismqError("out is required: where to write the checkpoint")
    return run(config, until=until)
