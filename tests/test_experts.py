"""Routed experts are quantization targets: each expert's gate, up and down inside transformers 5's fused 3-D
parameters, named as the checkpoint stores them, probed with a per-token Fisher over the tokens routed to them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from prismq.engine.stream import BATCH_BLOCKS, LayerStream
from prismq.measure.fisher_streamed import probe_streamed
from prismq.model.source import load_model
from prismq.model.targets import model_targets
from prismq.model.units import legal_formats, model_units
from test_layout import tiny_moe


@pytest.fixture(scope="module")
def qwen3_moe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_moe("qwen3_moe", tmp_path_factory.mktemp("qwen3_moe") / "model")


def test_each_expert_projection_is_a_target_named_as_stored(qwen3_moe_dir: Path) -> None:
    from safetensors import safe_open

    targets = model_targets(qwen3_moe_dir)
    experts = {name: t for name, t in targets.items() if t.expert is not None}
    assert len(experts) == 2 * 4 * 3  # layers x experts x (gate, up, down)
    gate, up = targets["model.layers.1.mlp.experts.2.gate_proj"], targets["model.layers.1.mlp.experts.2.up_proj"]
    assert (gate.module, gate.parameter_name, gate.expert, gate.rows) == ("model.layers.1.mlp.experts", "gate_up_proj",
                                                                          2, (0, 32))
    assert up.rows == (32, 64) and gate.shape == up.shape == (32, 64)
    assert targets["model.layers.1.mlp.experts.2.down_proj"].shape == (64, 32)
    model = load_model(qwen3_moe_dir, torch.float32)
    modules = dict(model.named_modules())
    with safe_open(str(qwen3_moe_dir / "model.safetensors"), framework="pt") as handle:
        for target in experts.values():
            assert torch.equal(target.weight(modules, torch.bfloat16), handle.get_tensor(target.key))
    units = {unit.name: unit for unit in model_units(qwen3_moe_dir)}
    assert len(units["model.layers.0.mlp.experts"].members) == 12  # every expert of the layer: one format
    assert not any(".mlp.gate" in name for name in targets)  # the router (a weight, no Linear) stays as it is


def _dense_experts_forward(self, hidden_states, top_k_index, top_k_weights):  # noqa: ANN001
    """An independent MoE experts forward: every expert on every token, weighted by its routing weight (zero where
    the token was not routed); each expert's outputs keep their gradients for the reference Fisher."""
    weights = torch.zeros(hidden_states.shape[0], self.num_experts, dtype=hidden_states.dtype)
    weights.scatter_(1, top_k_index, top_k_weights.to(hidden_states.dtype))
    out = torch.zeros_like(hidden_states)
    for expert in range(self.num_experts):
        gate_up = F.linear(hidden_states, self.gate_up_proj[expert])
        if gate_up.requires_grad:
            gate_up.retain_grad()
        gate, up = gate_up.chunk(2, dim=-1)
        inner = self.act_fn(gate) * up
        down = F.linear(inner, self.down_proj[expert])
        if down.requires_grad:
            down.retain_grad()
        self.seen.append((expert, hidden_states, gate_up, inner, down, weights[:, expert] != 0))
        out = out + down * weights[:, expert, None]
    return out


def test_expert_fisher_is_the_per_token_fisher_over_routed_tokens(qwen3_moe_dir: Path, monkeypatch) -> None:
    from transformers.models.qwen3_moe import modeling_qwen3_moe as qwen3_moe

    blocks = torch.randint(0, 256, (3, 10), generator=torch.Generator().manual_seed(2))
    with LayerStream(qwen3_moe_dir, torch.float64) as stream:
        names = [n for n, t in stream.targets.items() if n != "lm_head"]
        probed = dict(probe_streamed(stream, blocks, names, sample_rows=8, progress=False, batch_blocks=2))
    # the reference: the whole model in float64, each expert run densely on every token (zero weight where not
    # routed), Fisher and input statistics summed over routed tokens from the retained per-expert output gradients
    model = load_model(qwen3_moe_dir, torch.float64)
    monkeypatch.setattr(qwen3_moe.Qwen3MoeExperts, "forward", _dense_experts_forward)
    total = blocks.numel()
    expected: dict[str, torch.Tensor] = {}
    for layer in model.model.layers:
        layer.mlp.experts.seen = []
    for block_index, block in enumerate(blocks):
        logits = model(block[None], use_cache=False).logits
        F.cross_entropy(logits[0, :-1], block[1:], reduction="sum").backward()
        for index, layer in enumerate(model.model.layers):
            for expert, x, gate_up, inner, down, routed in layer.mlp.experts.seen:
                base = f"model.layers.{index}.mlp.experts.{expert}"
                gate_up_fisher = (x.detach().square().sum(1)[routed] @ gate_up.grad[routed].square())
                down_fisher = (inner.detach().square().sum(1)[routed] @ down.grad[routed].square())
                for name, value in ((f"{base}.gate_proj.fisher_out", gate_up_fisher[:32]),
                                    (f"{base}.up_proj.fisher_out", gate_up_fisher[32:]),
                                    (f"{base}.down_proj.fisher_out", down_fisher),
                                    (f"{base}.gate_proj.x_sq", x.detach()[routed].square().sum(0)),
                                    (f"{base}.down_proj.x_sq", inner.detach()[routed].square().sum(0)),
                                    (f"{base}.gate_proj.routed_tokens", routed.sum().double())):
                    expected[name] = expected.get(name, 0) + value
                token_max = expected.setdefault(f"{base}.gate_proj.x_token_max",
                                                torch.full((total,), -1.0, dtype=torch.float64))
                rows = routed.nonzero().flatten()  # each routed token's max |x| at its place among all blocks'
                token_max[block_index * blocks.shape[1] + rows] = x.detach()[rows].abs().amax(-1)
            layer.mlp.experts.seen = []
    model.zero_grad()
    routed_somewhere = 0
    for name, value in expected.items():
        got = probed[name].double()
        want = value if name.endswith(("routed_tokens", "x_token_max")) else value / total
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-12), name
        routed_somewhere += name.endswith("routed_tokens") and float(value) > 0
    assert routed_somewhere > 0
    sample = probed["model.layers.0.mlp.experts.1.gate_proj.x_sample"]
    assert sample.shape == (8, 64) and sample.abs().sum() > 0
    token_max = probed["model.layers.0.mlp.experts.1.gate_proj.x_token_max"]
    assert int((token_max >= 0).sum()) == int(probed["model.layers.0.mlp.experts.1.gate_proj.routed_tokens"])


MOE_MIX = ["NVFP4", "FP8", "INT4_W4A16", "MXFP8", "NVFP4A16", "MXFP4", "BF16", "INT8_W8A16"]


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "mixtral", "minimax_m2", "glm4_moe", "deepseek_v3",
                                    "qwen3_next", "qwen3_5_moe_text", "qwen3_5_moe", "qwen3_5_text",
                                    "gemma3_text", "gemma4_text", "gemma4_moe"])
def test_a_moe_export_decompresses_to_our_decode_and_computes_the_fake_quantized_model(family: str,
                                                                                        tmp_path: Path) -> None:
    """Every unit in a different format (routed experts included): each expert matrix decompressed by
    compressed-tensors equals prismq's decode of the same bytes, and the model rebuilt from the export (experts
    decompressed into the fused parameters, their inputs quantized as the runtime does) computes exactly the logits
    of the in-memory model fake-quantized from the same tensors."""
    import json
    from contextlib import ExitStack

    from prismq.engine.stream import final_hidden_states
    from prismq.export.encode import encode_model
    from prismq.export.writer import write_checkpoint
    from prismq.formats import get_format
    from prismq.model.checkpoint import SourceTensors
    from prismq.model.readback import CompressedExperts
    from prismq.model.fake_quant import apply_fake_quant

    source = tiny_moe(family, tmp_path / "source")
    targets = model_targets(source)
    units = model_units(source)
    assignment: dict[str, str] = {}
    expert_units = [u for u in units if ".experts." in u.members[0]]
    for index, unit in enumerate([u for u in units if u not in expert_units] + expert_units):
        offered = legal_formats(unit, MOE_MIX)
        assignment.update(dict.fromkeys(unit.members, offered[index % len(offered)]))
    if family == "gemma4_moe":  # experts stored fused (3-D) on disk: layer 0's kept whole, layer 1's per expert
        assignment.update(dict.fromkeys(expert_units[0].members, "BF16"))
        assignment.update(dict.fromkeys(expert_units[1].members, "NVFP4"))
    amax = {name: torch.tensor(2.0 + (i % 3)) for i, name in enumerate(targets)}
    expert_formats = {assignment[n] for n, t in targets.items() if t.expert is not None}
    assert len(expert_formats) == len(expert_units) and expert_formats != {"BF16"}
    result = write_checkpoint(source, assignment, tmp_path / "export", input_amax=_layer_wide(amax, targets),
                              progress=False)
    qconfig = json.loads((result.path / "config.json").read_text())["quantization_config"]
    listed = [t for g in qconfig["config_groups"].values() for t in g["targets"]] + qconfig["ignore"]
    assert not any(".experts.0." in t for t in listed)  # experts named by one regex per layer and projection

    with ExitStack() as stack:
        written = SourceTensors(result.path, stack)
        stored = SourceTensors(source, stack)
        unloaded = [k for k in stored.location if k.startswith("mtp.") or ".visual." in k]  # MTP head, vision
        assert all(torch.equal(written.get(k), stored.get(k)) for k in unloaded)  # passed through byte for byte
        assert bool(unloaded) == (family == "qwen3_5_moe")
        if family == "gemma4_moe":
            fused = "model.layers.{}.experts.gate_up_proj"
            assert fused.format(0) in written.location and fused.format(1) not in written.location
            assert "model.layers.1.experts.3.up_proj.weight_packed" in written.location
        experts = CompressedExperts(written, qconfig)
        checked = 0
        for name, target in targets.items():
            if target.expert is None or get_format(assignment[name]).scheme() is None:
                continue
            fmt = get_format(assignment[name])
            tensors = {k.removeprefix(name + "."): written.get(k) for k in written.location
                       if k.startswith(name + ".") and "." not in k.removeprefix(name + ".")}
            assert torch.equal(experts.decompressed(f"{name}.weight"), fmt.decode(tensors, torch.bfloat16)), name
            assert experts.format_of(name) is fmt
            checked += 1
        assert checked > 0 or not expert_units

    blocks = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    model = load_model(source, torch.float32)
    encoded = encode_model(model, assignment, _layer_wide(amax, targets), torch.bfloat16, targets)
    apply_fake_quant(model, assignment, encoded, torch.bfloat16, targets)
    with torch.no_grad():
        expected = [row for batch in blocks.split(BATCH_BLOCKS)  # the blocks the stream runs together
                    for row in model.model(batch, use_cache=False).last_hidden_state]
    with LayerStream(result.path, torch.float32) as stream:
        rebuilt = final_hidden_states(stream, blocks, progress=False)
    assert all(torch.equal(got, want) for got, want in zip(rebuilt, expected))


def _layer_wide(amax: dict[str, torch.Tensor], targets) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """Input maxima as the rounding stage gives them: one per input group (a layer's experts share theirs)."""
    from prismq.model.siblings import input_groups

    joint = {}
    for group in input_groups(amax):
        joint.update(dict.fromkeys(group, torch.stack([amax[n] for n in group]).amax()))
    return joint


def test_expert_gptq_uses_each_experts_routed_inputs(qwen3_moe_dir: Path, monkeypatch) -> None:
    """Each expert's Hessian is X^T X over exactly the tokens routed to it (gate and up: the block's input rows;
    down: the activation rows), checked against the dense reference; GPTQ on it beats rounding to nearest there."""
    from transformers.models.qwen3_moe import modeling_qwen3_moe as qwen3_moe

    from prismq.formats import get_format
    from prismq.rounding.gptq import GPTQSettings, output_error
    from prismq.rounding.sequential import RoundedModel, expert_hessians, round_layer

    blocks = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(4))
    with LayerStream(qwen3_moe_dir, torch.float32) as stream:
        inputs = stream.first_inputs(blocks, 1)
        names = [n for n, t in stream.targets.items() if t.module == "model.layers.0.mlp.experts"]
        with stream.layer(0) as layer:
            modules = stream.layer_names(0, layer)
            gate_and_down = {n: stream.targets[n] for n in names if not n.endswith("up_proj")}
            hessians = expert_hessians(layer, modules, gate_and_down, inputs)
            # the reference: the same layer with the dense experts forward, which records every expert's inputs
            layer.mlp.experts.seen = []
            with monkeypatch.context() as patch, torch.no_grad():
                patch.setattr(qwen3_moe.Qwen3MoeExperts, "forward", _dense_experts_forward)
                for hidden, kwargs in inputs:
                    layer(hidden, **kwargs)
            for expert, x, _gate_up, inner, _down, routed in layer.mlp.experts.seen:
                for name, rows in ((f"model.layers.0.mlp.experts.{expert}.gate_proj", x[routed]),
                                   (f"model.layers.0.mlp.experts.{expert}.down_proj", inner[routed])):
                    hessians[name] -= rows.T @ rows
            assert all(float(h.abs().max()) < 1e-4 for h in hessians.values())
            del layer.mlp.experts.seen
            reference = expert_hessians(layer, modules, gate_and_down, inputs)
            original = {n: stream.targets[n].weight(modules, torch.bfloat16).clone() for n in names}
            result = RoundedModel({})
            downs = [[n] for n in names if n.endswith("down_proj")]
            round_layer(layer, modules, downs, dict.fromkeys(names, "NVFP4A16"),
                        "gptq", inputs, {}, GPTQSettings(), torch.bfloat16, result, stream.targets)
    fmt = get_format("NVFP4A16")
    better = 0
    for name in (n for n in names if n.endswith("down_proj")):
        shipped = fmt.decode(result.encoded[name], torch.bfloat16)
        rtn = fmt.decode(fmt.encode(original[name], shared_amax=original[name].abs().amax()), torch.bfloat16)
        gptq_error = output_error(original[name], shipped, reference[name])
        assert gptq_error <= output_error(original[name], rtn, reference[name]) * (1 + 1e-6)
        better += gptq_error < output_error(original[name], rtn, reference[name])
    assert better >= 2  # routed experts' GPTQ found lower output errors than rounding to nearest
