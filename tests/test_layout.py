"""MoE checkpoints stream: a layer's fused expert parameters (transformers 5's [E, 2I, H] gate_up_proj and [E, H, I]
down_proj) are assembled from the checkpoint's per-expert tensors by reading transformers' own conversion mapping
backwards, and the streamed model computes exactly what transformers computes after loading the whole model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from prismq.engine.stream import BATCH_BLOCKS, LayerStream, final_hidden_states
from prismq.model.checkpoint import SourceTensors
from prismq.model.layout import CheckpointLayout, Part
from prismq.model.source import load_model

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
              vocab_size=256, head_dim=32)
FAMILIES = {
    "qwen3_moe": ("Qwen3MoeConfig", dict(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                                         shared_expert_intermediate_size=64)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),  # w1/w3/w2, block_sparse_moe
    "minimax_m2": ("MiniMaxM2Config", dict(num_local_experts=4, num_experts_per_tok=2, bos_token_id=None,
                                           eos_token_id=None)),
    "glm4_moe": ("Glm4MoeConfig", dict(moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
                                       n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1)),
}


LINEAR_ATTENTION = dict(linear_num_value_heads=2, linear_num_key_heads=1, linear_key_head_dim=16,
                        linear_value_head_dim=16, layer_types=["linear_attention", "full_attention"])
HYBRID = {  # layers that receive different arguments: sliding / full / linear attention, per-layer inputs, MLA
    "gemma3_text": ("Gemma3TextConfig", dict(layer_types=["sliding_attention", "full_attention"], sliding_window=4)),
    "gemma4_text": ("Gemma4TextConfig", dict(layer_types=["sliding_attention", "full_attention"], sliding_window=4,
                                             hidden_size_per_layer_input=16)),
    "gemma4_moe": ("Gemma4TextConfig", dict(layer_types=["sliding_attention", "full_attention"], sliding_window=4,
                                            hidden_size_per_layer_input=16, enable_moe_block=True, num_experts=4,
                                            top_k_experts=2, moe_intermediate_size=32)),
    "gpt_oss": ("GptOssConfig", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
                                     layer_types=["sliding_attention", "full_attention"])),
    "qwen3_next": ("Qwen3NextConfig", dict(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                                           shared_expert_intermediate_size=64, **LINEAR_ATTENTION)),
    "qwen3_5_text": ("Qwen3_5TextConfig", LINEAR_ATTENTION),
    "qwen3_5_moe_text": ("Qwen3_5MoeTextConfig", dict(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                                                      shared_expert_intermediate_size=64, **LINEAR_ATTENTION)),
    "deepseek_v3": ("DeepseekV3Config", dict(head_dim=16, num_key_value_heads=2, moe_intermediate_size=32,
                                             n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                                             first_k_dense_replace=1, n_group=1, topk_group=1, q_lora_rank=32,
                                             kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16,
                                             v_head_dim=16)),
}


def tiny_qwen3_5_moe(path: Path, vision_intermediate: int = 64) -> Path:
    """Qwen3.5-MoE as released: the multimodal class (language model under `model.language_model.`, a vision tower)
    and an MTP head that transformers does not load."""
    from safetensors.torch import load_file, save_file
    from transformers.models.qwen3_5_moe.configuration_qwen3_5_moe import Qwen3_5MoeVisionConfig

    text = transformers.Qwen3_5MoeTextConfig(**COMMON, **HYBRID["qwen3_5_moe_text"][1])
    vision = Qwen3_5MoeVisionConfig(depth=1, hidden_size=32, intermediate_size=vision_intermediate, num_heads=2,
                                    out_hidden_size=64, num_position_embeddings=16)
    torch.manual_seed(0)
    config = transformers.Qwen3_5MoeConfig(text_config=text.to_dict(), vision_config=vision.to_dict())
    transformers.Qwen3_5MoeForConditionalGeneration(config).to(torch.bfloat16).save_pretrained(path)
    tensors = load_file(path / "model.safetensors")
    tensors["mtp.fc.weight"] = torch.randn(64, 128).to(torch.bfloat16)
    tensors["mtp.layers.0.mlp.experts.0.gate_proj.weight"] = torch.randn(32, 64).to(torch.bfloat16)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


def tiny_moe(family: str, path: Path, vocab_size: int | None = None) -> Path:
    """A tiny random model of `family` saved by save_pretrained (the per-expert layout released checkpoints use);
    `vocab_size`: to match a real tokenizer's."""
    if family == "qwen3_5_moe":
        return tiny_qwen3_5_moe(path)
    config_class, extra = {**FAMILIES, **HYBRID}[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**{**COMMON, **extra, **({"vocab_size": vocab_size} if vocab_size
                                                                          else {})})
    transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).eval().save_pretrained(path)
    return path


@pytest.mark.parametrize("family", [*FAMILIES, *HYBRID, "qwen3_5_moe"])
def test_a_moe_model_streams_like_transformers_loads_it(family: str, tmp_path: Path) -> None:
    model_dir = tiny_moe(family, tmp_path / family)
    blocks = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    whole = load_model(model_dir, torch.float32)
    with torch.no_grad():
        expected = [row for batch in blocks.split(BATCH_BLOCKS)  # the blocks the stream runs together
                    for row in whole.model(batch, use_cache=False).last_hidden_state]
    with LayerStream(model_dir, torch.float32) as stream:
        streamed = final_hidden_states(stream, blocks, progress=False)
    assert all(torch.equal(got, want) for got, want in zip(streamed, expected))


def test_a_fused_expert_parameter_is_each_experts_gate_and_up(tmp_path: Path) -> None:
    from contextlib import ExitStack

    model_dir = tiny_moe("mixtral", tmp_path / "mixtral")
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(model_dir))
    with ExitStack() as stack:
        layout = CheckpointLayout(model, SourceTensors(model_dir, stack).location)
    parts = layout.parts("model.layers.1.mlp.experts.gate_up_proj", (4, 256, 64))
    assert parts is not None and len(parts) == 8
    assert parts[:2] == [Part("model.layers.1.block_sparse_moe.experts.0.w1.weight", 0, (0, 128)),
                         Part("model.layers.1.block_sparse_moe.experts.0.w3.weight", 0, (128, 256))]
    assert layout.parts("model.layers.0.mlp.experts.down_proj", (4, 64, 128))[3] == Part(  # type: ignore[index]
        "model.layers.0.block_sparse_moe.experts.3.w2.weight", 3, None)
    assert layout.parts("model.layers.0.mlp.gate.weight", (4, 64)) == [
        Part("model.layers.0.block_sparse_moe.gate.weight")]
    assert layout.parts("model.layers.0.mlp.nothing", (1,)) is None
