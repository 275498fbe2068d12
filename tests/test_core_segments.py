"""Segments as the paper defines them: k consecutive layers per Stage 2 iteration, or a layer's attention and MLP
halves as iterations of their own. Identity at lr 0, and each iteration trains exactly what it names."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import corpus_blocks, make_config, tiny_model_dir
from segprop_ray.core.assemble import exit_config, exit_state_dict, write_model_dir
from segprop_ray.core.exits import RunExit
from segprop_ray.core.inprocess import InProcessRun, run_inprocess
from segprop_ray.core.layout import LAYOUTS, UnsupportedArchitecture, check_halves
from segprop_ray.core.parts import ModelParts
from segprop_ray.core.plan import SegPropPlan

N_LAYERS, P, R = 7, 1, 2  # middle layers 2, 3, 4: segments of 2 are (2, 3) and (4, 4)
LL = ("model.layers.5.", "model.layers.6.")


@pytest.fixture(scope="module")
def blocks():
    return corpus_blocks(32, 16, seed=0), corpus_blocks(8, 16, seed=1)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("llama"), "llama", N_LAYERS)


def test_the_plan_cuts_stage2_into_segments_and_halves():
    assert SegPropPlan(12, 1, 2, segment_layers=4).segments == [(2, 5), (6, 9)]
    plan = SegPropPlan(N_LAYERS, P, R, segment_layers=2)
    assert plan.segments == [(2, 3), (4, 4)] and plan.exit_depths == [1, 3, 4]
    assert [it.label for it in plan.iterations] == ["Stage 1 (layers 0..1 + LL)", "layers 2-3", "layer 4"]
    assert [plan.source_depth(it) for it in plan.iterations] == [None, 1, 3]
    assert SegPropPlan(N_LAYERS, P, R, segment_layers=9).segments == [(2, 4)]  # one segment of every middle layer
    halves = SegPropPlan(N_LAYERS, P, R, granularity="sublayer")
    assert [(it.key, it.label) for it in halves.iterations[1:3]] == [("2-attn", "layer 2 attn"), ("2", "layer 2 mlp")]
    assert [halves.source_depth(it) for it in halves.iterations[1:5]] == [1, 1, 2, 2]  # both halves read S[q-1]
    assert halves.exit_depths == [1, 2, 3, 4]
    lw = SegPropPlan(N_LAYERS, P, 0, "lw", segment_layers=2)
    assert lw.segments == [(2, 3), (4, 5), (6, 6)]


def test_the_global_exit_counts_exits_so_patience_is_in_segments():
    rule = RunExit(patience_layers=1, min_delta=0.0)
    assert rule.decide({1: 3.0, 3: 2.0}, 3, last_depth=9).continue_training
    stop = rule.decide({1: 3.0, 3: 2.0, 5: 2.1}, 5, last_depth=9)  # one segment (two layers) without improvement
    assert not stop.continue_training and stop.reason == "plateau" and "for 1 layers" in stop.detail


def test_max_depth_must_be_a_segment_boundary(llama):
    cfg = make_config(llama, segprop={"segment_layers": 2}, exit={"run": {"max_depth": 2}})
    with pytest.raises(ValueError, match=r"exit.run.max_depth = 2 is not a segment boundary .* \(exits at 1, 3, 4\)"):
        cfg.check_against_model(N_LAYERS)
    make_config(llama, segprop={"segment_layers": 2}, exit={"run": {"max_depth": 3}}).check_against_model(N_LAYERS)


def exported(result, model_dir, depth, out):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    parts = ModelParts(model.config)
    state = exit_state_dict(result.plan, parts.layout, depth, result.committed, result.exits[depth])
    write_model_dir(out, exit_config(model.config, result.plan, depth), state)
    return model.eval(), AutoModelForCausalLM.from_pretrained(out).eval()


@pytest.mark.parametrize("segprop", [{"segment_layers": 2}, {"granularity": "sublayer"}])
def test_learning_rate_zero_exports_the_input_model(tmp_path, blocks, llama, segprop, monkeypatch):
    """The exported model is the input model, and every snapshot S[q] is the input model's hidden state after
    layer q (each made from the previous boundary's snapshot by the segment's layers alone)."""
    snapshots = {}
    real_snapshot = InProcessRun.snapshot

    def spy(self, depth, blocks_, previous):
        out = real_snapshot(self, depth, blocks_, previous)
        if len(blocks_) == len(blocks[1]):
            snapshots[depth] = out
        return out

    monkeypatch.setattr(InProcessRun, "snapshot", spy)
    cfg = make_config(llama, segprop=segprop, training={"learning_rate": 0.0, "max_steps": 2},
                      snapcheck={"dtype": "fp32"})  # bf16 snapshots would round at every boundary
    result = run_inprocess(str(llama), *blocks, cfg)
    assert result.final_depth == N_LAYERS - R - 1
    model, exit_model = exported(result, llama, result.final_depth, tmp_path / "exit")
    ids = blocks[1][:2]
    with torch.no_grad():
        torch.testing.assert_close(exit_model(ids).logits, model(ids).logits, rtol=0, atol=0)
        hidden = model(blocks[1], output_hidden_states=True).hidden_states  # [0]: embeddings, [q + 1]: after layer q
    assert sorted(snapshots) == result.plan.exit_depths
    for depth, snapshot in snapshots.items():
        torch.testing.assert_close(snapshot, hidden[depth + 1], rtol=0, atol=0)


class Recorder:
    """The segment of each iteration, when built and when trained: its tensors by original name, what trains."""

    def __init__(self):
        self.built, self.trained = {}, {}

    def __call__(self, event, key, segment):
        state = {k: v.detach().clone() for k, v in segment.original_state_dict().items()}
        trainable = {origin + "." + name for origin, module in segment.pieces()
                     for name, param in module.named_parameters() if param.requires_grad}
        (self.built if event == "built" else self.trained)[key] = (state, trainable)


def changed(before, after, prefix):
    return {name for name in before if name.startswith(prefix) and not torch.equal(before[name], after[name])}


def test_a_two_layer_segment_trains_both_layers_and_only_them(blocks, llama, monkeypatch):
    base = AutoModelForCausalLM.from_pretrained(llama).state_dict()
    snapshots = []
    real_snapshot = InProcessRun.snapshot
    monkeypatch.setattr(InProcessRun, "snapshot", lambda self, depth, *a: snapshots.append(depth) or real_snapshot(self, depth, *a))
    recorder = Recorder()
    result = run_inprocess(str(llama), *blocks, make_config(llama, segprop={"segment_layers": 2}), observer=recorder)
    assert [it["depth"] for it in result.iterations] == [1, 3, 4] and sorted(result.exits) == [1, 3, 4]
    assert set(snapshots) == {1, 3, 4}  # at segment boundaries only: never S[2]
    built, trainable = recorder.built[3]
    assert {name.rsplit(".", 2)[0] for name in trainable} >= {"model.layers.2.self_attn", "model.layers.3.mlp"}
    assert all(name.startswith(("model.layers.2.", "model.layers.3.", *LL, "model.norm.", "lm_head."))
               for name in trainable)
    trained, _ = recorder.trained[3]
    for layer in (2, 3):  # both layers of the segment trained (every weight matrix moved)
        assert changed(built, trained, f"model.layers.{layer}.") >= {f"model.layers.{layer}.mlp.up_proj.weight",
                                                                      f"model.layers.{layer}.self_attn.q_proj.weight"}
    assert all(torch.equal(built[name], base[name]) for name in built if name.startswith(LL))  # LL reset to the input
    stage1, _ = recorder.trained[1]
    for name, tensor in result.committed.items():  # bit for bit: the prefix as Stage 1 left it, the segments as trained
        if name.startswith(("model.embed_tokens.", "model.layers.0.", "model.layers.1.")):
            assert torch.equal(tensor, stage1[name]), name
        elif name.startswith(("model.layers.2.", "model.layers.3.")):
            assert torch.equal(tensor, trained[name]), name
    assert not any(name.startswith("model.layers.4.") for name in trainable)


def test_sublayer_halves_train_only_their_half(blocks, llama):
    """Layer q's attention iteration changes only attention-half parameters; its MLP iteration, built from the
    attention iteration's layer, changes only MLP-half parameters."""
    recorder = Recorder()
    cfg = make_config(llama, segprop={"granularity": "sublayer"}, exit={"run": {"max_depth": 3}})
    result = run_inprocess(str(llama), *blocks, cfg, observer=recorder)
    assert [it["label"] for it in result.iterations][1:] == ["layer 2 attn", "layer 2 mlp", "layer 3 attn", "layer 3 mlp"]
    for q in (2, 3):
        prefix = f"model.layers.{q}."
        attn_half = (prefix + "input_layernorm.", prefix + "self_attn.")
        mlp_half = (prefix + "post_attention_layernorm.", prefix + "mlp.")
        (attn_built, attn_trainable), (attn_trained, _) = recorder.built[f"{q}-attn"], recorder.trained[f"{q}-attn"]
        assert {n for n in attn_trainable if n.startswith(prefix)} == {n for n in attn_built if n.startswith(attn_half)}
        assert changed(attn_built, attn_trained, prefix) and all(n.startswith(attn_half)
                                                                   for n in changed(attn_built, attn_trained, prefix))
        (mlp_built, mlp_trainable), (mlp_trained, _) = recorder.built[q], recorder.trained[q]
        assert all(torch.equal(mlp_built[n], attn_trained[n]) for n in mlp_built if n.startswith(prefix))
        assert torch.equal(mlp_built["lm_head.weight"], attn_trained["lm_head.weight"])  # the head carries on
        assert {n for n in mlp_trainable if n.startswith(prefix)} == {n for n in mlp_built if n.startswith(mlp_half)}
        assert changed(mlp_built, mlp_trained, prefix) and all(n.startswith(mlp_half)
                                                                 for n in changed(mlp_built, mlp_trained, prefix))
        assert all(torch.equal(result.committed[n], mlp_trained[n]) for n in mlp_trained if n.startswith(prefix))


def test_every_described_family_has_halves_that_cover_its_layers():
    from test_core_families import FAMILIES, family_config

    for family in FAMILIES:
        parts = ModelParts(family_config(family))
        layers = parts.skeleton.get_submodule(parts.layout.layers)
        if parts.layout.halves is None:
            with pytest.raises(UnsupportedArchitecture, match=f"sublayer is not supported for {family}: its decoder"):
                check_halves(parts.layout, layers[0])
            continue
        for layer in layers:
            halves = check_halves(parts.layout, layer)
            assert {halves.half_of(name) for name, _ in layer.named_parameters()} == {"attn", "mlp"}, family
    assert LAYOUTS["cohere"].halves is None and LAYOUTS["llama"].halves is not None
