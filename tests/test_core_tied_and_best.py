"""Tied embeddings trained as HF trains them, and the best evaluation's weights committed (load_best_model_at_end)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import corpus_blocks, make_config, plain_e2e_loop
from segprop_ray.core.assemble import exit_config, exit_state_dict, write_model_dir
from segprop_ray.core.data_order import BlockOrder
from segprop_ray.core.exits import IterationExit
from segprop_ray.core.inprocess import run_inprocess
from segprop_ray.core.parts import ModelParts
from segprop_ray.core.plan import exit_is_tied
from segprop_ray.core.training import LoopHooks, SegmentLoop
from segprop_ray.demo.tiny_model import make_tiny_model

STEPS, BATCH, SEQ = 3, 4, 16


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tied") / "llama", "llama", num_layers=4, hidden=32,
                           tie_word_embeddings=True)


def exported(result, model_dir, depth, out):
    config = AutoModelForCausalLM.from_pretrained(model_dir).config
    layout = ModelParts(config).layout
    state = exit_state_dict(result.plan, layout, depth, result.committed, result.exits[depth],
                            tied=exit_is_tied(result.plan, depth, True))
    write_model_dir(out, exit_config(config, result.plan, depth), state)
    return AutoModelForCausalLM.from_pretrained(out).eval()


def test_e2e_on_a_tied_model_equals_a_plain_loop_and_exports_tied(tmp_path, tied_dir):
    train, evaluation = corpus_blocks(32, SEQ, seed=0), corpus_blocks(8, SEQ, seed=1)
    cfg = make_config(tied_dir, segprop={"mode": "e2e"},
                      training={"learning_rate": 1e-3, "max_steps": STEPS, "per_device_train_batch_size": BATCH})
    result = run_inprocess(str(tied_dir), train, evaluation, cfg)
    model = exported(result, tied_dir, result.final_depth, tmp_path / "e2e")
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    reference = plain_e2e_loop(tied_dir, train, cfg, STEPS)
    assert reference.lm_head.weight is reference.model.embed_tokens.weight  # trained as one tensor
    # The chunked LM-head loss and HF's cross-entropy differ in the last float bits; AdamW's normalised first steps
    # carry that into weights moved by ~2e-3 as differences up to ~2e-6 (an untied head would differ by ~1e-3).
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], tensor, rtol=0, atol=1e-5)
    assert not torch.equal(reference.lm_head.weight, AutoModelForCausalLM.from_pretrained(tied_dir).lm_head.weight)


def test_stage2_exits_of_a_tied_model_are_untied(tmp_path, tied_dir):
    cfg = make_config(tied_dir, segprop={"base_depth": 0, "last_layers": 2}, training={"max_steps": 2})
    result = run_inprocess(str(tied_dir), corpus_blocks(16, SEQ), corpus_blocks(4, SEQ, seed=1), cfg)
    stage1, stage2 = exported(result, tied_dir, 0, tmp_path / "s1"), exported(result, tied_dir, 1, tmp_path / "s2")
    assert stage1.config.tie_word_embeddings and stage1.lm_head.weight is stage1.model.embed_tokens.weight
    assert not stage2.config.tie_word_embeddings
    assert not torch.equal(stage2.lm_head.weight, stage2.model.embed_tokens.weight)  # the head trained on its own
    assert torch.equal(stage2.model.embed_tokens.weight, stage1.model.embed_tokens.weight)  # the embedding did not


class ScriptedEvaluation:
    """Eval losses that fall until step ``best`` and rise after it; remembers the weights seen at each evaluation."""

    def __init__(self, model, losses: list[float]):
        self.model, self.losses, self.seen = model, list(losses), []

    def __call__(self) -> float:
        self.seen.append({k: v.clone() for k, v in self.model.state_dict().items()})
        return self.losses[len(self.seen) - 1]


def scripted_loop(tied_dir, losses, steps=6):
    cfg = make_config(tied_dir, segprop={"base_depth": 0}, training={"max_steps": steps, "eval_steps": 1, "save_steps": 1,
                                          "per_device_train_batch_size": 2})
    parts = ModelParts(AutoModelForCausalLM.from_pretrained(tied_dir).config)
    from segprop_ray.core.iteration import RunWeights, build_segment
    from segprop_ray.core.plan import SegPropPlan
    from segprop_ray.core.weights import DictSource, SafetensorsSource

    plan = SegPropPlan.from_config(cfg.segprop, parts.num_layers)
    weights = RunWeights(plan, SafetensorsSource.from_model_dir(tied_dir), DictSource({}), None, tied=True)
    torch.manual_seed(0)
    segment = build_segment(parts, weights.training_spec(plan.base_depth), trainable=True)
    blocks = corpus_blocks(16, SEQ)
    order = BlockOrder(len(blocks), 4, 2, 0)
    evaluate = ScriptedEvaluation(segment, losses)
    loop = SegmentLoop(segment, cfg.training, lambda epoch, skip: iter([{"input_ids": blocks[torch.tensor(r)]}
                                                                         for r in order.epoch_batches(epoch)[skip:]]),
                       order.batches_per_epoch(), torch.device("cpu"), IterationExit(), LoopHooks(evaluate=evaluate))
    return loop, segment, evaluate


LOSSES = [9.0, 5.0, 4.0, 3.0, 3.5, 3.2, 4.0]  # step 0, then steps 1..6: the best is step 3


def test_the_best_evaluation_is_committed_not_the_last_step(tied_dir):
    loop, segment, evaluate = scripted_loop(tied_dir, LOSSES)
    state = loop.run()
    assert state.kept_step == 3 and state.best == {"step": 3, "eval_loss": 3.0} and state.step == 6
    assert state.kept_eval_loss() == 3.0
    for name, tensor in segment.state_dict().items():
        assert torch.equal(tensor, evaluate.seen[3][name]), name  # bit for bit the step-3 weights
    assert not torch.equal(segment.state_dict()["head.proj.weight"], evaluate.seen[6]["head.proj.weight"])


def test_a_resumed_iteration_keeps_the_best_so_far(tied_dir):
    first, _, evaluate = scripted_loop(tied_dir, LOSSES)
    saved = []
    first.hooks.checkpoint = lambda loop: saved.append(loop.state_dict()) if loop.state.step == 4 else None
    first.run()
    resumed, segment, _ = scripted_loop(tied_dir, LOSSES[5:])  # only the evaluations after step 4 remain
    resumed.load_state_dict(saved[0])
    state = resumed.run()
    assert state.kept_step == 3 and state.step == 6
    for name, tensor in segment.state_dict().items():
        assert torch.equal(tensor, evaluate.seen[3][name]), name


def test_without_load_best_the_last_step_is_kept(tied_dir):
    loop, segment, evaluate = scripted_loop(tied_dir, LOSSES)
    loop.args = loop.args.model_copy(update={"load_best_model_at_end": False})
    loop.best.enabled = False
    state = loop.run()
    assert state.kept_step == 6 and state.kept_eval_loss() == 4.0
    assert torch.equal(segment.state_dict()["head.proj.weight"], evaluate.seen[6]["head.proj.weight"])
