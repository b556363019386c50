"""The Python API: prismq.quantize validates settings like the CLI and runs the stage list up to `until`."""

from __future__ import annotations

import pytest

import prismq
from prismq.errors import PrismqError


def test_quantize_validates_and_runs_the_stages(monkeypatch: pytest.MonkeyPatch) -> None:
    import prismq.pipeline as pipeline

    calls = []
    monkeypatch.setattr(pipeline, "quantize", lambda config, until="export": calls.append((config, until)) or "ran")
    assert prismq.quantize("some/model", target_bits=4.75, work_dir="w", until="allocate") == "ran"
    config, until = calls[0]
    assert (config.model, config.target_bits, until) == ("some/model", 4.75, "allocate")
    with pytest.raises(PrismqError, match="exactly one of --target-bits"):
        prismq.quantize(out="o")
    with pytest.raises(PrismqError, match="out is required"):
        prismq.quantize(uniform="NVFP4")
    assert len(calls) == 1
