"""The streaming engine on a GPU: hidden states spilled to host memory when they do not fit beside a layer give the
results of a walk that keeps them on the device. Skipped where there is no CUDA device."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import build_tiny_llama
from prismq.engine.stream import LayerStream
from prismq.rounding.lanes import round_lanes

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_spilled_hidden_states_give_the_results_of_resident_ones(tiny_llama_dir: Path, caplog) -> None:
    names = [n for n, m in build_tiny_llama().named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    assignment = {n: "NVFP4" for n in names}
    g = torch.Generator().manual_seed(3)
    calibration, heldout = torch.randint(0, 512, (16, 64), generator=g), torch.randint(0, 512, (4, 64), generator=g)
    amax = {n: torch.tensor(3.0) for n in names}
    candidates = [(assignment, "rtn"), (assignment, "gptq")]
    with LayerStream(tiny_llama_dir, torch.float32, "cuda") as roomy:
        resident = round_lanes(roomy, candidates, calibration, heldout, amax, progress=False)
        budget = roomy.resident_bytes() + int(1.5 * roomy.layer_bytes(0))  # a layer fits, the hidden states do not
    with caplog.at_level("INFO", logger="prismq"), LayerStream(tiny_llama_dir, torch.float32, "cuda",
                                                               max_memory=budget) as tight:
        spilled = round_lanes(tight, candidates, calibration, heldout, amax, progress=False)
    assert "kept in host memory" in caplog.text
    assert [r.mean_kl for r in spilled.kl] == [r.mean_kl for r in resident.kl]
    for ours, theirs in zip(spilled.rounded, resident.rounded):
        assert all(torch.equal(t.view(torch.uint8) if t.dtype.itemsize == 1 else t,
                               theirs.encoded[n][k].view(torch.uint8) if t.dtype.itemsize == 1 else theirs.encoded[n][k])
                   for n, tensors in ours.encoded.items() for k, t in tensors.items())


def test_spilled_flip_lanes_measure_what_resident_ones_do(tiny_llama_dir: Path, caplog) -> None:
    from prismq.select.measured import Flip, measure_flips

    names = [n for n, m in build_tiny_llama().named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    base = {n: "NVFP4" for n in names}
    flips = [Flip(("model.layers.0.mlp.down_proj",), "MXFP8"), Flip(("model.layers.1.self_attn.o_proj",), "BF16")]
    blocks = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(4))
    amax = {n: torch.tensor(3.0) for n in names}
    with LayerStream(tiny_llama_dir, torch.float32, "cuda") as roomy:
        resident = measure_flips(roomy, base, flips, blocks, amax, progress=False)
        budget = roomy.resident_bytes() + int(2.2 * roomy.layer_bytes(0))  # two layers fit, with the lanes not
    with caplog.at_level("INFO", logger="prismq"), LayerStream(tiny_llama_dir, torch.float32, "cuda",
                                                               max_memory=budget) as tight:
        spilled = measure_flips(tight, base, flips, blocks, amax, progress=False)
    assert "kept in host memory" in caplog.text
    assert spilled.base.mean_kl == resident.base.mean_kl
    assert [f.delta_kl for f in spilled.flips] == [f.delta_kl for f in resident.flips]
