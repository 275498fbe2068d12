"""The segment loop: HF TrainingArguments semantics, exact resume, and exit decisions."""

import tempfile

import pytest
import torch

from helpers import corpus_blocks, make_config, tiny_model_dir
from segprop_ray.core.data_order import BlockOrder
from segprop_ray.core.exits import IterationExit, RunExit
from segprop_ray.core.iteration import build_segment
from segprop_ray.core.optim import decay_groups, total_steps, warmup_steps
from segprop_ray.core.parts import ModelParts
from segprop_ray.core.plan import SegPropPlan, stage1_spec
from segprop_ray.core.state_io import load_state, save_state
from segprop_ray.core.training import LoopHooks, SegmentLoop
from segprop_ray.core.weights import SafetensorsSource


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoConfig

    model_dir = tiny_model_dir(tmp_path_factory.mktemp("m"), "llama", 4)
    return model_dir, AutoConfig.from_pretrained(model_dir), corpus_blocks(24, 16)


@pytest.fixture(scope="module")
def tied_setup(tmp_path_factory):
    from transformers import AutoConfig

    model_dir = tiny_model_dir(tmp_path_factory.mktemp("tied"), "llama", 4, tie_word_embeddings=True)
    return model_dir, AutoConfig.from_pretrained(model_dir), corpus_blocks(24, 16)


def make_loop(setup, exit_rule=None, **training):
    model_dir, config, ids = setup
    cfg = make_config(model_dir, training=training)
    args = cfg.training
    torch.manual_seed(0)
    parts = ModelParts(config)
    plan = SegPropPlan(parts.num_layers, 0, 2)
    segment = build_segment(parts, stage1_spec(plan, SafetensorsSource.from_model_dir(model_dir), parts.tied),
                            trainable=True)
    order = BlockOrder(len(ids), 4, args.per_device_train_batch_size, args.seed)

    def batches(epoch, skip):
        for rows in order.epoch_batches(epoch)[skip:]:
            yield {"input_ids": ids[torch.tensor(rows)]}

    rule = exit_rule or IterationExit.from_config(cfg.exit.layer, args)
    return SegmentLoop(segment, args, batches, order.batches_per_epoch(), torch.device("cpu"), rule, LoopHooks())


def weights(loop):
    return {k: v.clone() for k, v in loop.model.state_dict().items()}


@pytest.mark.parametrize("accumulation", [1, 2])
def test_resume_mid_run_equals_uninterrupted(setup, accumulation):
    kw = dict(max_steps=8, gradient_accumulation_steps=accumulation, per_device_train_batch_size=2,
              learning_rate=1e-3, warmup_ratio=0.25, weight_decay=0.1, save_steps=3)
    full = make_loop(setup, **kw)
    full.run()
    saved = {}
    first = make_loop(setup, **kw)
    first.hooks.checkpoint = lambda loop: saved.setdefault(loop.state.step, _roundtrip(loop.state_dict()))
    first.run()
    resumed = make_loop(setup, **kw)
    resumed.load_state_dict(saved[3])
    assert resumed.state.step == 3 and resumed.state.micro_batches == 3 * accumulation
    resumed.run()
    for name, tensor in weights(full).items():
        assert torch.equal(weights(resumed)[name], tensor), name
    assert resumed.state.history == full.state.history


def test_interrupt_stops_undecided_and_resumes_exactly(setup):
    """The ``interrupt`` hook (a preemption notice) stops the loop after that step with no decision and no kept
    weights; a loop restored from that step's state ends where an uninterrupted one does."""
    kw = dict(max_steps=8, per_device_train_batch_size=2, learning_rate=1e-3, warmup_ratio=0.25, save_steps=100,
              eval_steps=0)
    full = make_loop(setup, **kw)
    full.run()
    asked = []
    first = make_loop(setup, **kw)
    first.hooks.interrupt = lambda loop: asked.append(loop.state.step) or loop.state.step == 5
    state = first.run()
    assert first.interrupted and asked == [1, 2, 3, 4, 5] and state.step == 5
    assert state.decision is None and state.kept_step is None
    resumed = make_loop(setup, **kw)
    resumed.load_state_dict(_roundtrip(first.state_dict()))
    resumed.hooks.interrupt = lambda loop: False
    resumed.run()
    assert not resumed.interrupted and resumed.state.step == 8 and resumed.state.decision is not None
    for name, tensor in weights(full).items():
        assert torch.equal(weights(resumed)[name], tensor), name
    assert resumed.state.history == full.state.history


@pytest.mark.parametrize("tied", [False, True])
def test_sharded_checkpoint_resumes_exactly(setup, tied_setup, tied, tmp_path):
    """The train job's checkpoint format (:mod:`segprop_ray.core.sharded_state`, one process here): written at a
    step, read into a fresh loop, the run ends where an uninterrupted one does; a tied head is stored once."""
    from safetensors import safe_open

    from segprop_ray.core.sharded_state import load_sharded, save_sharded

    chosen = tied_setup if tied else setup
    kw = dict(max_steps=6, per_device_train_batch_size=2, learning_rate=1e-3, warmup_ratio=0.25, weight_decay=0.1,
              save_steps=3)
    full = make_loop(chosen, **kw)
    full.run()
    first = make_loop(chosen, **kw)
    first.hooks.checkpoint = lambda loop: loop.state.step == 3 and save_sharded(loop, tmp_path / "ckpt", rank=0)
    first.run()
    resumed = make_loop(chosen, **kw)
    load_sharded(resumed, tmp_path / "ckpt")
    assert resumed.state.step == 3
    resumed.run()
    for name, tensor in weights(full).items():
        assert torch.equal(weights(resumed)[name], tensor), name
    assert resumed.state.history == full.state.history
    (shard,) = [p for p in (tmp_path / "ckpt").glob("*.safetensors") if not p.name.startswith("loop-meta")]
    with safe_open(shard, framework="pt") as f:
        names = [k for k in f.keys() if k.startswith("model.")]
    assert len(names) == len(set(names)) and any("embed" in k for k in names)
    assert tied == ("model.head.proj.weight" not in names)  # the tied head is the embedding: not stored twice


def _roundtrip(state):
    """Through safetensors + JSON on disk, as a checkpoint travels."""
    with tempfile.TemporaryDirectory() as d:
        save_state(state, d, "loop")
        return load_state(d, "loop")


def test_accumulation_matches_larger_batch(setup):
    """Two accumulated micro-batches of 2 give the gradient of one batch of 4 (same blocks)."""
    small = make_loop(setup, max_steps=1, gradient_accumulation_steps=2, per_device_train_batch_size=2, max_grad_norm=0)
    big = make_loop(setup, max_steps=1, per_device_train_batch_size=4, max_grad_norm=0)
    _, _, ids = setup
    first_two = BlockOrder(len(ids), 4, 2, 42).epoch_batches(0)[:2]
    big.batches = lambda epoch, skip: iter([{"input_ids": ids[torch.tensor(first_two[0] + first_two[1])]}])
    grads = {}
    for name, loop in (("small", small), ("big", big)):
        params = list(loop.model.parameters())
        loop.optimizer.register_step_pre_hook(
            lambda opt, args, kwargs, n=name, ps=params: grads.setdefault(n, [p.grad.clone() for p in ps]) and None)
        loop.run()
    for g_small, g_big in zip(grads["small"], grads["big"]):
        torch.testing.assert_close(g_small, g_big, rtol=1e-5, atol=1e-7)


def test_steps_warmup_and_decay_groups(setup):
    cfg = make_config(setup[0], training={"max_steps": -1, "num_train_epochs": 2.5, "gradient_accumulation_steps": 2,
                                          "warmup_ratio": 0.1})
    assert total_steps(cfg.training, batches_per_epoch=10) == 13  # ceil(25 micro / 2)
    assert warmup_steps(cfg.training, 13) == 2
    loop = make_loop(setup)
    decay, no_decay = decay_groups(loop.model, 0.1)
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    trainable = [p for p in loop.model.parameters() if p.requires_grad]
    assert len(decay["params"]) + len(no_decay["params"]) == len(trainable) and no_decay["params"]


def test_plateau_and_target_exits_record_their_numbers(setup):
    losses = iter([3.0, 2.0, 2.0, 1.99, 2.1, 2.5])
    loop = make_loop(setup, IterationExit(patience=2, min_delta=0.05), max_steps=50, eval_steps=1)
    loop.hooks.evaluate = lambda: next(losses)
    state = loop.run()
    assert state.decision["reason"] == "plateau" and state.step == 3  # evaluations at steps 0, 1, 2, 3
    assert state.decision["best_eval_loss"] == 2.0 and "patience 2" in state.decision["detail"]
    loop = make_loop(setup, IterationExit(target_loss=2.5), max_steps=50, eval_steps=2)
    loop.hooks.evaluate = iter([4.0, 3.0, 2.4]).__next__
    state = loop.run()
    assert state.decision["reason"] == "target_loss" and state.step == 4 and state.decision["eval_loss"] == 2.4


def test_run_exit_rules():
    rule = RunExit(target_loss=None, patience_layers=2, min_delta=0.01, max_depth=None)
    losses = {1: 3.0, 2: 2.5, 3: 2.495, 4: 2.6}
    assert rule.decide({1: 3.0, 2: 2.5}, 2, last_depth=9).continue_training
    stop = rule.decide(losses, 4, last_depth=9)
    assert not stop.continue_training and stop.reason == "plateau" and stop.best_depth == 3
    assert RunExit(target_loss=2.6).decide(losses, 2, 9).reason == "target_loss"
    assert RunExit(max_depth=3).decide(losses, 3, 9).reason == "max_depth"
    assert RunExit().decide(losses, 9, 9).reason == "last_layer"


def test_sharded_checkpoint_refuses_shard_files_of_another_world(setup, tmp_path):
    """A shard file of a rank the checkpoint's world did not have (left by another attempt) is refused on restore
    instead of being read into the weights."""
    import shutil

    from segprop_ray.core.sharded_state import load_sharded, save_sharded

    kw = dict(max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3, save_steps=2)
    first = make_loop(setup, **kw)
    first.hooks.checkpoint = lambda loop: save_sharded(loop, tmp_path / "ckpt", rank=0)
    first.run()
    (shard,) = [p for p in (tmp_path / "ckpt").glob("shard-*.safetensors")]
    load_sharded(make_loop(setup, **kw), tmp_path / "ckpt")  # the checkpoint as written restores
    shutil.copy(shard, tmp_path / "ckpt" / shard.name.replace("shard-00001-", "shard-00002-"))
    with pytest.raises(ValueError, match=r"^checkpoint ckpt: shard files \['shard-00002-model-.*'\] are not of its 1 rank"):
        load_sharded(make_loop(setup, **kw), tmp_path / "ckpt")
