"""Work-directory artifacts: safetensors + a JSON sidecar (or JSON alone), versioned, fingerprinted, atomic.

Every stage writes its outputs through here and reads its inputs back through here, so a rerun resumes from what is
already done, refuses outputs made for another model, text or setting (stale), and never reads a half-written file.
No pickle: tensors are safetensors, everything else is JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from prismq import __version__
from prismq.errors import PrismqError
from prismq.export.shards import write_safetensors
from prismq.model.checkpoint import TensorFile

SCHEMA_VERSION = 1
_SAMPLE_BYTES = 1 << 20


def fingerprint_model(model_dir: Path) -> str:
    """A short hash of a checkpoint: config.json, and per safetensors file its header, size and first MiB of data.

    Cheap for any model size (reads no more than ~1 MiB per file) and changes when the architecture, the tensor
    layout or the leading weights change."""
    digest = hashlib.sha256((Path(model_dir) / "config.json").read_bytes())
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with open(file, "rb") as handle:
            header_size = struct.unpack("<Q", handle.read(8))[0]
            digest.update(handle.read(header_size))
            digest.update(handle.read(_SAMPLE_BYTES))
        digest.update(str(file.stat().st_size).encode())
    return digest.hexdigest()[:16]


def fingerprint_tokens(blocks: torch.Tensor) -> str:
    """A short hash of token blocks (their ids and shape): identifies the text a measurement was made on."""
    digest = hashlib.sha256(str(tuple(blocks.shape)).encode())
    digest.update(blocks.to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _replace_atomically(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def write_json(path: Path, kind: str, payload: dict[str, Any]) -> None:
    """Write a JSON artifact of `kind` (schema version and prismq version added) atomically."""
    document = {"kind": kind, "schema_version": SCHEMA_VERSION, "prismq_version": __version__, **payload}
    _replace_atomically(Path(path), lambda p: p.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n"))


def read_json(path: Path, kind: str, expect: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Read a JSON artifact of `kind`; None if absent. A corrupt file, another kind or schema, or a value that
    differs from `expect` (fingerprints, settings) is a clear error, never a silent reuse."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        document = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PrismqError(f"{path} is corrupt ({exc.msg if hasattr(exc, 'msg') else exc}); delete it to redo "
                          f"that stage") from None
    if not isinstance(document, dict) or document.get("kind") != kind:
        raise PrismqError(f"{path} is not a {kind} artifact; delete it to redo that stage")
    if document.get("schema_version") != SCHEMA_VERSION:
        raise PrismqError(f"{path} has schema version {document.get('schema_version')}, this prismq reads "
                          f"{SCHEMA_VERSION}; delete it to redo that stage")
    for key, value in (expect or {}).items():
        if document.get(key) != value:
            raise PrismqError(f"{path} is stale: it was made with {key}={document.get(key)!r}, this run has "
                              f"{value!r}; use another --work-dir or delete it to redo that stage")
    return document


def read_current(path: Path, kind: str, expect: dict[str, Any]) -> dict[str, Any] | None:
    """A JSON artifact of a cheap-to-redo stage (allocation, rounding) if it was made from `expect`'s inputs and
    settings; None if absent or made from others (the stage then runs again and replaces it). Corrupt: an error."""
    document = read_json(path, kind)
    if document is None or any(document.get(key) != value for key, value in expect.items()):
        return None
    return document


def write_tensors(stem: Path, kind: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write STEM.safetensors and its sidecar STEM.json (the sidecar last, so it vouches for complete tensors)."""
    stem = Path(stem)
    tensor_path = stem.with_suffix(".safetensors")
    _replace_atomically(tensor_path, lambda p: write_safetensors(p, tensors))
    write_json(stem.with_suffix(".json"), kind, {**meta, "tensors_sha256": _file_digest(tensor_path)})


def _file_digest(path: Path) -> str:
    """A short sha256 of a file, read in chunks (an artifact may be larger than memory should hold)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()[:16]


def read_tensors(stem: Path, kind: str, expect: dict[str, Any] | None = None
                 ) -> tuple[Mapping[str, torch.Tensor], dict[str, Any]] | None:
    """Read what `write_tensors` wrote (each tensor read from disk when asked for); None if the sidecar is absent.
    Corrupt or stale -> clear error."""
    stem = Path(stem)
    meta = read_json(stem.with_suffix(".json"), kind, expect)
    if meta is None:
        return None
    tensor_path = stem.with_suffix(".safetensors")
    if not tensor_path.exists() or _file_digest(tensor_path) != meta.get("tensors_sha256"):
        raise PrismqError(f"{tensor_path} is missing or does not match its sidecar; delete both to redo that stage")
    return TensorFile(tensor_path), meta
