"""The export and eval stages: the round stage's shipped tensors in, the compressed-tensors checkpoint out, then
that checkpoint read back by compressed-tensors' own code, layer by layer, and measured against the reference on
the held-out blocks (WORK/eval.json)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from prismq.artifacts import fingerprint_model, fingerprint_tokens, write_json
from prismq.config import QuantizeConfig
from prismq.engine.stream import LayerStream, final_hidden_states
from prismq.engine.walkstate import WalkState
from prismq.export.writer import ExportResult, write_checkpoint
from prismq.measure.kl import HiddenStates, evaluate_states
from prismq.rounding.stage import Rounding, read_reference_hidden
from prismq.rounding.store import EncodedStore


def stage_export(config: QuantizeConfig, model_dir: Path, rounding: Rounding,
                 vision: dict[str, str] | None = None) -> ExportResult:
    """Write the shipped assignment's tensors (exactly the measured ones) as the checkpoint at --out, with the
    vision tower's Linears (`prismq.model.vision`) in theirs."""
    return write_checkpoint(model_dir, rounding.assignment, Path(config.out or ""),
                            encoded=EncodedStore.reopen(Path(rounding.store)),
                            input_amax={n: torch.tensor(v) for n, v in rounding.input_amax.items()},
                            max_shard_bytes=config.max_shard_bytes, overwrite=config.overwrite, vision=vision)


def stage_eval(work: Path, out: Path, model_dir: Path, heldout: torch.Tensor, dtype: torch.dtype,
               device: str, max_memory: int | None = None) -> dict[str, Any]:
    """Held-out KL statistics of the written checkpoint against the reference (WORK/eval.json). One model is open
    at a time while layers are read: the reference's final hidden states come from the round stage (or a walk of
    their own), the export is walked, and only then is the reference's head opened beside the export's."""
    hidden = read_reference_hidden(work, model_dir, heldout, dtype)
    if hidden is None:
        with LayerStream(model_dir, dtype, device, max_memory) as reference:
            hidden = final_hidden_states(reference, heldout, desc="reference")
    with LayerStream(out, dtype, device, max_memory) as exported:
        state = WalkState(work / "eval.walk", {"export": fingerprint_model(out), "text": fingerprint_tokens(heldout),
                                               "dtype": str(dtype).removeprefix("torch."),
                                               "device": exported.device.type})
        read_back = final_hidden_states(exported, heldout, desc="read back the export", state=state)
        with LayerStream(model_dir, dtype, device, max_memory) as reference:
            (result,) = evaluate_states(HiddenStates(reference.head, heldout, hidden),
                                        [HiddenStates(exported.head, heldout, read_back)], heldout)
    evaluation = {**result.to_json(), "checkpoint": str(out)}
    write_json(work / "eval.json", "eval", evaluation)
    state.clear()
    return evaluation
