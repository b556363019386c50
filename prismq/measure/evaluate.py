"""`prismq eval`: the KL of a quantized model against its reference on text blocks, printed and optionally written.

Both models stream (one decoder layer in memory at a time). An exported checkpoint is read back layer by layer by
the compressed-tensors library's own code (its compressed layout, decompression and activation quantization, as
transformers loads it), independent of prismq's codecs. An assignment file
`{"assignment": {linear: FORMAT}, "input_amax": {linear: float}}` is rounded in a streamed walk with the chosen
rounding, so it computes what the export of that assignment would; missing input ranges are calibrated (and
clipped) on the default calibration blocks, where GPTQ also rounds, exactly as `prismq quantize` does without
`--calib`. `load_quantized` / `fake_quantized` build the same models whole in memory, for scripts and tests.
"""

from __future__ import annotations

import logging
import json
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prismq.artifacts import write_json
from prismq.config import QuantizeConfig
from prismq.data import consecutive_blocks, read_text, text_splits
from prismq.errors import PrismqError
from prismq.formats import get_format
from prismq.engine.stream import LayerStream, final_hidden_states
from prismq.measure.kl import HiddenStates, KLResult, evaluate_states
from prismq.model.assignment import check_assignment
from prismq.model.checkpoint import SourceTensors
from prismq.model.linears import model_dtype
from prismq.model.targets import model_targets
from prismq.model.precision import device_description, dtype_name, resolve_compute_dtype
from prismq.model.source import load_model, load_tokenizer, resolve_device, resolve_model
from prismq.rounding.clip import calibrated_input_amax, streamed_input_amax
from prismq.rounding.lanes import round_lanes
from prismq.rounding.sequential import round_model

logger = logging.getLogger(__name__)

DEFAULT_BLOCKS: int = QuantizeConfig.model_fields["heldout_blocks"].default  # the held-out text quantize measures
DEFAULT_SEQLEN: int = QuantizeConfig.model_fields["calib_seqlen"].default


def read_assignment(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Read an assignment file: {linear: FORMAT} (format names normalized) and {linear: input absmax} (may be {})."""
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise PrismqError(f"cannot read assignment file {path}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PrismqError(f"assignment file {path} is not valid JSON ({exc})") from None
    assignment = document.get("assignment") if isinstance(document, dict) else None
    if not isinstance(assignment, dict) or not assignment or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in assignment.items()):
        raise PrismqError(f"assignment file {path} needs a non-empty object \"assignment\": {{linear: FORMAT}}")
    amax = document.get("input_amax") or {}
    if not isinstance(amax, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                                             for v in amax.values()):
        raise PrismqError(f"assignment file {path}: \"input_amax\" must map Linear names to positive numbers")
    formats = {name: get_format(value).name for name, value in assignment.items()}
    return formats, {name: torch.tensor(float(value)) for name, value in amax.items()}


def default_calibration_blocks(model_dir: Path) -> torch.Tensor:
    """The blocks `prismq quantize` calibrates input ranges and GPTQ on when given no --calib (same text, count,
    seed, and the first `rounding_blocks` of them)."""
    fields = QuantizeConfig.model_fields
    splits = text_splits(None, None, None, load_tokenizer(model_dir), fields["calib_blocks"].default, 0, 0,
                         fields["calib_seqlen"].default)
    return splits.calibration[:fields["rounding_blocks"].default]


def fake_quantized(model: nn.Module, assignment: dict[str, str], input_amax: dict[str, torch.Tensor],
                   calibration: torch.Tensor | None = None, progress: bool = True,
                   rounding: str = "rtn", weight_dtype: torch.dtype | None = None,
                   source: SourceTensors | None = None) -> nn.Module:
    """Fake-quantize `model` in place to what the export of `assignment` with `rounding` computes, and return it.

    Input ranges missing for formats with a static input scale are calibrated (and clipped) on `calibration`
    first, on the unquantized model, as `prismq quantize` does; GPTQ rounds on the same blocks. Without
    calibration blocks either is an error. weight_dtype: the checkpoint's dtype, which the codecs see (None: the
    model's own); source: the model's checkpoint (its block-FP8 scales, which FP8_SOURCE ships)."""
    check_assignment(assignment, {n: tuple(m.weight.shape) for n, m in model.named_modules()
                                  if isinstance(m, nn.Linear)}, export=False)
    missing = {n: f for n, f in assignment.items() if get_format(f).needs_input_amax and n not in input_amax}
    if (missing or rounding != "rtn") and calibration is None:
        what = f"{next(iter(missing))}: {assignment[next(iter(missing))]} needs its input range" if missing \
            else f"--rounding {rounding} needs calibration inputs"
        raise PrismqError(f"{what}, and no calibration text was given")
    if missing:
        input_amax = {**calibrated_input_amax(model, calibration, missing, progress=progress), **input_amax}
    round_model(model, assignment, rounding, calibration, input_amax, progress=progress,  # type: ignore[arg-type]
                weight_dtype=weight_dtype, source=source)
    return model


def load_quantized(spec: str, reference_dir: Path, device: str, progress: bool = True,
                   rounding: str = "rtn", dtype: torch.dtype | None = None,
                   calibration: torch.Tensor | None = None) -> nn.Module:
    """The quantized model named by `spec`, computing in `dtype` (None: the checkpoint's): an exported checkpoint
    directory (loaded by transformers + compressed-tensors), or an assignment .json applied to a fresh copy of the
    reference with `rounding`, input ranges and GPTQ calibrated on `calibration` (None: the blocks `prismq quantize`
    calibrates on by default) where needed."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if rounding != "rtn":
            raise PrismqError(f"--rounding {rounding} applies to an assignment file; the bytes of the checkpoint "
                              f"{spec} are already rounded")
        return load_model(resolve_model(str(path)), dtype, device)
    if path.is_file() and path.suffix.lower() == ".json":
        assignment, amax = read_assignment(path)
        model = load_model(reference_dir, dtype, device)
        needs = rounding != "rtn" or any(get_format(f).needs_input_amax and n not in amax
                                         for n, f in assignment.items())
        if needs and calibration is None:
            calibration = default_calibration_blocks(reference_dir)
        with ExitStack() as stack:
            return fake_quantized(model, assignment, amax, calibration, progress, rounding, model_dtype(reference_dir),
                                  SourceTensors(reference_dir, stack))
    raise PrismqError(f"--quantized must be an exported checkpoint directory or an assignment .json file: {spec}")


def _streamed_kl(stream: LayerStream, quantized: str, blocks: torch.Tensor, rounding: str,
                 progress: bool) -> KLResult:
    """KL of `quantized` (an export directory, read back layer by layer through compressed-tensors, or an
    assignment file, rounded in a streamed walk) against the streamed reference on `blocks`."""
    path = Path(quantized).expanduser()
    if path.is_dir():
        if rounding != "rtn":
            raise PrismqError(f"--rounding {rounding} applies to an assignment file; the bytes of the checkpoint "
                              f"{quantized} are already rounded")
        reference = final_hidden_states(stream, blocks, progress, desc="reference")
        with LayerStream(resolve_model(str(path)), stream.dtype, stream.device) as candidate:
            hidden = final_hidden_states(candidate, blocks, progress, desc="quantized")
            return evaluate_states(HiddenStates(stream.head, blocks, reference),
                                   [HiddenStates(candidate.head, blocks, hidden)], blocks, progress=progress)[0]
    if path.is_file() and path.suffix.lower() == ".json":
        assignment, amax = read_assignment(path)
        check_assignment(assignment, {n: t.shape for n, t in model_targets(stream.model_dir, head=True).items()},
                         export=False)
        missing = {n: f for n, f in assignment.items() if get_format(f).needs_input_amax and n not in amax}
        calibration = default_calibration_blocks(stream.model_dir) if missing or rounding != "rtn" else None
        if missing:
            amax = {**streamed_input_amax(stream, calibration, missing, progress=progress), **amax}
        return round_lanes(stream, [(assignment, rounding)], calibration, blocks, amax,  # type: ignore[list-item]
                           progress=progress).kl[0]
    raise PrismqError(f"--quantized must be an exported checkpoint directory or an assignment .json file: {quantized}")


def eval_blocks(model_dir: Path, text: str | None, n_blocks: int, seqlen: int) -> torch.Tensor:
    """The blocks to evaluate: consecutive blocks from the start of `text` (a file), or without one, the
    report blocks of the default text's split (the held-out text `prismq quantize` states its KL on)."""
    tokenizer = load_tokenizer(model_dir)
    if text is not None:
        return consecutive_blocks(tokenizer, read_text(text), n_blocks, seqlen)
    return text_splits(None, None, None, tokenizer, 0, 0, n_blocks, seqlen).report


def run_eval(reference: str | None, quantized: str, text: str | None = None, n_blocks: int = DEFAULT_BLOCKS,
             seqlen: int = DEFAULT_SEQLEN, json_path: Path | None = None, device: str = "auto",
             progress: bool = True, rounding: str = "rtn", compute_dtype: str = "auto") -> KLResult:
    """`prismq eval`: KL statistics of `quantized` against `reference` (None: the embedded default model),
    printed as a summary and written to `json_path` when given; both models compute in `compute_dtype`
    (auto | bf16 | fp32, see prismq.model.precision)."""
    if n_blocks < 1 or seqlen < 2:
        raise PrismqError(f"need --blocks >= 1 and --seqlen >= 2, got {n_blocks} and {seqlen}")
    reference_dir = resolve_model(reference)
    dtype = resolve_compute_dtype(compute_dtype, resolve_device(device), model_dtype(reference_dir))
    blocks = eval_blocks(reference_dir, text, n_blocks, seqlen)
    with LayerStream(reference_dir, dtype, device) as stream:
        result = _streamed_kl(stream, quantized, blocks, rounding, progress)
    logger.info("eval: %s against %s, computed in %s\n%s", quantized, reference_dir, dtype_name(dtype),
                result.summary())
    if json_path is not None:
        payload: dict[str, Any] = {**result.to_json(), "reference": str(reference_dir), "quantized": str(quantized),
                                   "text": text if text is not None else "default held-out split",
                                   "compute_dtype": dtype_name(dtype),
                                   "device": device_description(resolve_device(device))}
        write_json(Path(json_path), "eval", payload)
        logger.info("eval: wrote %s", json_path)
    return result
