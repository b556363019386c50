"""The layer-streaming engine against the in-memory model: the same hidden states, roundings, clip ranges and KL,
bit for bit, with only one decoder layer materialized at a time."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import build_tiny_llama
from prismq.engine.stream import BATCH_BLOCKS, LayerStream, run_layer
from prismq.errors import PrismqError
from prismq.export.encode import encode_model
from prismq.measure.kl import evaluate_candidates
from prismq.model.fake_quant import apply_fake_quant
from prismq.model.source import load_model
from prismq.rounding.clip import calibrated_input_amax, streamed_input_amax
from prismq.rounding.lanes import round_lanes
from prismq.rounding.sequential import round_model


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama-tied")
    build_tiny_llama(seed=3, tie_word_embeddings=True).save_pretrained(path)
    return path


def _tensor_bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype.itemsize == 1 else t


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tied_dir"])
def test_streamed_forward_equals_the_loaded_model(fixture: str, dtype: torch.dtype,
                                                  request: pytest.FixtureRequest) -> None:
    model_dir = request.getfixturevalue(fixture)
    blocks = torch.randint(0, 512, (3, 17), generator=torch.Generator().manual_seed(0))
    with LayerStream(model_dir, dtype) as stream:
        inputs = stream.first_inputs(blocks, 2)
        for index in range(len(stream)):
            with stream.layer(index) as layer:
                inputs = run_layer(layer, inputs)
            assert all(p.device.type == "meta" for p in stream.layers.parameters())  # nothing else materialized
        with torch.no_grad():
            hidden = torch.cat([stream.final_hidden(h) for h, _ in inputs])
            logits = stream.head(hidden)
    model = load_model(model_dir, dtype)
    with torch.no_grad():
        expected = torch.cat([model(b, use_cache=False).logits for b in blocks.split(2)])
    assert torch.equal(logits, expected)


def test_round_lanes_equal_whole_model_rounding_and_kl(tiny_llama_dir: Path, tmp_path: Path) -> None:
    names = [n for n, m in build_tiny_llama().named_modules() if isinstance(m, torch.nn.Linear)]
    assignment = {n: ("BF16" if n == "lm_head" else "NVFP4") for n in names}
    assignment["model.layers.1.mlp.down_proj"] = "MXFP8"
    assignment["model.layers.0.self_attn.o_proj"] = "BF16"
    amax = {n: torch.tensor(3.0) for n in names}
    g = torch.Generator().manual_seed(1)
    calibration, heldout = torch.randint(0, 512, (6, 32), generator=g), torch.randint(0, 512, (3, 32), generator=g)
    methods = ["rtn", "gptq", "gptq+sweep"]
    with LayerStream(tiny_llama_dir, torch.float32) as stream:
        walk = round_lanes(stream, [(assignment, m) for m in methods], calibration, heldout, amax, progress=False)
        again = round_lanes(stream, [(assignment, "gptq")], calibration, heldout, amax, progress=False,
                            reference_hidden=walk.reference_hidden, spill_dir=tmp_path)  # tensors kept on disk
    models = []
    for method, streamed in zip(methods, walk.rounded):
        model = load_model(tiny_llama_dir, torch.float32)
        whole = round_model(model, assignment, method, calibration, amax, progress=False, weight_dtype=torch.bfloat16)
        assert set(whole.encoded) == set(streamed.encoded) == set(assignment)
        for name, tensors in whole.encoded.items():
            assert tensors.keys() == streamed.encoded[name].keys()
            assert all(torch.equal(_tensor_bits(t), _tensor_bits(streamed.encoded[name][k])) for k, t in tensors.items())
        assert whole.details == streamed.details
        models.append(model)
    expected = evaluate_candidates(load_model(tiny_llama_dir, torch.float32), models, heldout, progress=False)
    assert [r.mean_kl for r in walk.kl] == [r.mean_kl for r in expected]
    assert [r.p99_kl for r in walk.kl] == [r.p99_kl for r in expected]
    assert again.kl[0].mean_kl == walk.kl[1].mean_kl
    assert len(list((tmp_path / "candidate-0").glob("*.safetensors"))) == 3  # one file per layer, one for lm_head
    assert set(again.rounded[0].encoded) == set(assignment)
    for name, tensors in walk.rounded[1].encoded.items():
        spilled = again.rounded[0].encoded[name]
        assert all(torch.equal(_tensor_bits(t), _tensor_bits(spilled[k])) for k, t in tensors.items())
    assert walk.kl[0].mean_kl > 0


def test_a_variant_ships_the_lanes_tensors_with_its_own_and_measures_them(tiny_llama_dir: Path) -> None:
    names = [n for n, m in build_tiny_llama().named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    base = {n: "NVFP4" for n in names}
    late = {**base, "model.layers.1.mlp.down_proj": "MXFP8"}  # differs from the base on layer 1 only
    early = {**late, **{f"model.layers.0.self_attn.{p}_proj": "BF16" for p in "qkv"}}
    amax = {n: torch.tensor(3.0) for n in names}
    g = torch.Generator().manual_seed(5)
    calibration, heldout = torch.randint(0, 512, (4, 32), generator=g), torch.randint(0, 512, (2, 32), generator=g)
    variants = [(0, late), (0, early), (0, base), (1, late)]
    with LayerStream(tiny_llama_dir, torch.float32) as stream:
        walk = round_lanes(stream, [(base, "gptq+sweep"), (base, "rtn")], calibration, heldout, amax,
                           progress=False, variants=variants)
        alone = round_lanes(stream, [(late, "gptq+sweep")], calibration, heldout, amax, progress=False)
    down = "model.layers.1.mlp.down_proj"
    assert set(walk.rounded[2].encoded) == set(walk.rounded[5].encoded) == {down}
    assert set(walk.rounded[3].encoded) == {down, *(f"model.layers.0.self_attn.{p}_proj" for p in "qkv")}
    assert not walk.rounded[4].encoded
    # the first changed layer sees the inputs a walk of the variant alone sees: the same tensors there
    assert all(torch.equal(_tensor_bits(t), _tensor_bits(alone.rounded[0].encoded[down][k]))
               for k, t in walk.rounded[2].encoded[down].items())
    models = []
    for number, (lane, assignment) in enumerate(variants):
        tensors = {**{n: walk.rounded[lane].encoded[n] for n in names}, **walk.rounded[2 + number].encoded}
        model = load_model(tiny_llama_dir, torch.float32)
        apply_fake_quant(model, assignment, tensors, torch.bfloat16)
        models.append(model)
    expected = evaluate_candidates(load_model(tiny_llama_dir, torch.float32), models, heldout, progress=False)
    assert [r.mean_kl for r in walk.kl[2:]] == [r.mean_kl for r in expected]
    assert walk.kl[4].mean_kl == walk.kl[0].mean_kl != walk.kl[2].mean_kl
    assert walk.kl[5].mean_kl != walk.kl[2].mean_kl  # the rtn lane's variant is rounded to nearest


def test_a_method_variant_rounds_every_unit_on_the_lanes_inputs_and_measures_what_it_ships(
        tiny_llama_dir: Path) -> None:
    """`--rounding best`: gptq and rtn are variants of the gptq+sweep lane (its calibration hidden states and
    Hessians, one calibration pass), each with its own tensors for every unit that rounds weights."""
    names = [n for n, m in build_tiny_llama().named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    base = {**{n: "NVFP4" for n in names}, "model.layers.0.mlp.up_proj": "BF16", "model.layers.0.mlp.gate_proj": "BF16"}
    amax = {n: torch.tensor(3.0) for n in names}
    g = torch.Generator().manual_seed(5)
    calibration, heldout = torch.randint(0, 512, (4, 32), generator=g), torch.randint(0, 512, (2, 32), generator=g)
    with LayerStream(tiny_llama_dir, torch.float32) as stream:
        walk = round_lanes(stream, [(base, "gptq+sweep")], calibration, heldout, amax, progress=False,
                           variants=[(0, base, "gptq"), (0, base, "rtn")])
        gptq_alone = round_lanes(stream, [(base, "gptq")], calibration, heldout, amax, progress=False)
    rounded = {n for n, f in base.items() if f != "BF16"}
    assert set(walk.rounded[1].encoded) == set(walk.rounded[2].encoded) == rounded  # BF16: the lane's tensors
    assert set(walk.rounded[1].details) == rounded and not walk.rounded[2].details  # GPTQ's statistics, per method
    layer0 = [n for n in rounded if n.startswith("model.layers.0.")]
    for name in layer0:  # layer 0's inputs are the same for every walk: the same tensors as a gptq walk's own
        assert all(torch.equal(_tensor_bits(t), _tensor_bits(gptq_alone.rounded[0].encoded[name][k]))
                   for k, t in walk.rounded[1].encoded[name].items())
    sweep_down = walk.rounded[0].encoded["model.layers.0.self_attn.o_proj"]["weight_scale"]
    assert not torch.equal(_tensor_bits(sweep_down), _tensor_bits(walk.rounded[1].encoded[
        "model.layers.0.self_attn.o_proj"]["weight_scale"]))  # the sweep moved some scales: a different method
    rtn = encode_model(load_model(tiny_llama_dir, torch.float32), base, amax, torch.bfloat16)
    for name in layer0:
        assert all(torch.equal(_tensor_bits(t), _tensor_bits(rtn[name][k]))
                   for k, t in walk.rounded[2].encoded[name].items())
    models = []
    for number in (1, 2):
        tensors = {**{n: walk.rounded[0].encoded[n] for n in names}, **walk.rounded[number].encoded}
        model = load_model(tiny_llama_dir, torch.float32)
        apply_fake_quant(model, base, tensors, torch.bfloat16)
        models.append(model)
    expected = evaluate_candidates(load_model(tiny_llama_dir, torch.float32), models, heldout, progress=False)
    assert [r.mean_kl for r in walk.kl[1:]] == [r.mean_kl for r in expected]


def test_streamed_input_ranges_equal_the_whole_model_ones(tiny_llama_dir: Path) -> None:
    names = [n for n, m in build_tiny_llama().named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    assignment = {n: "NVFP4" for n in names}
    blocks = torch.randint(0, 512, (10, 24), generator=torch.Generator().manual_seed(2))
    with LayerStream(tiny_llama_dir, torch.float32) as stream:
        streamed = streamed_input_amax(stream, blocks, assignment, progress=False)
    whole = calibrated_input_amax(load_model(tiny_llama_dir, torch.float32), blocks, assignment, progress=False)
    assert streamed.keys() == whole.keys() == set(names)
    assert all(torch.equal(streamed[n], whole[n]) for n in names)


def test_a_checkpoint_missing_a_layer_tensor_is_a_clear_error(tiny_llama_dir: Path, tmp_path: Path) -> None:
    for file in tiny_llama_dir.iterdir():
        if file.suffix != ".safetensors":
            (tmp_path / file.name).write_bytes(file.read_bytes())
    tensors = load_file(tiny_llama_dir / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with LayerStream(tmp_path, torch.float32) as stream:
        with stream.layer(0):
            pass
        with pytest.raises(PrismqError, match="no tensor model.layers.1.mlp.up_proj.weight"):
            with stream.layer(1):
                pass


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_streamed_probe_equals_the_whole_model_probe(tiny_llama_dir: Path, dtype: torch.dtype) -> None:
    from prismq.measure.fisher import probe
    from prismq.measure.fisher_streamed import probe_streamed

    names = [n for n, m in build_tiny_llama().named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    blocks = torch.randint(0, 512, (3, 24), generator=torch.Generator().manual_seed(4))
    whole = probe(load_model(tiny_llama_dir, dtype), blocks, names, sample_rows=20, progress=False)
    with LayerStream(tiny_llama_dir, dtype) as stream:
        streamed = probe_streamed(stream, blocks, names, sample_rows=20, progress=False, batch_blocks=1)
        batched = probe_streamed(stream, blocks, names, sample_rows=20, progress=False, batch_blocks=2)
    assert streamed.keys() == whole.keys() == batched.keys()
    for key, expected in whole.items():
        assert torch.equal(streamed[key], expected), key  # the same sums in the same order: bit for bit
        # blocks 0 and 1 through each layer together, then block 2: each token's rows and sums in their places,
        # equal to rounding (other matrix shapes; the sums are fp32 over two blocks at once, in any model dtype)
        torch.testing.assert_close(batched[key], expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
    assert float(whole["model.layers.0.mlp.down_proj.fisher_trace"]) > 0
    # siblings read one input: its sampled rows are kept once, under q_proj (and gate_proj)
    assert all(f"model.layers.0.{n}.x_sample" in streamed for n in ("self_attn.q_proj", "mlp.gate_proj"))
    assert not any(f"model.layers.0.{n}.{kind}" in streamed for n in ("self_attn.k_proj", "mlp.up_proj")
                   for kind in ("x_sample", "x_token_max"))


@pytest.mark.parametrize("format_name", ["NVFP4", "NVFP4A16", "MXFP8", "FP8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_an_export_read_back_layer_by_layer_equals_transformers_loading_it(
        tiny_llama_dir: Path, tmp_path: Path, format_name: str, dtype: torch.dtype) -> None:
    """compressed-tensors' own decompression and activation quantization, one layer at a time: the same hidden
    states as transformers + compressed-tensors loading the whole export."""
    from prismq.engine.stream import final_hidden_states
    from prismq.export.writer import write_checkpoint

    names = [n for n, m in build_tiny_llama().named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    out = tmp_path / format_name
    write_checkpoint(tiny_llama_dir, {n: format_name for n in names}, out, progress=False,
                     input_amax={n: torch.tensor(3.0 + 0.1 * i) for i, n in enumerate(names)})
    blocks = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(5))
    whole = load_model(out, dtype)
    with torch.no_grad():
        expected = [row for batch in blocks.split(BATCH_BLOCKS)  # the blocks the stream runs together
                    for row in whole.model(batch, use_cache=False).last_hidden_state]
    with LayerStream(out, dtype) as stream:
        streamed = final_hidden_states(stream, blocks, progress=False)
    assert all(torch.equal(got, want) for got, want in zip(streamed, expected))
    with LayerStream(tiny_llama_dir, dtype) as source:
        plain = final_hidden_states(source, blocks, progress=False)
    assert not torch.equal(plain[0], streamed[0])


def test_input_ranges_from_the_probe_maxima_equal_the_two_pass_ones(tiny_llama_dir: Path) -> None:
    """The probe records every token's input maximum; the clip calibration started from them equals its own."""
    from prismq.measure.fisher import X_TOKEN_MAX, input_statistic
    from prismq.measure.fisher_streamed import probe_streamed

    names = [n for n, m in build_tiny_llama().named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    assignment = {n: "NVFP4" for n in names}
    blocks = torch.randint(0, 512, (12, 24), generator=torch.Generator().manual_seed(6))
    with LayerStream(tiny_llama_dir, torch.float32) as stream:
        probed = probe_streamed(stream, blocks, names, sample_rows=4, progress=False)
        maxima = {n: input_statistic(probed, n, X_TOKEN_MAX) for n in names}
        assert maxima[names[0]].shape == (12 * 24,)
        two_pass = streamed_input_amax(stream, blocks[:10], assignment, progress=False)
        from_probe = streamed_input_amax(stream, blocks[:10], assignment, progress=False,
                                         token_max={n: m[:10 * 24] for n, m in maxima.items()})
    assert two_pass.keys() == from_probe.keys() == set(names)
    assert all(torch.equal(two_pass[n], from_probe[n]) for n in names)


def test_a_tight_memory_budget_reads_the_layer_per_candidate_with_the_same_results(tiny_llama_dir: Path) -> None:
    names = [n for n, m in build_tiny_llama().named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    assignment = {n: "NVFP4A16" for n in names}
    g = torch.Generator().manual_seed(7)
    calibration, heldout = torch.randint(0, 512, (4, 32), generator=g), torch.randint(0, 512, (2, 32), generator=g)
    candidates = [(assignment, "rtn"), (assignment, "gptq")]
    with LayerStream(tiny_llama_dir, torch.float32) as roomy:
        shared = round_lanes(roomy, candidates, calibration, heldout, {}, progress=False)
        budget = roomy.resident_bytes() + int(1.9 * roomy.layer_bytes(0)) + 2_000_000
    with LayerStream(tiny_llama_dir, torch.float32, max_memory=budget) as tight:
        assert tight.layer_copies(reserved=400_000) <= len(candidates)  # no room for a copy per candidate
        reread = round_lanes(tight, candidates, calibration, heldout, {}, progress=False)
    assert [r.mean_kl for r in reread.kl] == [r.mean_kl for r in shared.kl]
    for ours, theirs in zip(reread.rounded, shared.rounded):
        assert all(torch.equal(_tensor_bits(t), _tensor_bits(theirs.encoded[n][k]))
                   for n, tensors in ours.encoded.items() for k, t in tensors.items())


def test_a_layer_that_cannot_fit_the_budget_is_a_one_line_error(tiny_llama_dir: Path) -> None:
    with pytest.raises(PrismqError, match=r"decoder layer \d needs 2.4 MB in float32 beside 0.3 MB of output head "
                                          r"and norm, more than the 2.0 MB available on cpu \(--max-memory\)"):
        LayerStream(tiny_llama_dir, torch.float32, max_memory=2_000_000)


def test_a_tensor_of_the_wrong_shape_is_a_clear_error(tiny_llama_dir: Path, tmp_path: Path) -> None:
    for file in tiny_llama_dir.iterdir():
        if file.suffix != ".safetensors":
            (tmp_path / file.name).write_bytes(file.read_bytes())
    tensors = load_file(tiny_llama_dir / "model.safetensors")
    tensors["model.layers.0.mlp.down_proj.weight"] = tensors["model.layers.0.mlp.down_proj.weight"][:, :256].clone()
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with LayerStream(tmp_path, torch.float32) as stream:
        with pytest.raises(PrismqError, match=r"down_proj.weight has shape \[256, 256\], the model's config "
                                              r"expects \[256, 512\]"):
            with stream.layer(0):
                pass


def test_the_head_stays_in_the_checkpoint_dtype_and_gives_the_logits_of_the_head_cast_whole(
        tiny_llama_dir: Path) -> None:
    """Streaming in fp32 keeps the bf16 head as stored (half the memory) and the input embeddings on disk; logits
    computed a slice of the vocabulary at a time are those of the whole head cast to fp32."""
    hidden = torch.randn(7, build_tiny_llama().config.hidden_size, generator=torch.Generator().manual_seed(2))
    with LayerStream(tiny_llama_dir, torch.float32) as stream:
        assert stream.head.weight.dtype == torch.bfloat16
        assert all(p.device.type == "meta" for p in stream.model.get_input_embeddings().parameters())
        stream.head.rows = 100  # slices that do not divide the 512-token vocabulary
        logits = stream.head(hidden)
        expected = hidden @ stream.head.weight.float().T
    assert logits.dtype == torch.float32 and logits.shape == (7, 512)
    torch.testing.assert_close(logits, expected, rtol=1e-6, atol=1e-6)


def test_the_input_embeddings_are_read_in_the_checkpoint_dtype_only_while_a_walk_starts(tiny_llama_dir: Path) -> None:
    """A plain lookup table stays bf16 while an fp32 walk starts (its rows cast: the same first-layer inputs as the
    model loaded in fp32), and is gone afterwards."""
    blocks = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(8))
    seen: list[torch.dtype] = []
    with LayerStream(tiny_llama_dir, torch.float32) as stream:
        embeddings = stream.model.get_input_embeddings()
        handle = embeddings.register_forward_pre_hook(lambda module, _args: seen.append(module.weight.dtype))
        inputs = stream.first_inputs(blocks, 1)
        handle.remove()
        assert seen == [torch.bfloat16, torch.bfloat16] and embeddings.weight.device.type == "meta"
    model = load_model(tiny_llama_dir, torch.float32)
    with torch.no_grad():
        expected = [model.model.embed_tokens(block[None]) for block in blocks]
    assert all(h.dtype == torch.float32 and torch.equal(h, e) for (h, _), e in zip(inputs, expected))


def test_a_layers_config_keeps_what_can_match_inside_it_and_nothing_of_other_layers() -> None:
    from prismq.engine.stream import layer_config

    config = {"format": "mixed",
              "config_groups": {"g0": {"targets": ["model.layers.1.mlp.up_proj", "model.layers.10.mlp.up_proj",
                                                   "re:.*experts.*", "Linear"]},
                                "g1": {"targets": ["model.layers.2.mlp.down_proj"]}},
              "ignore": ["lm_head", "model.layers.1.self_attn.q_proj", "model.layers.11.mlp.gate", "re:mtp.*"]}
    got = layer_config(config, "model.layers.1.")
    assert got == {"format": "mixed",
                   "config_groups": {"g0": {"targets": ["model.layers.1.mlp.up_proj", "re:.*experts.*", "Linear"]}},
                   "ignore": ["lm_head", "model.layers.1.self_attn.q_proj", "re:mtp.*"]}
    assert config["config_groups"]["g1"]["targets"] == ["model.layers.2.mlp.down_proj"]  # the input is untouched
