"""Killing a walk of the decoder stack in the middle and running it again: it resumes after its last finished layer
(the layers it materializes on the rerun are exactly the ones it had not finished) and gives the results of an
uninterrupted run, bit for bit."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from conftest import build_tiny_llama
from prismq.engine.stream import LayerStream
from prismq.engine.walkstate import WalkState
from prismq.measure.fisher_streamed import probe_streamed


class Killed(Exception):
    """Stands for the process being killed while a layer is being read."""


@contextmanager
def streamed(model_dir: Path, kill_at: int | None = None):
    """A LayerStream whose `layer` calls are recorded (the list yielded) and, from call number `kill_at` on, raise."""
    calls: list[int] = []
    with LayerStream(model_dir, torch.float32) as stream:
        original = stream.layer

        @contextmanager
        def layer(index: int):
            if kill_at is not None and len(calls) == kill_at:
                raise Killed
            calls.append(index)
            with original(index) as module:
                yield module

        stream.layer = layer  # type: ignore[method-assign]
        yield stream, calls


def _linear_names() -> list[str]:
    return [n for n, m in build_tiny_llama().named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]


@pytest.mark.parametrize("kill_at", [1, 2, 3])  # in the forward walk, at its end, in the reverse walk
def test_a_killed_probe_resumes_after_its_last_finished_layer(tiny_llama_dir: Path, tmp_path: Path,
                                                              kill_at: int) -> None:
    names, blocks = _linear_names(), torch.randint(0, 512, (3, 24), generator=torch.Generator().manual_seed(4))
    with streamed(tiny_llama_dir) as (stream, calls):
        whole = dict(probe_streamed(stream, blocks, names, sample_rows=10, progress=False))
    assert calls == [0, 1, 1, 0]  # forward walk, reverse walk
    state = WalkState(tmp_path / "walk", {"run": "this one"})
    with streamed(tiny_llama_dir, kill_at) as (stream, _), pytest.raises(Killed):
        probe_streamed(stream, blocks, names, sample_rows=10, progress=False, state=state)
    with streamed(tiny_llama_dir) as (stream, resumed_calls):
        resumed = dict(probe_streamed(stream, blocks, names, sample_rows=10, progress=False, state=state))
    assert resumed_calls == calls[kill_at:]
    assert resumed.keys() == whole.keys()
    assert all(torch.equal(resumed[key], value) for key, value in whole.items())


def test_a_walk_state_of_other_inputs_is_not_resumed(tiny_llama_dir: Path, tmp_path: Path) -> None:
    names, blocks = _linear_names(), torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(5))
    with streamed(tiny_llama_dir, 3) as (stream, _), pytest.raises(Killed):
        probe_streamed(stream, blocks, names, sample_rows=4, progress=False,
                       state=WalkState(tmp_path, {"text": "a"}))
    with streamed(tiny_llama_dir) as (stream, calls):
        probe_streamed(stream, blocks, names, sample_rows=4, progress=False, state=WalkState(tmp_path, {"text": "b"}))
    assert calls == [0, 1, 1, 0]  # started over
