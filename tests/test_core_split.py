"""Splitting is exact: the split modules give the HF model's own logits, for every covered family."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from segprop_ray.core.layout import UnsupportedArchitecture
from segprop_ray.core.parts import ModelParts, SegmentSpec
from segprop_ray.core.weights import SafetensorsSource

FAMILIES = {
    "llama": dict(num_key_value_heads=2),
    "mistral": dict(num_key_value_heads=2, sliding_window=5),  # window < seq: sliding masks really differ
    "qwen2": dict(num_key_value_heads=2, use_sliding_window=True, sliding_window=5, max_window_layers=2),
    "phi3": dict(num_key_value_heads=2, pad_token_id=0),  # no table entry: the generic layout
    "gpt2": dict(),
}


def tiny_hf_model(tmp_path, family, attn):
    if family == "gpt2":
        config = AutoConfig.for_model("gpt2", vocab_size=101, n_embd=32, n_layer=4, n_head=4, n_positions=64,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    else:
        config = AutoConfig.for_model(family, vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                      num_attention_heads=4, max_position_embeddings=64, **FAMILIES[family])
    config._attn_implementation = attn
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_split_forward_equals_hf_forward(tmp_path, family, attn):
    model = tiny_hf_model(tmp_path, family, attn)
    source = SafetensorsSource.from_model_dir(tmp_path)
    parts = ModelParts(model.config)
    layers = [(i, source) for i in range(parts.num_layers)]
    segment = parts.segment(SegmentSpec(layers=layers, embed_source=source, head_source=source)).eval()
    ids = torch.randint(0, 101, (2, 12))
    with torch.no_grad():
        expected = model(ids).logits
        got = segment.logits(ids)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_layer_ranges_compose(tmp_path, family):
    """embed -> layers [0, k) -> layers [k, n) -> head equals the whole model, for every cut k."""
    model = tiny_hf_model(tmp_path, family, "sdpa")
    source = SafetensorsSource.from_model_dir(tmp_path)
    parts = ModelParts(model.config)
    ids = torch.randint(0, 101, (2, 12))
    with torch.no_grad():
        expected = model(ids).logits
        for cut in range(parts.num_layers + 1):
            first = parts.segment(SegmentSpec([(i, source) for i in range(cut)], embed_source=source)).eval()
            second = parts.segment(SegmentSpec([(i, source) for i in range(cut, parts.num_layers)], head_source=source)).eval()
            torch.testing.assert_close(second.logits(ids, first(ids)), expected, rtol=0, atol=1e-6)


def test_segment_keeps_original_parameter_names(tmp_path):
    model = tiny_hf_model(tmp_path, "llama", "sdpa")
    source = SafetensorsSource.from_model_dir(tmp_path)
    segment = ModelParts(model.config).segment(SegmentSpec([(2, source)], head_source=source))
    names = set(segment.original_state_dict())
    assert {"model.layers.2.mlp.up_proj.weight", "model.norm.weight", "lm_head.weight"} <= names
    assert not any(n.startswith(("model.layers.0", "model.layers.1", "model.embed_tokens")) for n in names)
    for name, tensor in segment.original_state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name


def test_parts_hold_only_requested_weights(tmp_path):
    """A segment of one layer + head materialises no other layer (the skeleton stays on meta)."""
    model = tiny_hf_model(tmp_path, "llama", "sdpa")
    parts = ModelParts(model.config)
    source = SafetensorsSource.from_model_dir(tmp_path)
    segment = parts.segment(SegmentSpec([(3, source)], head_source=source))
    held = sum(p.numel() for p in segment.parameters())
    per_layer = sum(p.numel() for p in model.model.layers[3].parameters())
    head = sum(p.numel() for p in model.lm_head.parameters()) + sum(p.numel() for p in model.model.norm.parameters())
    assert held == per_layer + head
    assert all(p.device.type == "meta" for p in parts.skeleton.parameters())


def test_tied_head_is_untied_copy(tmp_path):
    model = tiny_hf_model(tmp_path, "gpt2", "sdpa")
    assert model.config.tie_word_embeddings
    source = SafetensorsSource.from_model_dir(tmp_path)
    assert "lm_head.weight" not in source.keys()
    parts = ModelParts(model.config)
    embedder, head = parts.embedder(source), parts.head(source)
    assert torch.equal(head.proj.weight, embedder.tokens.weight)
    assert head.proj.weight.data_ptr() != embedder.tokens.weight.data_ptr()


@pytest.mark.parametrize("model_type,kwargs", [
    ("gpt_neox", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=101)),
])
def test_unsupported_architecture_is_named(model_type, kwargs):
    config = AutoConfig.for_model(model_type, **kwargs)
    with pytest.raises(UnsupportedArchitecture, match=model_type):
        ModelParts(config)
