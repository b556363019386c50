"""Work-directory artifacts: round trip, and corrupt or stale files give clear errors instead of silent reuse."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prismq.artifacts import fingerprint_model, fingerprint_tokens, read_json, read_tensors, write_json, write_tensors
from prismq.errors import PrismqError


def test_tensor_artifact_round_trip_and_absence(tmp_path: Path) -> None:
    assert read_tensors(tmp_path / "probe", "probe") is None
    tensors = {"a.fisher": torch.arange(6.0).reshape(2, 3), "b.amax": torch.tensor(3.5)}
    write_tensors(tmp_path / "probe", "probe", tensors, {"model": "m1", "tokens": 42})
    loaded, meta = read_tensors(tmp_path / "probe", "probe", expect={"model": "m1"})
    assert torch.equal(loaded["a.fisher"], tensors["a.fisher"]) and meta["tokens"] == 42
    assert sorted(p.name for p in tmp_path.iterdir()) == ["probe.json", "probe.safetensors"]


def test_stale_corrupt_and_foreign_artifacts_are_refused(tmp_path: Path) -> None:
    write_tensors(tmp_path / "probe", "probe", {"x": torch.ones(3)}, {"model": "m1"})
    with pytest.raises(PrismqError, match="stale.*model='m1'.*'m2'"):
        read_tensors(tmp_path / "probe", "probe", expect={"model": "m2"})
    with pytest.raises(PrismqError, match="not a cost artifact"):
        read_tensors(tmp_path / "probe", "cost")
    data = (tmp_path / "probe.safetensors").read_bytes()
    (tmp_path / "probe.safetensors").write_bytes(data[:-4] + b"\0\0\0\1")
    with pytest.raises(PrismqError, match="does not match its sidecar"):
        read_tensors(tmp_path / "probe", "probe")
    (tmp_path / "cost.json").write_text('{"kind": "cost", "schema_')
    with pytest.raises(PrismqError, match="corrupt"):
        read_json(tmp_path / "cost.json", "cost")
    write_json(tmp_path / "cost.json", "cost", {"rows": []})
    assert read_json(tmp_path / "cost.json", "cost")["rows"] == []


def test_fingerprints_change_with_what_they_identify(tiny_llama_dir: Path, tmp_path: Path) -> None:
    blocks = torch.arange(12).reshape(3, 4)
    assert fingerprint_tokens(blocks) == fingerprint_tokens(blocks.clone())
    assert fingerprint_tokens(blocks) != fingerprint_tokens(blocks.reshape(4, 3))
    assert fingerprint_tokens(blocks) != fingerprint_tokens(blocks + 1)
    first = fingerprint_model(tiny_llama_dir)
    assert first == fingerprint_model(tiny_llama_dir)
    from conftest import build_tiny_llama

    other = tmp_path / "other"
    build_tiny_llama(seed=1).save_pretrained(other)
    assert fingerprint_model(other) != first
