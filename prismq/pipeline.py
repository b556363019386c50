"""`prismq quantize`: MODEL in, compressed-tensors checkpoint out.

Today it builds uniform baselines (`--uniform FORMAT`): every quantizable Linear in one format (BF16 where the
format cannot take its shape), calibrated input ranges where the format ships a static input scale, then the export.
The mixed-precision stages (probe, cost, allocate, select) plug in between as they are built.
"""

from __future__ import annotations

import re
from pathlib import Path

from prismq.config import QuantizeConfig
from prismq.data import calibration_and_heldout
from prismq.errors import PrismqError
from prismq.export.writer import ExportResult, write_checkpoint
from prismq.formats import get_format
from prismq.measure.input_range import input_absmax
from prismq.model.linears import linear_shapes, quantizable
from prismq.model.siblings import sibling_groups
from prismq.model.source import load_model, load_tokenizer, resolve_model


def uniform_assignment(shapes: dict[str, tuple[int, int]], format_name: str,
                       force: list[tuple[re.Pattern[str], str]] = ()) -> dict[str, str]:
    """Every Linear in `format_name`, except --force matches (first rule wins) and shapes the format cannot take
    (BF16); fused siblings fall back together so they keep sharing one format."""
    assignment: dict[str, str] = {}
    for group in sibling_groups(shapes):
        forced = {next((f for pattern, f in force if pattern.search(name)), None) for name in group}
        if len(forced) > 1:
            raise PrismqError(f"--force rules split fused siblings {', '.join(group)}: they must share one format")
        chosen = forced.pop() or format_name
        if not all(get_format(chosen).legal(shapes[name]) for name in group):
            if chosen != format_name:
                raise PrismqError(f"--force {chosen}: {get_format(chosen).illegal_reason(shapes[group[0]])} "
                                  f"({group[0]})")
            chosen = "BF16"
        assignment.update({name: get_format(chosen).name for name in group})
    return assignment


def quantize(config: QuantizeConfig) -> ExportResult:
    """Run `prismq quantize` as configured and print a short summary; returns what was written."""
    if config.uniform is None:
        raise PrismqError("only --uniform FORMAT is implemented so far")
    fmt = get_format(config.uniform)
    if not fmt.exportable:
        raise PrismqError(f"{fmt.name} is a research format no runtime serves yet; it cannot be exported")
    out = Path(config.out)
    if out.exists() and not config.overwrite:
        raise PrismqError(f"output {out} already exists (pass --overwrite to replace it)")
    model_dir = resolve_model(config.model)
    shapes = quantizable(linear_shapes(model_dir))
    assignment = uniform_assignment(shapes, fmt.name, config.force_rules())
    kept = [name for name, f in assignment.items() if f == "BF16" and fmt.name != "BF16"]
    if kept:
        print(f"prismq: {len(kept)} Linear(s) kept in BF16 ({fmt.name} cannot take their shape), e.g. {kept[0]}")

    input_amax = {}
    needs_range = [name for name, f in assignment.items() if get_format(f).needs_input_amax]
    if needs_range:
        model = load_model(model_dir, device=config.device)
        tokenizer = load_tokenizer(model_dir)
        blocks, _ = calibration_and_heldout(config.calib, config.heldout, tokenizer, config.calib_blocks, 0,
                                            config.calib_seqlen)
        input_amax = input_absmax(model, blocks, needs_range)
        del model

    result = write_checkpoint(model_dir, assignment, out, input_amax=input_amax,
                              max_shard_bytes=config.max_shard_bytes, overwrite=config.overwrite)
    print(f"prismq: wrote {result.path}: {result.checkpoint_bytes / 1e9:.3f} GB of tensors; "
          f"{len(assignment)} Linears at {result.linear_bits_per_param:.3f} bits/param "
          f"({', '.join(sorted(set(assignment.values())))})")
    print(f"prismq: serve it with: vllm serve {result.path} --quantization compressed-tensors")
    return result
