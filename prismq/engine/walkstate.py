"""Where a walk of the decoder stack stands, on disk, so an interrupted stage resumes after a finished layer.

A walk (the probe's forward and reverse sweeps, the rounding lanes, a held-out forward) saves after a decoder
layer what it needs to go on: hidden states, gradients, running sums, and the index of the next layer. Walks whose
snapshot only serves a resume take one after a layer once `WalkState.min_interval` seconds have passed since the
last (`checkpoint`): a kill loses at most that much work beyond the layer in progress, and a fast walk (a small
model on a GPU, where writing the hidden states costs more than a layer) is not slowed by its snapshots. The save is
atomic (one safetensors file, the walk's fingerprint in its header, renamed into place), so a kill at any moment
leaves either the previous state or the new one. A rerun with the same inputs (the `expect` fingerprint: model,
text, settings) picks up there; a state saved for other inputs is discarded, never mixed in. The stage deletes the
directory once its own artifact is written.

Saving also takes the states out of memory: a walk that keeps something per layer (the probe keeps every layer's
input for its reverse sweep) keeps it here, on disk, not resident.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from prismq.errors import PrismqError
from prismq.export.shards import write_safetensors
from prismq.model.checkpoint import TensorFile

logger = logging.getLogger(__name__)

WALK_KIND = "walk_state"


class WalkState:
    """Named snapshots of one walk in `directory`, each valid only for the walk's `expect` fingerprint."""

    min_interval: ClassVar[float] = 30.0  # seconds between a walk's resume snapshots (`checkpoint`)

    def __init__(self, directory: Path, expect: dict[str, Any]) -> None:
        self.directory = Path(directory)
        self.expect = expect
        self.last_snapshot = time.monotonic()

    def _path(self, name: str) -> Path:
        return self.directory / f"{name}.safetensors"

    def save(self, name: str, tensors: Mapping[str, torch.Tensor], **meta: Any) -> None:
        """Write snapshot `name` (tensors, and small JSON values in the file's own header) atomically, replacing an
        older one: one file renamed into place, so a kill leaves the old snapshot or the new one, never a mix (no
        hash to compute: a walk may save after every layer)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        partial = self.directory / f".{name}.partial-{os.getpid()}"
        header = {"kind": WALK_KIND, "expect": self.expect, "meta": meta}
        try:
            write_safetensors(partial, dict(tensors), {"format": "pt", WALK_KIND: json.dumps(header, sort_keys=True)})
            os.replace(partial, self._path(name))
        finally:
            partial.unlink(missing_ok=True)

    def checkpoint(self, name: str, tensors: Mapping[str, torch.Tensor], **meta: Any) -> None:
        """`save`, when `min_interval` seconds have passed since this walk's last snapshot (or its start): for a
        snapshot that only lets an interrupted walk resume (the walk goes on from the last one taken)."""
        if time.monotonic() - self.last_snapshot >= self.min_interval:
            self.save(name, tensors, **meta)
            self.last_snapshot = time.monotonic()

    def load(self, name: str) -> tuple[Mapping[str, torch.Tensor], dict[str, Any]] | None:
        """Snapshot `name` if one was saved for this walk (tensors read when asked for), else None; a snapshot of
        another walk, or a damaged one, is removed and None returned (the walk redoes that part)."""
        if not self._path(name).exists():
            return None
        try:
            stored = TensorFile(self._path(name))
            header = json.loads(stored.metadata[WALK_KIND])
            if header.get("expect") != json.loads(json.dumps(self.expect, sort_keys=True)):
                raise PrismqError("it was saved by another walk (other model, text or settings)")
        except (PrismqError, KeyError, ValueError, OSError) as exc:
            logger.info("not resuming from %s: %s", self._path(name), exc)
            self.remove(name)
            return None
        return stored, header["meta"]

    def exists(self, name: str) -> bool:
        """Whether snapshot `name` is on disk (not yet checked against this walk)."""
        return self._path(name).exists()

    def remove(self, name: str) -> None:
        """Delete snapshot `name`."""
        self._path(name).unlink(missing_ok=True)

    def clear(self) -> None:
        """Delete every snapshot: the stage's own artifact now holds the result."""
        shutil.rmtree(self.directory, ignore_errors=True)


def pack(prefix: str, tensors: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """A list of tensors (one per block) as snapshot entries PREFIX.0, PREFIX.1, ..."""
    return {f"{prefix}.{index}": tensor for index, tensor in enumerate(tensors)}


def unpack(stored: Mapping[str, torch.Tensor], prefix: str, device: torch.device | str = "cpu",
           dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """The list `pack` stored under `prefix`, on `device` (in `dtype` when given)."""
    count = sum(1 for key in stored if key.rsplit(".", 1)[0] == prefix)
    return [stored[f"{prefix}.{index}"].to(device=device, dtype=dtype) for index in range(count)]
