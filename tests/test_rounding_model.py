"""Whole-model rounding: GPTQ layer by layer ships exactly what was evaluated; activation clipping is calibrated."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import build_tiny_llama
from torch import nn

from prismq.export.writer import write_checkpoint
from prismq.formats import get_format
from prismq.model.linears import linear_shapes, quantizable
from prismq.rounding.clip import calibrated_input_amax
from prismq.rounding.sequential import decoder_layers, round_model

MIX = {"self_attn.q_proj": "NVFP4", "self_attn.k_proj": "NVFP4", "self_attn.v_proj": "NVFP4",
       "self_attn.o_proj": "INT4_W4A16", "mlp.gate_proj": "MXFP4", "mlp.up_proj": "MXFP4", "mlp.down_proj": "FP8"}


def kl(reference: nn.Module, model: nn.Module, tokens: torch.Tensor) -> float:
    """Mean KL(reference || model) over every position."""
    with torch.no_grad():
        p = reference(tokens).logits.float().log_softmax(-1)
        q = model(tokens).logits.float().log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("rounding-src")
    build_tiny_llama(num_hidden_layers=2).save_pretrained(path)
    return path


def test_decoder_layers_are_found() -> None:
    name, layers = decoder_layers(build_tiny_llama())
    assert name == "model.layers" and len(layers) == 2


@pytest.mark.parametrize("method", ["gptq", "gptq+sweep"])
def test_gptq_model_ships_exactly_what_was_evaluated(method: str, source: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    names = list(quantizable(linear_shapes(source)))
    assignment = {n: MIX[n.split(".", 3)[3]] for n in names}
    g = torch.Generator().manual_seed(0)
    calibration = torch.randint(0, 512, (8, 64), generator=g)
    reference = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).eval()
    amax = calibrated_input_amax(reference, calibration, assignment, progress=False)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).eval()
    rounded = round_model(model, assignment, method, calibration, amax, progress=False)
    assert set(rounded.details) == set(names)  # every Linear went through GPTQ
    modules = dict(model.named_modules())
    for name, fmt in assignment.items():  # the evaluated weights are the codec's decode of the shipped tensors
        assert torch.equal(get_format(fmt).decode(rounded.encoded[name], torch.bfloat16), modules[name].weight)
    result = write_checkpoint(source, assignment, tmp_path / "out", encoded=rounded.encoded, input_amax=amax,
                              progress=False)
    loaded = AutoModelForCausalLM.from_pretrained(result.path, dtype=torch.bfloat16).eval()
    tokens = torch.randint(0, 512, (2, 40), generator=g)
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, loaded(tokens).logits)  # transformers + CT compute the same

    rtn = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).eval()
    round_model(rtn, assignment, "rtn", calibration, amax, progress=False)
    assert kl(reference, model, calibration) < kl(reference, rtn, calibration)
    ratios = rounded.error_ratios()
    assert all(r <= 1.0 for r in ratios.values()) and sum(ratios.values()) / len(ratios) < 0.9


def test_unknown_rounding_is_refused() -> None:
    from prismq.errors import PrismqError

    with pytest.raises(PrismqError, match="unknown rounding 'awq'"):
        round_model(build_tiny_llama(), {}, "awq", torch.zeros(1, 4, dtype=torch.long), {})  # type: ignore[arg-type]


class OneLinear(nn.Module):
    """A 'model' whose input is already the activation, so its calibration data can be constructed exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(64, 8, bias=False)

    def forward(self, x: torch.Tensor, use_cache: bool = False) -> torch.Tensor:
        return self.proj(x)


def quantization_error(x: torch.Tensor, clip: torch.Tensor) -> float:
    """Summed squared error of NVFP4 activation quantization of x under the input range `clip`."""
    from prismq.formats.nvfp4 import global_scale

    x = x.reshape(-1, x.shape[-1])
    return float((get_format("NVFP4").qdq_activation(x, global_scale(clip)) - x).square().sum())


def test_activation_clipping_picks_the_lowest_error_candidate_and_keeps_outlier_tokens() -> None:
    g = torch.Generator().manual_seed(0)
    plain = torch.randn(4, 256, 64, generator=g)
    model = OneLinear()
    (chosen,) = calibrated_input_amax(model, plain, {"proj": "NVFP4"}, progress=False).values()
    token_max = plain.abs().amax(-1).flatten()
    candidates = [token_max.max(), *torch.quantile(token_max, torch.tensor([0.9999, 0.999, 0.99]))]
    errors = [quantization_error(plain, c) for c in candidates]
    assert float(chosen) == pytest.approx(float(candidates[errors.index(min(errors))]))
    assert float(chosen) < float(token_max.max())  # on Gaussian inputs a slight clip wins (measured)

    spiked = plain.clone()
    spiked[0, 3, 5] = 1e6  # a lone huge value (like an attention-sink token): clipping it would cost far more
    (kept,) = calibrated_input_amax(model, spiked, {"proj": "NVFP4"}, progress=False).values()
    assert float(kept) == 1e6


def test_routed_experts_share_one_clipped_range_per_layer_and_kind_chosen_on_their_samples() -> None:
    """A layer's experts of one projection kind share one range: candidates from every routed token's maximum
    (tokens not routed, -1, ignored), the one whose NVFP4 quantization of the experts' input samples errs least."""
    from prismq.rounding.ranges import clipped_routed_inputs

    g = torch.Generator().manual_seed(0)
    stem = "model.layers.0.mlp.experts"
    names = [f"{stem}.{e}.{p}" for e in range(3) for p in ("gate_proj", "down_proj")]
    token_max = {n: torch.rand(512, generator=g) * 4 + 1 for n in names}
    token_max[f"{stem}.2.gate_proj"][::2] = -1.0  # tokens expert 2 did not receive
    token_max[f"{stem}.1.down_proj"][7] = 1e5  # an outlier no sample holds: clipping it wins
    samples = {n: torch.randn(64, 64, generator=g) for n in names}
    ranges = clipped_routed_inputs(token_max, samples, dict.fromkeys(names, "NVFP4"), torch.float32)
    for kind in ("gate_proj", "down_proj"):
        members = [n for n in names if n.endswith(kind)]
        assert len({float(ranges[n]) for n in members}) == 1
        routed = torch.cat([token_max[n][token_max[n] >= 0] for n in members])
        candidates = [routed.max(), *torch.quantile(routed, torch.tensor([0.9999, 0.999, 0.99]))]
        routed_share = {n: float((token_max[n] >= 0).sum()) / 64 for n in members}  # tokens per sample row
        errors = [sum(quantization_error(samples[n], c) * routed_share[n] for n in members) for c in candidates]
        assert float(ranges[members[0]]) == pytest.approx(float(candidates[errors.index(min(errors))]))
    assert float(ranges[f"{stem}.0.down_proj"]) < 1e5
    unused = clipped_routed_inputs({"m.experts.0.up_proj": torch.full((8,), -1.0)},
                                   {"m.experts.0.up_proj": torch.zeros(8, 64)}, {"m.experts.0.up_proj": "NVFP4"},
                                   torch.float32)
    assert float(unused["m.experts.0.up_proj"]) == torch.finfo(torch.float32).tiny


def test_activation_clipping_is_shared_by_fused_siblings() -> None:
    model = build_tiny_llama()
    calibration = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(1))
    assignment = {f"model.layers.0.self_attn.{p}_proj": "NVFP4" for p in "qkv"}
    assignment["model.layers.0.mlp.down_proj"] = "MXFP8"  # no static input scale: not calibrated
    amax = calibrated_input_amax(model, calibration, assignment, progress=False)
    assert set(amax) == {f"model.layers.0.self_attn.{p}_proj" for p in "qkv"}
    assert len({float(v) for v in amax.values()}) == 1


def test_input_hessians_sum_every_token_although_later_batches_stop_early() -> None:
    """X^T X of each Linear's input over three batches equals the sum built from inputs captured on full forwards
    (the early stop after the last Linear's input, from the second batch on, drops nothing)."""
    from prismq.rounding.sequential import first_layer_inputs, input_hessians

    model = build_tiny_llama()
    _, layers = decoder_layers(model)
    inputs = first_layer_inputs(model, layers, torch.randint(0, 512, (3, 16), generator=torch.Generator()), 1)
    layer = layers[0]
    modules = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    captured: dict[str, list[torch.Tensor]] = {n: [] for n in modules}
    handles = [m.register_forward_pre_hook(
        lambda _m, args, n=n: captured[n].append(args[0].reshape(-1, args[0].shape[-1]).double()))
        for n, m in modules.items()]
    with torch.no_grad():
        for hidden, kwargs in inputs:
            layer(hidden, **kwargs)
    for handle in handles:
        handle.remove()
    got = input_hessians(layer, modules, inputs)
    for name, xs in captured.items():
        x = torch.cat(xs)
        assert len(xs) == 3
        torch.testing.assert_close(got[name].double(), x.T @ x, rtol=1e-5, atol=1e-4)
