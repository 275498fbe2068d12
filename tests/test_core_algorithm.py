"""Algorithm 1, in process: identity at lr 0, Stage 2 isolation, tied embeddings, losses falling."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import corpus_blocks, make_config, tiny_model_dir
from segprop_ray.core.assemble import exit_config, exit_state_dict, write_model_dir
from segprop_ray.core.inprocess import run_inprocess
from segprop_ray.core.parts import ModelParts

N_LAYERS, P, R = 6, 1, 2


@pytest.fixture(scope="module")
def blocks():
    return corpus_blocks(48, 16, seed=0), corpus_blocks(8, 16, seed=1)


def assembled(result, model, depth, tmp_path):
    parts = ModelParts(model.config)
    state = exit_state_dict(result.plan, parts.layout, depth, result.committed, result.exits[depth])
    out = write_model_dir(tmp_path / f"exit-{depth}", exit_config(model.config, result.plan, depth), state)
    return AutoModelForCausalLM.from_pretrained(out).eval()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_learning_rate_zero_is_identity(tmp_path, blocks, family):
    model_dir = tiny_model_dir(tmp_path, family, N_LAYERS)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    cfg = make_config(model_dir, training={"learning_rate": 0.0, "max_steps": 2})
    result = run_inprocess(str(model_dir), *blocks, cfg)
    assert result.final_depth == N_LAYERS - R - 1
    exported = assembled(result, model, result.final_depth, tmp_path)
    ids = blocks[1][:2]
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_shallow_exit_equals_truncated_forward(tmp_path, blocks):
    """At lr 0, exit K is embed -> layers 0..K -> layers n-r..n-1 -> norm -> head of the input model."""
    model_dir = tiny_model_dir(tmp_path, "llama", N_LAYERS)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    depth = P + 1
    cfg = make_config(model_dir, training={"learning_rate": 0.0, "max_steps": 2}, exit={"run": {"max_depth": depth}})
    result = run_inprocess(str(model_dir), *blocks, cfg)
    assert result.final_depth == depth and result.decisions[-1]["reason"] == "max_depth"
    exported = assembled(result, model, depth, tmp_path)
    assert exported.config.num_hidden_layers == depth + 1 + R
    ids = blocks[1][:2]
    with torch.no_grad():
        expected = hand_truncated_forward(model, ids, list(range(depth + 1)) + [N_LAYERS - 2, N_LAYERS - 1])
        torch.testing.assert_close(exported(ids).logits, expected, rtol=0, atol=1e-6)


def hand_truncated_forward(model, ids, layer_indices):
    hidden = model.model.embed_tokens(ids)
    position_ids = torch.arange(ids.shape[1])[None]
    rope = model.model.rotary_emb(hidden, position_ids)
    for i in layer_indices:
        out = model.model.layers[i](hidden, attention_mask=None, position_ids=position_ids, position_embeddings=rope)
        hidden = out[0] if isinstance(out, tuple) else out
    return model.lm_head(model.model.norm(hidden))


class Recorder:
    """Observer of the in-process run: the segment of each iteration when built and when trained."""

    def __init__(self):
        self.built, self.trained = {}, {}

    def __call__(self, event, depth, segment):
        state = {k: v.clone() for k, v in segment.original_state_dict().items()}
        trainable = {origin for origin, module in segment.pieces() if any(p.requires_grad for p in module.parameters())}
        (self.built if event == "built" else self.trained)[depth] = (state, trainable)


@pytest.mark.parametrize("ll_baseline", ["input", "stage1"])
def test_stage2_touches_only_layer_and_ll(tmp_path, blocks, ll_baseline):
    model_dir = tiny_model_dir(tmp_path, "llama", N_LAYERS)
    base = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    cfg = make_config(model_dir, segprop={"ll_baseline": ll_baseline})
    recorder, committed_after = Recorder(), {}
    result = run_inprocess(str(model_dir), *blocks, cfg, observer=recorder)
    ll_names = [f"model.layers.{i}." for i in (N_LAYERS - 2, N_LAYERS - 1)]
    for q in range(P + 1, N_LAYERS - R):
        state, trainable = recorder.built[q]
        assert trainable == {f"model.layers.{q}", *[n[:-1] for n in ll_names], "model.norm", "lm_head"}
        baseline = base if ll_baseline == "input" else result.exits[P]
        for name in (n for n in state if n.startswith(tuple(ll_names))):
            assert torch.equal(state[name], baseline[name]), f"LL {name} not reset to baseline at iteration {q}"
        head_before = result.exits[q - 1]
        assert all(torch.equal(state[k], head_before[k]) for k in ("model.norm.weight", "lm_head.weight"))
        trained, _ = recorder.trained[q]
        assert not torch.equal(trained[f"model.layers.{q}.mlp.up_proj.weight"], state[f"model.layers.{q}.mlp.up_proj.weight"])
        assert not torch.equal(trained["lm_head.weight"], state["lm_head.weight"])
    # The prefix and every other middle layer: bit-identical to what Stage 1 / their own iteration committed.
    stage1_state, _ = recorder.trained[P]
    for name, tensor in result.committed.items():
        if name.startswith(("model.embed_tokens.", *[f"model.layers.{i}." for i in range(P + 1)])):
            assert torch.equal(tensor, stage1_state[name]), name
    for q in range(P + 1, N_LAYERS - R):
        trained, _ = recorder.trained[q]
        for name in (k for k in trained if k.startswith(f"model.layers.{q}.")):
            assert torch.equal(result.committed[name], trained[name])


def test_tied_embeddings_unchanged_through_stage2(tmp_path, blocks):
    model_dir = tiny_model_dir(tmp_path, "gpt2", N_LAYERS)
    assert AutoModelForCausalLM.from_pretrained(model_dir).config.tie_word_embeddings
    recorder = Recorder()
    result = run_inprocess(str(model_dir), *blocks, make_config(model_dir), observer=recorder)
    embed_after_stage1 = recorder.trained[P][0]["transformer.wte.weight"]
    assert torch.equal(result.committed["transformer.wte.weight"], embed_after_stage1)
    final_head = result.exits[result.final_depth]["lm_head.weight"]
    assert not torch.equal(final_head, embed_after_stage1)  # the head trained on its own, untied copy


def test_losses_fall_segprop_and_lw(tmp_path, blocks, record_property):
    model_dir = tiny_model_dir(tmp_path, "llama", N_LAYERS)
    table = {}
    for mode in ("segprop", "lw"):
        cfg = make_config(model_dir, segprop={"mode": mode}, training={"max_steps": 12, "learning_rate": 3e-3})
        result = run_inprocess(str(model_dir), *blocks, cfg)
        for it in result.iterations:
            first, last = it["history"][0]["eval_loss"], it["eval_loss"]
            assert it["history"][0]["step"] == 0 and last < first, f"{mode} depth {it['depth']}: {first:.3f} -> {last:.3f}"
            table.setdefault(it["depth"], {})[mode] = it["eval_loss"]
    lines = ["depth  segprop_eval  lw_eval"] + [
        f"{d:>5}  {row.get('segprop', float('nan')):>12.4f}  {row.get('lw', float('nan')):>7.4f}" for d, row in sorted(table.items())
    ]
    print("\n".join(lines))
    record_property("segprop_vs_lw_eval_loss", table)


def test_e2e_trains_all_layers(tmp_path, blocks):
    model_dir = tiny_model_dir(tmp_path, "llama", N_LAYERS)
    result = run_inprocess(str(model_dir), *blocks, make_config(model_dir, segprop={"mode": "e2e"}))
    assert [it["depth"] for it in result.iterations] == [N_LAYERS - 1]
    base = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    moved = {k.split(".")[2] for k, v in result.committed.items() if k.startswith("model.layers.") and not torch.equal(v, base[k])}
    assert moved == {str(i) for i in range(N_LAYERS)}


def test_loss_chunk_setting_reaches_training_and_changes_only_rounding(tmp_path, blocks):
    """training.loss_chunk_tokens is used by the segments that train; 3-token chunks train like one chunk."""
    from segprop_ray.core import head_loss

    model_dir = tiny_model_dir(tmp_path, "llama", N_LAYERS)
    sizes = []
    real = head_loss.linear_cross_entropy

    def spy(hidden, weight, bias, targets, chunk_tokens=None, **kwargs):
        sizes.append(chunk_tokens)
        return real(hidden, weight, bias, targets, chunk_tokens, **kwargs)

    results = {}
    for chunk in (0, 3):
        cfg = make_config(model_dir, training={"max_steps": 3, "loss_chunk_tokens": chunk}, exit={"run": {"max_depth": P + 1}})
        sizes.clear()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr("segprop_ray.core.stack.linear_cross_entropy", spy)
            results[chunk] = run_inprocess(str(model_dir), *blocks, cfg)
        assert set(sizes) == {chunk or None}
    for one, other in zip(results[0].iterations, results[3].iterations):
        assert one["eval_loss"] == pytest.approx(other["eval_loss"], rel=1e-4)
