"""MoE families: exits exported with their dense/sparse layer pattern renumbered (``mlp_only_layers``,
``decoder_sparse_step``, ``first_k_dense_replace``) equal the identity-skipped HF model, and expert layers train as any
other layer (E2E through the split equals a plain PyTorch AdamW loop on the HF model)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from helpers import make_config, plain_e2e_loop
from segprop_ray.core.assemble import exit_config, exit_state_dict, write_model_dir
from segprop_ray.core.inprocess import run_inprocess
from segprop_ray.core.parts import ModelParts
from segprop_ray.core.plan import SegPropPlan, split_exit_weights
from segprop_ray.core.self_check import _identity_skipped, _random_model, check_model_family

VOCAB, LAYERS, SEQ = 128, 6, 16
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
QWEN3_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8)
PATTERNS = {  # name: (model_type, config, the fields an exit at depth 0 (layers 0, 4, 5) is exported with)
    "qwen3_moe mlp_only_layers": ("qwen3_moe", dict(QWEN3_MOE, mlp_only_layers=[1, 4]), dict(mlp_only_layers=[1])),
    "qwen3_moe decoder_sparse_step": ("qwen3_moe", dict(QWEN3_MOE, decoder_sparse_step=2, mlp_only_layers=[3]),
                                      dict(decoder_sparse_step=1, mlp_only_layers=[0, 1])),
    "qwen2_moe decoder_sparse_step": ("qwen2_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                                        shared_expert_intermediate_size=16, decoder_sparse_step=3),
                                      dict(decoder_sparse_step=1, mlp_only_layers=[0, 1])),
    "deepseek_v3 first_k_dense_replace": ("deepseek_v3", dict(
        num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, n_group=1,
        topk_group=1, first_k_dense_replace=2, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=8), dict(first_k_dense_replace=1)),
}


def mlp_kinds(model) -> list[str]:
    """Each decoder layer's MLP class: which layers are dense and which are MoE."""
    return [type(layer.mlp).__name__ for layer in model.model.layers]


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("depth", [0, 2])
def test_an_exported_exit_keeps_each_kept_layers_dense_or_moe_kind(pattern, depth, tmp_path):
    family, fields, exported_fields = PATTERNS[pattern]
    torch.manual_seed(0)
    model = _random_model(AutoConfig.for_model(family, **{**COMMON, **fields}))
    assert check_model_family(model.config)["ok"]
    parts, plan = ModelParts(model.config), SegPropPlan(LAYERS, 0, 2)
    kept = plan.exit_layers(depth)  # depth 0: layers 0, 4, 5; depth 2: 0, 1, 2, 4, 5
    committed, exits = split_exit_weights(dict(model.state_dict()), parts.layout, plan)
    config = exit_config(model.config, plan, depth)
    write_model_dir(tmp_path, config, exit_state_dict(plan, parts.layout, depth, committed, exits))
    exported = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    if depth == 0:
        assert {name: getattr(config, name) for name in exported_fields} == exported_fields
    assert mlp_kinds(exported) == [mlp_kinds(model)[i] for i in kept] and len(set(mlp_kinds(exported))) == 2
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = _identity_skipped(model, parts, kept)(ids, use_cache=False).logits
        torch.testing.assert_close(exported(ids, use_cache=False).logits, expected, rtol=0, atol=1e-5)


STEPS, BATCH = 3, 4
MOE_FAMILIES = {"mixtral": dict(num_local_experts=4, num_experts_per_tok=2), "qwen3_moe": QWEN3_MOE}


@pytest.fixture(scope="module", params=list(MOE_FAMILIES))
def moe_dir(request, tmp_path_factory):
    torch.manual_seed(0)
    config = AutoConfig.for_model(request.param, **{**COMMON, "num_hidden_layers": 4, **MOE_FAMILIES[request.param]})
    directory = tmp_path_factory.mktemp(request.param)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)  # experts one tensor each on disk
    return directory


def test_experts_train_as_any_other_layer_and_equal_a_plain_adamw_loop(moe_dir, tmp_path):
    train = torch.randint(0, VOCAB, (32, SEQ), generator=torch.Generator().manual_seed(0))
    evaluation = torch.randint(0, VOCAB, (8, SEQ), generator=torch.Generator().manual_seed(1))
    cfg = make_config(moe_dir, segprop={"mode": "e2e"},
                      training={"learning_rate": 1e-3, "max_steps": STEPS, "per_device_train_batch_size": BATCH})
    result = run_inprocess(str(moe_dir), train, evaluation, cfg)
    config = AutoConfig.from_pretrained(moe_dir)
    state = exit_state_dict(result.plan, ModelParts(config).layout, result.final_depth, result.committed,
                            result.exits[result.final_depth])
    write_model_dir(tmp_path, exit_config(config, result.plan, result.final_depth), state)
    trained = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).state_dict()
    reference = plain_e2e_loop(moe_dir, train, cfg, STEPS).state_dict()
    initial = AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32).state_dict()
    experts = [name for name in reference if ".experts." in name]
    assert len(experts) >= 2 * 4  # every layer's expert tensors (fused: all experts of a projection in one)
    for name, tensor in reference.items():  # the chunked head loss and HF's differ in the last bits only
        torch.testing.assert_close(trained[name], tensor, rtol=0, atol=1e-5)
    for name in experts:  # every expert of every layer moved: (E, ...) tensors compared per expert
        moved = (trained[name] - initial[name]).flatten(1).abs().amax(1)
        assert bool((moved > 1e-5).all()), (name, moved)
