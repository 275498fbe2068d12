"""Every family in the layout table is exact: split logits equal HF's, the lr=0 export is the input model, a shallow
exit exported with its per-layer settings equals the HF model with the skipped layers replaced by the identity.
A family whose forward does something outside its modules is refused by the self-check, in one line."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from helpers import make_config
from segprop_ray.core.assemble import exit_config, exit_state_dict, write_model_dir
from segprop_ray.core.blocks import TokenBlocks
from segprop_ray.core.inprocess import run_inprocess
from segprop_ray.core.layout import LAYOUTS, UnsupportedArchitecture
from segprop_ray.core.parts import ModelParts, SegmentSpec
from segprop_ray.core.plan import exit_is_tied
from segprop_ray.core.self_check import _identity_skipped, _random_model, check_model_family

VOCAB, LAYERS = 128, 6
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
FAMILIES = {
    "llama": {}, "mistral": dict(sliding_window=4), "qwen2": dict(use_sliding_window=True, sliding_window=4,
                                                                   max_window_layers=2),
    "qwen3": dict(head_dim=8), "phi3": dict(pad_token_id=0), "smollm3": dict(no_rope_layer_interval=3, pad_token_id=0),
    "gemma": dict(head_dim=8), "gemma2": dict(head_dim=8, sliding_window=4),
    "gemma3_text": dict(head_dim=8, sliding_window=4, layer_types=["sliding_attention"] * 2 + ["full_attention"]
                        + ["sliding_attention"] * 2 + ["full_attention"]),
    "granite": dict(embedding_multiplier=12.0, logits_scaling=8.0, residual_multiplier=0.22, attention_multiplier=0.1),
    "cohere": dict(logit_scale=0.0625), "cohere2": dict(logit_scale=0.25, sliding_window=4),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8),
    "gpt2": None,
}


def family_config(family: str):
    if family == "gpt2":
        return AutoConfig.for_model("gpt2", vocab_size=VOCAB, n_embd=32, n_layer=LAYERS, n_head=4, n_positions=64,
                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return AutoConfig.for_model(family, **{**COMMON, **FAMILIES[family]})


@pytest.fixture(scope="module", params=list(FAMILIES))
def saved(request, tmp_path_factory):
    """A random model of the family, saved as transformers saves it (MoE experts one tensor each on disk)."""
    torch.manual_seed(0)
    model = _random_model(family_config(request.param))
    directory = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(directory)
    return request.param, directory, AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def test_every_tested_family_has_a_table_entry():
    assert set(FAMILIES) <= set(LAYOUTS)


def test_split_logits_equal_hf(saved):
    family, directory, model = saved
    parts = ModelParts(model.config)
    source = parts.base_source(directory)  # checkpoint names converted to the modules' names where they differ
    segment = parts.segment(SegmentSpec([(i, source) for i in range(LAYERS)], source, source)).eval()
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(segment.logits(ids), model(ids).logits, rtol=0, atol=1e-5)
    assert check_model_family(model.config)["ok"]


def blocks(seed: int, n: int = 8) -> TokenBlocks:
    return TokenBlocks.of_text(torch.randint(0, VOCAB, (n, 16), generator=torch.Generator().manual_seed(seed)))


def exported(result, config, depth, out):
    parts = ModelParts(config)
    state = exit_state_dict(result.plan, parts.layout, depth, result.committed, result.exits[depth],
                            tied=exit_is_tied(result.plan, depth, parts.tied))
    write_model_dir(out, exit_config(config, result.plan, depth), state)
    return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()


def test_lr0_exports_are_the_input_model_and_its_identity_skipped_copy(saved, tmp_path):
    family, directory, model = saved
    cfg = make_config(directory, segprop={"base_depth": 0, "last_layers": 2},
                      training={"learning_rate": 0.0, "max_steps": 1, "per_device_train_batch_size": 4})
    result = run_inprocess(str(directory), blocks(0), blocks(1, 4), cfg)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    deepest = exported(result, model.config, result.final_depth, tmp_path / "deepest")
    with torch.no_grad():
        torch.testing.assert_close(deepest(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
        shallow = exported(result, model.config, 0, tmp_path / "shallow")  # layers 0, 4, 5 renumbered 0, 1, 2
        skipped = _identity_skipped(model, ModelParts(model.config), result.plan.exit_layers(0))
        torch.testing.assert_close(shallow(ids, use_cache=False).logits, skipped(ids, use_cache=False).logits,
                                   rtol=0, atol=1e-5)


class ScaledLlamaConfig(AutoConfig.for_model("llama").__class__):
    model_type = "scaled_llama"


def _scaled_forward_class():
    from transformers import LlamaForCausalLM

    class ScaledLlamaForCausalLM(LlamaForCausalLM):
        config_class = ScaledLlamaConfig

        def forward(self, *args, **kwargs):
            output = super().forward(*args, **kwargs)
            output.logits = output.logits * 3.0  # outside every module: the split cannot know
            return output

    return ScaledLlamaForCausalLM


def test_a_forward_that_scales_logits_outside_its_modules_is_refused(tmp_path, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM as Auto

    from helpers import one_line_error, run_cli
    from pipeline_setup import make_inputs, pipeline_config, write_config

    AutoConfig.register("scaled_llama", ScaledLlamaConfig, exist_ok=True)
    Auto.register(ScaledLlamaConfig, _scaled_forward_class(), exist_ok=True)
    _, train, evaluation = make_inputs(tmp_path)
    model_dir = tmp_path / "scaled"
    torch.manual_seed(0)
    Auto.from_config(ScaledLlamaConfig(**{**COMMON, "vocab_size": 300})).save_pretrained(model_dir)
    (tmp_path / "model" / "tokenizer.json").rename(model_dir / "tokenizer.json")
    config = write_config(tmp_path / "c.yaml", pipeline_config(str(tmp_path / "run"), str(model_dir), str(train),
                                                               str(evaluation)))
    monkeypatch.setenv("SEGPROP_CACHE", str(tmp_path / "cache"))
    capsys.readouterr()
    code, _, err = run_cli(capsys, "run", str(config))
    assert code == 2 and not (tmp_path / "run" / "manifest.json").exists()
    line = one_line_error(err)
    assert "model family scaled_llama is not supported: the split model's logits differ from the HF model's" in line
    verdicts = list((tmp_path / "cache" / "self-check").glob("*.json"))  # the check ran, and is remembered
    assert len(verdicts) == 1 and '"ok": false' in verdicts[0].read_text()
    with pytest.raises(UnsupportedArchitecture, match="scaled_llama"):
        check_model_family(ScaledLlamaConfig(**COMMON))
