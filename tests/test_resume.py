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


@pytest.fixture(autouse=True)
def snapshot_after_every_layer(monkeypatch) -> None:
    """These tests kill walks at every layer: every walk takes its resume snapshot after each layer (by default
    at most one per `WalkState.min_interval` seconds)."""
    monkeypatch.setattr(WalkState, "min_interval", 0.0)


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


def _texts() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 512, (4, 32), generator=g), torch.randint(0, 512, (2, 32), generator=g)


@pytest.mark.parametrize("kill_at", [1, 2])  # after one layer of the rounding walk, after the last one (in the KL)
def test_a_killed_rounding_walk_resumes_after_its_last_finished_layer(tiny_llama_dir: Path, tmp_path: Path,
                                                                      kill_at: int) -> None:
    from prismq.rounding.lanes import round_lanes

    names = _linear_names()
    assignment = {n: "NVFP4" for n in names}
    assignment["model.layers.1.mlp.down_proj"] = "MXFP8"
    candidates = [(assignment, "rtn"), (assignment, "gptq")]
    # variants of the gptq lane branching off at layer 0 and at layer 1 (after the first kill: not yet branched)
    variants = [(1, {**assignment, f"model.layers.{i}.self_attn.o_proj": "MXFP8"}) for i in (0, 1)]
    amax = {n: torch.tensor(3.0) for n in names}
    calibration, heldout = _texts()
    with streamed(tiny_llama_dir) as (stream, calls):
        whole = round_lanes(stream, candidates, calibration, heldout, amax, progress=False,
                            spill_dir=tmp_path / "whole", variants=variants)
    state = WalkState(tmp_path / "walk", {"run": 1})
    with streamed(tiny_llama_dir, kill_at) as (stream, _), pytest.raises(Killed):
        round_lanes(stream, candidates, calibration, heldout, amax, progress=False, spill_dir=tmp_path / "resumed",
                    state=state, variants=variants)
        raise Killed  # killed during the final KL: nothing left to read
    with streamed(tiny_llama_dir) as (stream, resumed_calls):
        resumed = round_lanes(stream, candidates, calibration, heldout, amax, progress=False,
                              spill_dir=tmp_path / "resumed", state=state, variants=variants)
    assert resumed_calls == calls[kill_at:]
    assert [r.mean_kl for r in resumed.kl] == [r.mean_kl for r in whole.kl]
    assert len({r.mean_kl for r in whole.kl}) == 4
    for number, (ours, theirs) in enumerate(zip(resumed.rounded, whole.rounded)):
        expected = set(assignment) if number < 2 else {f"model.layers.{number - 2}.self_attn.o_proj"}
        assert ours.details == theirs.details and set(ours.encoded) == set(theirs.encoded) == expected
        for name in expected:
            assert all(torch.equal(t.view(torch.uint8) if t.dtype.itemsize == 1 else t,
                                   v.view(torch.uint8) if v.dtype.itemsize == 1 else v)
                       for t, v in zip(ours.encoded[name].values(), theirs.encoded[name].values())), name


@pytest.mark.parametrize("from_probe", [False, True])
def test_a_killed_input_range_walk_resumes_after_its_last_finished_layer(tiny_llama_dir: Path, tmp_path: Path,
                                                                         from_probe: bool) -> None:
    from prismq.rounding.clip import streamed_input_amax

    assignment = {n: "NVFP4" for n in _linear_names()}
    calibration, _ = _texts()
    token_max = None
    if from_probe:  # the per-token maxima the probe records
        from prismq.measure.fisher import X_TOKEN_MAX, input_statistic

        with streamed(tiny_llama_dir) as (stream, _):
            probed = probe_streamed(stream, calibration, list(assignment), sample_rows=4, progress=False)
        token_max = {n: input_statistic(probed, n, X_TOKEN_MAX) for n in assignment}
    with streamed(tiny_llama_dir) as (stream, calls):
        whole = streamed_input_amax(stream, calibration, assignment, progress=False, token_max=token_max)
    state = WalkState(tmp_path, {"run": 1})
    with streamed(tiny_llama_dir, 1) as (stream, _), pytest.raises(Killed):
        streamed_input_amax(stream, calibration, assignment, progress=False, token_max=token_max, state=state)
    with streamed(tiny_llama_dir) as (stream, resumed_calls):
        resumed = streamed_input_amax(stream, calibration, assignment, progress=False, token_max=token_max,
                                      state=state)
    assert resumed_calls == calls[1:] == [1]
    assert resumed.keys() == whole.keys() and all(torch.equal(resumed[n], whole[n]) for n in whole)


def test_a_killed_forward_walk_resumes_after_its_last_finished_layer(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from prismq.engine.stream import final_hidden_states

    _, heldout = _texts()
    with streamed(tiny_llama_dir) as (stream, _):
        whole = final_hidden_states(stream, heldout, progress=False)
    state = WalkState(tmp_path, {"run": 1})
    with streamed(tiny_llama_dir, 1) as (stream, _), pytest.raises(Killed):
        final_hidden_states(stream, heldout, progress=False, state=state)
    with streamed(tiny_llama_dir) as (stream, calls):
        resumed = final_hidden_states(stream, heldout, progress=False, state=state)
    assert calls == [1]
    assert all(torch.equal(a, b) for a, b in zip(resumed, whole))


@pytest.fixture(scope="module")
def small_vocab_moe(default_model_dir: Path, tmp_path_factory) -> Path:
    """A 2-layer Qwen3-MoE (4 routed experts per layer, stored per expert) with the default model's tokenizer."""
    import shutil

    from test_layout import tiny_moe

    path = tiny_moe("qwen3_moe", tmp_path_factory.mktemp("moe-49k") / "model", vocab_size=49152)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(default_model_dir / name, path / name)
    return path


def _quantize(model: Path, tmp_path: Path, name: str, kill_at: int | None, monkeypatch,
              settings: tuple[str, ...] = ()) -> list[int]:
    """`prismq quantize` on `model` into tmp_path/name (work directory beside it); the layers it read, in order.
    With `kill_at`: the run is killed when it asks for its kill_at-th layer. `settings`: flags that replace the
    default selection, polish, format and budget flags."""
    from prismq.cli import main

    calls: list[int] = []
    original = LayerStream.layer

    @contextmanager
    def layer(self, index: int):
        if kill_at is not None and len(calls) == kill_at:
            raise Killed
        calls.append(index)
        with original(self, index) as module:
            yield module

    monkeypatch.setattr(LayerStream, "layer", layer)
    args = ["quantize", str(model), "--out", str(tmp_path / name), "--overwrite", "--calib-blocks", "4",
            "--calib-seqlen", "32", "--heldout-blocks", "2", "--selection-blocks", "2",
            "--device", "cpu", *(settings or ("--select-units", "3", "--select-recost", "1", "--polish-units", "3",
                                              "--formats", "NVFP4,MXFP8,BF16", "--target-bits", "6"))]
    if kill_at is None:
        assert main(args) == 0
    else:
        with pytest.raises(Killed):
            main(args)
    monkeypatch.setattr(LayerStream, "layer", original)
    return calls


@pytest.mark.parametrize("model", ["small_vocab_llama", "small_vocab_moe"])
def test_a_run_killed_in_any_walk_resumes_there_and_ships_the_same_checkpoint(model: str, request, tmp_path: Path,
                                                                              monkeypatch) -> None:
    """Every walk of `prismq quantize` (probe forward and reverse, input ranges, rounding lanes, baselines, the
    export's read-back) killed at each layer it reads: the rerun reads exactly the layers not yet finished and
    writes the checkpoint, report numbers and KL of the uninterrupted run."""
    import json

    small_vocab_llama = request.getfixturevalue(model)  # the MoE's routed experts quantized too
    calls = _quantize(small_vocab_llama, tmp_path, "whole", None, monkeypatch)
    expected = {p.name: p.read_bytes() for p in (tmp_path / "whole").glob("*.safetensors")}
    expected_eval = json.loads((tmp_path / "whole.work" / "eval.json").read_text())
    for kill_at in range(1, len(calls)):
        name = f"killed-{kill_at}"
        assert _quantize(small_vocab_llama, tmp_path, name, kill_at, monkeypatch) == calls[:kill_at]
        # the checkpoint exists only when the kill came in its read-back (the last walk, 2 layers), never half
        assert (tmp_path / name).exists() == (kill_at >= len(calls) - 2)
        rerun = _quantize(small_vocab_llama, tmp_path, name, None, monkeypatch)
        assert rerun == calls[kill_at:], (kill_at, calls, rerun)
        assert {p.name: p.read_bytes() for p in (tmp_path / name).glob("*.safetensors")} == expected, kill_at
        evaluation = json.loads((tmp_path / f"{name}.work" / "eval.json").read_text())
        assert evaluation["mean_kl"] == expected_eval["mean_kl"]
        assert not list((tmp_path / f"{name}.work").rglob("*.walk"))  # walk states are gone once a stage is done


def test_a_run_killed_among_several_uniform_baselines_resumes_each_lane_as_itself(small_vocab_llama: Path,
                                                                                  tmp_path: Path,
                                                                                  monkeypatch) -> None:
    """At a budget both uniform formats fit: the killed run computed the allocation, the rerun reads it back from
    allocation.json; every baseline lane resumes as itself (regression: the lanes came back in another order and
    each went on from the other's hidden states)."""
    import json

    settings = ("--selection", "surrogate", "--formats", "NVFP4,MXFP8,BF16", "--target-bits", "9")
    calls = _quantize(small_vocab_llama, tmp_path, "whole", None, monkeypatch, settings)
    expected = json.loads((tmp_path / "whole.work" / "rounding.json").read_text())["rounding"]
    assert set(expected["baseline_evals"]) == {"MXFP8", "NVFP4"}
    for kill_at in range(1, len(calls)):
        name = f"killed-{kill_at}"
        _quantize(small_vocab_llama, tmp_path, name, kill_at, monkeypatch, settings)
        _quantize(small_vocab_llama, tmp_path, name, None, monkeypatch, settings)
        rounding = json.loads((tmp_path / f"{name}.work" / "rounding.json").read_text())["rounding"]
        for split in ("baseline_evals", "baseline_reports"):
            assert {n: r["mean_kl"] for n, r in rounding[split].items()} == \
                {n: r["mean_kl"] for n, r in expected[split].items()}, (kill_at, split)


def test_a_resume_snapshot_waits_for_its_interval(tmp_path: Path, monkeypatch) -> None:
    """`checkpoint` writes nothing until `min_interval` seconds have passed since the walk's last snapshot."""
    monkeypatch.setattr(WalkState, "min_interval", 3600.0)
    state = WalkState(tmp_path / "walk", {"run": 1})
    state.checkpoint("snap", {"x": torch.zeros(2)}, layer=1)
    assert not state.exists("snap")
    state.last_snapshot -= 3600.0  # an hour later
    state.checkpoint("snap", {"x": torch.ones(2)}, layer=2)
    assert state.load("snap")[1]["layer"] == 2
    state.checkpoint("snap", {"x": torch.ones(2)}, layer=3)  # right after: skipped
    assert state.load("snap")[1]["layer"] == 2
