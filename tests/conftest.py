"""Shared fixtures: tiny random models built in code, saved to disk like a real Hugging Face checkpoint."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # test helpers (ct_reference) import as plain modules

# One intra-op thread: the suite's tensors are small, and on the 2-vCPU CI machines torch's default of 2 threads
# stalls every parallel region (~8 ms each; benchmarks/RESULTS.md), which made the suite ~10x slower.
torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def build_tiny_llama(seed: int = 0, **overrides):
    """A 2-layer Llama (hidden 256, intermediate 512, 4 heads, 2 KV heads) with bf16 random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, tie_word_embeddings=False)
    config.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**config)).to(torch.bfloat16).eval()
    return model


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A tiny random Llama saved with save_pretrained (safetensors, bf16), plus a generation config."""
    path = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_llama().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The embedded default model (SmolLM2-135M-Instruct) as a bf16 HF directory; skips where it is not installed
    (scripts/setup installs it)."""
    from prismq.model.source import resolve_model

    try:
        return resolve_model(None)
    except Exception as exc:
        pytest.skip(f"embedded default model unavailable: {exc}")


@pytest.fixture(scope="session")
def small_vocab_llama(default_model_dir: Path, tmp_path_factory) -> Path:
    """A 2-layer hidden-64 Llama with the default model's tokenizer and 49152-token vocabulary, for whole runs."""
    import shutil

    path = tmp_path_factory.mktemp("llama-49k")
    build_tiny_llama(hidden_size=64, intermediate_size=128, vocab_size=49152, num_attention_heads=2,
                     num_key_value_heads=1).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(default_model_dir / name, path / name)
    return path
