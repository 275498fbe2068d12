"""Assembled exit models are plain HF checkpoints: they load, generate, and give the split model's logits."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import corpus_blocks, make_config, tiny_model_dir
from segprop_ray.core.assemble import exit_config, exit_state_dict, write_model_dir
from segprop_ray.core.inprocess import run_inprocess
from segprop_ray.core.parts import ModelParts, SegmentSpec
from segprop_ray.core.weights import DictSource


@pytest.mark.parametrize("family,extra", [
    ("llama", {}),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 2}),
    ("gpt2", {}),
])
def test_exits_at_several_depths_load_generate_and_match(tmp_path, family, extra):
    model_dir = tiny_model_dir(tmp_path, family, 6, **extra)
    if family == "qwen2":
        assert "sliding_attention" in AutoModelForCausalLM.from_pretrained(model_dir).config.layer_types
    result = run_inprocess(str(model_dir), corpus_blocks(32, 16), corpus_blocks(8, 16, 1), make_config(model_dir))
    parts = ModelParts(AutoModelForCausalLM.from_pretrained(model_dir).config)
    ids = corpus_blocks(2, 16, seed=5)
    for depth in sorted(result.exits):
        state = exit_state_dict(result.plan, parts.layout, depth, result.committed, result.exits[depth])
        out = write_model_dir(tmp_path / f"exit-{depth}", exit_config(parts.config, result.plan, depth), state,
                              tokenizer_dir=model_dir)
        model = AutoModelForCausalLM.from_pretrained(out).eval()
        assert model.config.num_hidden_layers == depth + 3
        source = DictSource({**result.committed, **result.exits[depth]})
        layers = [(i, source) for i in result.plan.exit_layers(depth)]
        split = parts.segment(SegmentSpec(layers, embed_source=source, head_source=source)).eval()
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, split.logits(ids), rtol=0, atol=1e-6)
            generated = model.generate(ids[:1, :4], max_new_tokens=5, do_sample=False, pad_token_id=1)
        assert generated.shape == (1, 9)
        if family != "qwen2":  # AutoTokenizer maps qwen2 to its own BPE class; the demo tokenizer is word-level
            assert AutoTokenizer.from_pretrained(out).decode(generated[0])


def test_exported_layer_types_follow_the_kept_layers(tmp_path):
    model_dir = tiny_model_dir(tmp_path, "qwen2", 6)
    config = AutoModelForCausalLM.from_pretrained(model_dir).config
    config.layer_types = ["full_attention", "sliding_attention"] * 3
    plan = make_config(model_dir).segprop
    from segprop_ray.core.plan import SegPropPlan
    exported = exit_config(config, SegPropPlan.from_config(plan, 6), depth=2)
    assert exported.layer_types == ["full_attention", "sliding_attention", "full_attention",
                                    "full_attention", "sliding_attention"]  # layers 0, 1, 2, then 4, 5
    assert exported.num_hidden_layers == 5 and exported.tie_word_embeddings is False
