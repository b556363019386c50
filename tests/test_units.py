"""Decision units: one per vLLM layer (qkv_proj, gate_up_proj, a MoE layer's experts), derived from tiny random
configs of each family built on the meta device; formats offered only where every member takes them; the
exporter's sibling check accepts exactly the assignments that respect the units."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from prismq.errors import PrismqError
from prismq.model.assignment import check_assignment
from prismq.model.linears import LM_HEAD, linear_shapes, quantizable
from prismq.model.siblings import sibling_groups, unit_groups
from prismq.model.units import Unit, decision_units, legal_formats, model_units

HIDDEN, INTER, KV = 64, 128, 32  # 4 heads of 16, 2 KV heads
COMMON = dict(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, bos_token_id=0, eos_token_id=1,
              pad_token_id=2)


def make_config(family: str):
    """A tiny random config of `family`, built in code."""
    import transformers as tf

    if family == "llama":
        return tf.LlamaConfig(**COMMON)
    if family == "mistral":
        return tf.MistralConfig(**COMMON)
    if family == "qwen2":
        return tf.Qwen2Config(**COMMON)
    if family == "qwen3":
        return tf.Qwen3Config(head_dim=16, **COMMON)
    if family == "gemma":
        return tf.GemmaConfig(head_dim=16, **COMMON)
    if family == "phi3":
        return tf.Phi3Config(**COMMON)
    moe = dict(COMMON, intermediate_size=INTER)
    if family == "mixtral":
        return tf.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **moe)
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(head_dim=16, moe_intermediate_size=48, num_experts=4, num_experts_per_tok=2,
                                 mlp_only_layers=[1], **moe)
    if family == "qwen2_moe":
        return tf.Qwen2MoeConfig(moe_intermediate_size=48, shared_expert_intermediate_size=HIDDEN, num_experts=4,
                                 num_experts_per_tok=2, **moe)
    raise AssertionError(family)


def config_dir(family: str, tmp_path: Path) -> Path:
    """A tiny random checkpoint of `family` (the targets are read from its config and its safetensors headers)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(make_config(family)).to(torch.bfloat16).save_pretrained(tmp_path)
    return tmp_path


def prismq_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "prismq" in str(w.message) or "experts" in str(w.message)]


def layer_units(units: list[Unit], layer: int) -> list[tuple[str, tuple[str, ...], tuple[tuple[int, int], ...]]]:
    prefix = f"model.layers.{layer}."
    return [(u.name.removeprefix(prefix), tuple(m.removeprefix(prefix) for m in u.members), u.shapes)
            for u in units if u.name.startswith(prefix)]


LLAMA_LAYER = [
    ("self_attn.qkv_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
     ((HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN))),
    ("self_attn.o_proj", ("self_attn.o_proj",), ((HIDDEN, HIDDEN),)),
    ("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj"), ((INTER, HIDDEN), (INTER, HIDDEN))),
    ("mlp.down_proj", ("mlp.down_proj",), ((HIDDEN, INTER),)),
]
PHI3_LAYER = [  # already fused in the checkpoint; transformers registers o_proj before qkv_proj
    ("self_attn.o_proj", ("self_attn.o_proj",), ((HIDDEN, HIDDEN),)),
    ("self_attn.qkv_proj", ("self_attn.qkv_proj",), ((HIDDEN + 2 * KV, HIDDEN),)),
    ("mlp.gate_up_proj", ("mlp.gate_up_proj",), ((2 * INTER, HIDDEN),)),
    ("mlp.down_proj", ("mlp.down_proj",), ((HIDDEN, INTER),)),
]
DENSE = {"llama": LLAMA_LAYER, "mistral": LLAMA_LAYER, "qwen2": LLAMA_LAYER, "qwen3": LLAMA_LAYER,
         "gemma": LLAMA_LAYER, "phi3": PHI3_LAYER}


@pytest.mark.parametrize("family", list(DENSE))
def test_dense_family_units_are_vllm_layers(family: str, tmp_path: Path) -> None:
    model_dir = config_dir(family, tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        units = model_units(model_dir)
    assert prismq_warnings(caught) == []
    assert layer_units(units, 1) == DENSE[family]
    assert all(u.pinned is None for u in units)
    shapes = quantizable(linear_shapes(model_dir))
    members = [m for u in units for m in u.members]
    assert len(members) == len(set(members)) and set(members) == set(shapes)  # every Linear in exactly one unit
    order = list(shapes)
    assert [order.index(u.members[0]) for u in units] == sorted(order.index(u.members[0]) for u in units)


def test_lm_head_is_never_a_unit(tmp_path: Path) -> None:
    shapes = linear_shapes(config_dir("gemma", tmp_path))  # tied embeddings: lm_head is still an nn.Linear
    assert LM_HEAD in shapes
    units = decision_units(shapes, "gemma")
    assert all(LM_HEAD not in u.members for u in units)
    assert units == decision_units(quantizable(shapes), "gemma")


def test_unit_params_and_legal_formats() -> None:
    unit = Unit("x.experts", ("x.experts.0.gate_proj", "x.experts.0.down_proj"), ((48, 64), (64, 48)))
    assert unit.params == 2 * 48 * 64
    # down_proj's in_features 48 is not a multiple of 32 (MX) nor 128 (INT groups): its partner cannot take them.
    offered = legal_formats(unit, ["MXFP8", "nvfp4", "INT4_W4A16", "NVFP4", "FP8", "BF16"])
    assert offered == ["NVFP4", "FP8", "BF16"]
    alone = Unit("x.experts.0.gate_proj", ("x.experts.0.gate_proj",), ((48, 64),))
    assert legal_formats(alone, ["MXFP8", "INT4_W4A16", "NVFP4"]) == ["MXFP8", "NVFP4"]
    with pytest.raises(PrismqError, match="unknown format"):
        legal_formats(unit, ["NVFP3"])


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_transformers5_moe_experts_of_a_layer_are_one_unit_named_as_stored(family: str, tmp_path: Path) -> None:
    model_dir = config_dir(family, tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        units = model_units(model_dir)
    assert prismq_warnings(caught) == []
    block, leaves = ("block_sparse_moe", ("w1", "w3", "w2")) if family == "mixtral" else \
        ("mlp", ("gate_proj", "up_proj", "down_proj"))
    inter = INTER if family == "mixtral" else 48
    assert layer_units(units, 0)[:2] == LLAMA_LAYER[:2]
    experts = layer_units(units, 0)[-1]
    assert experts[0] == f"{block}.experts"  # the vLLM FusedMoE layer, under the checkpoint's own names
    assert experts[1] == (*(f"{block}.experts.{e}.{leaf}" for e in range(4) for leaf in leaves[:2]),
                          *(f"{block}.experts.{e}.{leaves[2]}" for e in range(4)))  # as the fused parameters hold them
    assert experts[2] == ((inter, HIDDEN),) * 8 + ((HIDDEN, inter),) * 4
    unit = next(u for u in units if u.name == f"model.layers.0.{block}.experts")
    offered = legal_formats(unit, ["MXFP8A16", "MXFP4A16", "NVFP4", "FP8", "NVFP4A16", "BF16"])
    assert offered == ["NVFP4", "FP8", "NVFP4A16", "BF16"]  # the MoE path quantizes A16 MX activations anyway
    if family == "qwen3_moe":  # mlp_only_layers=[1]: a dense MLP, gate/up fused as usual
        assert [name for name, _, _ in layer_units(units, 1)] == [n for n, _, _ in LLAMA_LAYER]


def test_qwen2_moe_shared_expert_fused_and_its_gate_pinned_bf16(tmp_path: Path) -> None:
    units = model_units(config_dir("qwen2_moe", tmp_path))
    by_name = {u.name: u for u in units}
    shared = by_name["model.layers.0.mlp.shared_expert.gate_up_proj"]
    assert shared.members == ("model.layers.0.mlp.shared_expert.gate_proj", "model.layers.0.mlp.shared_expert.up_proj")
    assert shared.pinned is None and legal_formats(shared, ["NVFP4"]) == ["NVFP4"]
    gate = by_name["model.layers.0.mlp.shared_expert_gate"]
    assert gate.shapes == ((1, HIDDEN),) and gate.pinned == "BF16"
    assert legal_formats(gate, ["NVFP4", "MXFP8"]) == ["BF16"]  # vLLM builds it as a plain torch Linear


def per_expert_shapes(layers: int = 2, experts: int = 4, inter: int = 48) -> dict[str, tuple[int, int]]:
    """Mixtral as transformers 4 and remote-code models list it: one Linear per expert projection."""
    shapes: dict[str, tuple[int, int]] = {}
    for layer in range(layers):
        block = f"model.layers.{layer}.block_sparse_moe"
        for proj, shape in (("q_proj", (HIDDEN, HIDDEN)), ("k_proj", (KV, HIDDEN)), ("v_proj", (KV, HIDDEN)),
                            ("o_proj", (HIDDEN, HIDDEN))):
            shapes[f"model.layers.{layer}.self_attn.{proj}"] = shape
        shapes[f"{block}.gate"] = (experts, HIDDEN)
        for e in range(experts):
            shapes[f"{block}.experts.{e}.w1"] = (inter, HIDDEN)
            shapes[f"{block}.experts.{e}.w2"] = (HIDDEN, inter)
            shapes[f"{block}.experts.{e}.w3"] = (inter, HIDDEN)
    shapes[LM_HEAD] = (128, HIDDEN)
    return shapes


def test_expert_linears_of_a_layer_are_one_unit_and_the_router_is_pinned() -> None:
    shapes = per_expert_shapes()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # experts are present: nothing to warn about
        units = decision_units(shapes, "mixtral")
    names = [u.name for u in units]
    assert names[:4] == ["model.layers.0.self_attn.qkv_proj", "model.layers.0.self_attn.o_proj",
                         "model.layers.0.block_sparse_moe.gate", "model.layers.0.block_sparse_moe.experts"]
    experts = units[3]
    assert len(experts.members) == 12 and experts.members[:3] == tuple(
        f"model.layers.0.block_sparse_moe.experts.0.{w}" for w in ("w1", "w2", "w3"))
    assert units[2].pinned == "BF16" and experts.pinned is None
    # gate/up take MXFP8 (in 64), down (in 48) does not: vLLM needs one scheme for the whole FusedMoE layer.
    assert legal_formats(experts, ["MXFP8", "NVFP4", "BF16"]) == ["NVFP4", "BF16"]
    assert legal_formats(units[0], ["MXFP8", "NVFP4", "BF16"]) == ["MXFP8", "NVFP4", "BF16"]


def test_an_unverified_family_is_said_to_follow_the_llama_rule() -> None:
    with pytest.warns(UserWarning, match="'olmo2'.*Llama rule"):
        units = decision_units({"model.layers.0.self_attn.q_proj": (64, 64), "model.layers.0.self_attn.k_proj":
                                (64, 64)}, "olmo2")
    assert [u.name for u in units] == ["model.layers.0.self_attn.qkv_proj"]


# --- the exporter's sibling check agrees with the units -------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_models(tmp_path_factory) -> dict[str, Path]:
    """Each dense family as a tiny random checkpoint (safetensors on disk, as the exporter reads it)."""
    from transformers import AutoModelForCausalLM

    paths = {}
    for family in DENSE:
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp(family)
        AutoModelForCausalLM.from_config(make_config(family)).to(torch.bfloat16).save_pretrained(path)
        paths[family] = path
    return paths


def assert_check_agrees(units: list[Unit], shapes: dict[str, tuple[int, int]]) -> None:
    """A unit-respecting assignment passes check_assignment (which returns the groups sharing scales: the units,
    each routed expert's gate/up and down apart); any one member of a multi-Linear unit given its own format is
    refused; changing a whole unit alone is accepted."""
    uniform = {m: "NVFP4" for u in units for m in u.members}
    assert check_assignment(uniform, shapes) == sibling_groups(uniform)
    assert unit_groups(uniform) == [list(u.members) for u in units]
    for unit in units:
        whole = dict(uniform, **dict.fromkeys(unit.members, "BF16"))
        check_assignment(whole, shapes)
        for member in unit.members if len(unit.members) > 1 else ():
            with pytest.raises(PrismqError, match="fused siblings must share one format"):
                check_assignment(dict(uniform, **{member: "BF16"}), shapes)


@pytest.mark.parametrize("family", list(DENSE))
def test_exporter_sibling_check_agrees_with_units(family: str, saved_models: dict[str, Path]) -> None:
    units = model_units(saved_models[family])
    assert sum(len(u.members) > 1 for u in units) == (0 if family == "phi3" else 4)  # 2 layers x (qkv, gate_up)
    assert_check_agrees(units, linear_shapes(saved_models[family]))


def test_exporter_sibling_check_agrees_with_expert_units() -> None:
    shapes = quantizable(per_expert_shapes(layers=1))
    units = [u for u in decision_units(shapes, "mixtral") if u.pinned is None]  # the router stays out of the test
    assert_check_agrees(units, shapes)


def test_linear_attention_and_mla_projections_vllm_fuses_are_one_unit(tmp_path: Path) -> None:
    from test_layout import tiny_moe

    qwen = {u.name: u.members for u in model_units(tiny_moe("qwen3_5_text", tmp_path / "qwen3_5"))}
    attn = "model.layers.0.linear_attn"
    assert qwen[f"{attn}.in_proj_qkvz"] == (f"{attn}.in_proj_qkv", f"{attn}.in_proj_z")
    assert qwen[f"{attn}.in_proj_ba"] == (f"{attn}.in_proj_b", f"{attn}.in_proj_a")
    deepseek = {u.name: u.members for u in model_units(tiny_moe("deepseek_v3", tmp_path / "deepseek"))}
    mla = "model.layers.1.self_attn"
    assert deepseek[f"{mla}.fused_qkv_a_proj"] == (f"{mla}.q_a_proj", f"{mla}.kv_a_proj_with_mqa")
    assert "model.layers.1.mlp.experts" in deepseek and "model.layers.1.mlp.shared_experts.gate_up_proj" in deepseek
