"""LoRA segments through PEFT and the LoRA end-to-end baseline (``mode: lora``), in process: adapters start at the
base model, merge into plain weights as W + B A alpha / r (as PEFT's own merge), resume exactly, and checkpoints
hold only adapters and their optimizer state."""

import copy
import tempfile

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from helpers import corpus_blocks, make_config, tiny_model_dir
from segprop_ray.core.adapters import LORA_TAG, lora_targets
from segprop_ray.core.assemble import exit_config, exit_state_dict, write_model_dir
from segprop_ray.core.data_order import BlockOrder
from segprop_ray.core.exits import IterationExit
from segprop_ray.core.inprocess import run_inprocess
from segprop_ray.core.iteration import RunWeights, build_segment, build_training_segment
from segprop_ray.core.parts import ModelParts
from segprop_ray.core.plan import SegPropPlan, exit_is_tied
from segprop_ray.core.state_io import load_state, save_state
from segprop_ray.core.training import LoopHooks, SegmentLoop
from segprop_ray.core.weights import DictSource

N_LAYERS, P, R = 6, 1, 2
ADAPTER = {"r": 4, "alpha": 16.0, "target_modules": ["q_proj", "v_proj", "down_proj"]}


@pytest.fixture(scope="module")
def blocks():
    return corpus_blocks(32, 16, seed=0), corpus_blocks(8, 16, seed=1)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("llama"), "llama", N_LAYERS)


class Keep:
    """Observer keeping a deep copy of each iteration's segment after training (adapters included)."""

    def __init__(self):
        self.trained = {}

    def __call__(self, event, key, segment):
        if event == "trained":
            self.trained[key] = copy.deepcopy(segment)


def test_merged_committed_layer_is_base_plus_b_a_times_scale_for_every_target(blocks, llama):
    keep = Keep()
    result = run_inprocess(str(llama), *blocks, make_config(llama, segprop={"adapter": ADAPTER}), observer=keep)
    base = AutoModelForCausalLM.from_pretrained(llama).state_dict()
    assert not [name for name in result.committed if LORA_TAG in name or "base_layer" in name]
    for depth in (P, P + 1):  # Stage 1 (prefix + LL) and a Stage 2 layer (+ LL)
        segment = keep.trained[depth]
        targets = lora_targets(segment)
        trained_layers = ({*range(P + 1), 4, 5} if depth == P else {P + 1, 4, 5})
        assert {segment.origins[".".join(t.path.split(".")[:3])] for t in targets} == {
            f"model.layers.{i}" for i in trained_layers}
        assert {t.path.rsplit(".", 1)[-1] for t in targets} == {"q_proj", "v_proj", "down_proj"}
        state = segment.state_dict()
        for target in targets:
            a, b = state[f"{target.path}.lora_A.default.weight"], state[f"{target.path}.lora_B.default.weight"]
            assert target.scaling == 16.0 / 4 and b.abs().sum() > 0  # B trained away from its zero start
            name = segment.to_original_names({f"{target.path}.weight": a})
            (original,) = name
            expected = base[original] + (b @ a) * target.scaling
            kept = result.committed[original] if original in result.committed else result.exits[depth][original]
            torch.testing.assert_close(kept, expected, rtol=0, atol=1e-7)
            module = segment.get_submodule(target.path)
            module.merge(safe_merge=True)  # PEFT's own merge of the same adapter
            torch.testing.assert_close(kept, module.base_layer.weight, rtol=0, atol=1e-7)
        untouched = [name for name in base if not any(name.endswith(f"{m}.weight") for m in ADAPTER["target_modules"])]
        for name in untouched:  # norms, other projections, embedding and head: frozen under LoRA
            if name in result.exits[depth]:
                assert torch.equal(result.exits[depth][name], base[name]), name
            elif name in result.committed and depth == P + 1:
                assert torch.equal(result.committed[name], base[name]), name


def test_zero_initialised_adapters_start_at_the_base_model(blocks, llama):
    """PEFT starts B at zero: the LoRA segment's first forward is the plain segment's, bit for bit."""
    cfg = make_config(llama, segprop={"adapter": {**ADAPTER, "target_modules": "all-linear", "dropout": 0.1}})
    parts = ModelParts(AutoConfig.from_pretrained(llama))
    plan = SegPropPlan.from_config(cfg.segprop, parts.num_layers)
    weights = RunWeights(plan, parts.base_source(llama), DictSource({}), lambda d: None)
    lora = build_training_segment(parts, weights, plan.iteration(P), cfg.training)
    plain = build_segment(parts, weights.training_spec(P), trainable=True)
    targets = lora_targets(lora)
    assert len(targets) == 7 * (P + 1 + R)  # q, k, v, o, gate, up, down of every trained layer
    assert all(lora.get_submodule(t.path).lora_B["default"].weight.abs().sum() == 0 for t in targets)
    assert {n for n, p in lora.named_parameters() if p.requires_grad} == {
        n for n in lora.state_dict() if LORA_TAG in n}
    ids = blocks[1][:4]
    for model in (lora, plain):
        model.eval()
    with torch.no_grad():
        assert torch.equal(lora(ids), plain(ids))
        assert torch.equal(lora.logits(ids), plain.logits(ids))


def lora_loop(llama, ids, **training):
    cfg = make_config(llama, segprop={"adapter": {**ADAPTER, "dropout": 0.1}}, training=training)
    parts = ModelParts(AutoConfig.from_pretrained(llama))
    plan = SegPropPlan.from_config(cfg.segprop, parts.num_layers)
    torch.manual_seed(0)
    weights = RunWeights(plan, parts.base_source(llama), DictSource({}), lambda d: None)
    segment = build_training_segment(parts, weights, plan.iteration(P), cfg.training)
    order = BlockOrder(len(ids), 4, cfg.training.per_device_train_batch_size, cfg.training.seed)

    def batches(epoch, skip):
        for rows in order.epoch_batches(epoch)[skip:]:
            yield {"input_ids": ids[torch.tensor(rows)]}

    return SegmentLoop(segment, cfg.training, batches, order.batches_per_epoch(), torch.device("cpu"),
                       IterationExit.from_config(cfg.exit.layer, cfg.training), LoopHooks())


def test_resume_restores_adapters_and_checkpoints_hold_only_adapters(blocks, llama):
    ids = blocks[0]
    kw = dict(max_steps=6, per_device_train_batch_size=2, learning_rate=1e-2, save_steps=3)
    full = lora_loop(llama, ids, **kw)
    full.run()
    saved = {}
    first = lora_loop(llama, ids, **kw)
    first.hooks.checkpoint = lambda loop: saved.setdefault(loop.state.step, _roundtrip(loop.state_dict()))
    first.run()
    checkpoint = saved[3]
    adapters = {n for n, p in first.model.named_parameters() if p.requires_grad}
    assert set(checkpoint["model"]) == adapters and all(LORA_TAG in name for name in adapters)
    assert len(checkpoint["optimizer"]["state"]) == len(adapters)  # AdamW moments of the adapters only
    resumed = lora_loop(llama, ids, **kw)
    resumed.load_state_dict(checkpoint)
    resumed.run()
    final = full.model.state_dict()
    for name, tensor in resumed.model.state_dict().items():
        assert torch.equal(tensor, final[name]), name
    assert resumed.state.history == full.state.history
    with pytest.raises(RuntimeError, match="checkpoint does not fit the segment"):
        lora_loop(llama, ids, **kw).load_state_dict({**checkpoint, "model": {**checkpoint["model"], "bogus.weight": ids}})


def _roundtrip(state):
    with tempfile.TemporaryDirectory() as d:
        save_state(state, d, "loop")
        return load_state(d, "loop")


def exported(result, model_dir, depth, out):
    config = AutoConfig.from_pretrained(model_dir)
    parts = ModelParts(config)
    state = exit_state_dict(result.plan, parts.layout, depth, result.committed, result.exits[depth],
                            tied=exit_is_tied(result.plan, depth, parts.tied))
    write_model_dir(out, exit_config(config, result.plan, depth), state)
    return AutoModelForCausalLM.from_pretrained(out).eval()


def test_lora_mode_trains_adapters_on_every_layer_and_exports_a_merged_model(tmp_path, blocks, llama):
    cfg = make_config(llama, segprop={"mode": "lora", "adapter": {"r": 2, "target_modules": "all-linear"}},
                      training={"max_steps": 4})
    result = run_inprocess(str(llama), *blocks, cfg)
    assert [(it["stage"], it["depth"]) for it in result.iterations] == [("e2e", N_LAYERS - 1)]
    model = exported(result, llama, N_LAYERS - 1, tmp_path / "lora")
    base = AutoModelForCausalLM.from_pretrained(llama).eval()
    moved = {name for name, tensor in model.state_dict().items() if not torch.equal(tensor, base.state_dict()[name])}
    assert {name.split(".")[2] for name in moved} == {str(i) for i in range(N_LAYERS)}  # every layer adapted
    assert all(name.endswith("_proj.weight") for name in moved)  # embedding, norms, head frozen
    ids = blocks[1][:2]
    with torch.no_grad():
        assert not torch.equal(model(ids).logits, base(ids).logits)
    default = make_config(llama, segprop={"mode": "lora"}).segprop.adapter_spec()
    assert (default.r, default.alpha, default.dropout, default.target_modules) == (8, 8.0, 0.0, None)  # PEFT's


def test_lora_segments_at_learning_rate_zero_export_the_input_model(tmp_path, blocks, llama):
    cfg = make_config(llama, segprop={"adapter": ADAPTER, "segment_layers": 2}, training={"learning_rate": 0.0})
    result = run_inprocess(str(llama), *blocks, cfg)
    model = exported(result, llama, result.final_depth, tmp_path / "exit")
    base = AutoModelForCausalLM.from_pretrained(llama).eval()
    ids = blocks[1][:2]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=0, atol=0)


def test_targets_matching_nothing_are_refused_in_one_line(llama):
    cfg = make_config(llama, segprop={"adapter": {"target_modules": ["lm_head"]}})
    parts = ModelParts(AutoConfig.from_pretrained(llama))
    plan = SegPropPlan.from_config(cfg.segprop, parts.num_layers)
    weights = RunWeights(plan, parts.base_source(llama), DictSource({}), lambda d: None)
    with pytest.raises(ValueError, match=r"^segprop.adapter.target_modules \('lm_head',\) matches no linear module"):
        build_training_segment(parts, weights, plan.iteration(P), cfg.training)


def test_a_tied_model_stays_tied_under_lora(tmp_path, blocks):
    """LoRA leaves the LM head and the embedding frozen: every exit of a tied model, Stage 2's too, exports tied."""
    from segprop_ray.demo.tiny_model import make_tiny_model

    tied = make_tiny_model(tmp_path / "tied", "llama", num_layers=N_LAYERS, hidden=32, tie_word_embeddings=True)
    result = run_inprocess(str(tied), *blocks, make_config(tied, segprop={"adapter": ADAPTER}, exit={"run": {"max_depth": P + 1}}))
    assert exit_is_tied(result.plan, P + 1, True)
    model = exported(result, tied, P + 1, tmp_path / "exit")
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight


def test_segment_settings_the_model_cannot_take_are_refused_in_one_line(tmp_path, llama):
    from test_core_families import family_config

    from segprop_ray.core.layout import UnsupportedArchitecture
    from segprop_ray.pipeline.plan_checks import check_segments

    cfg = make_config(llama, segprop={"adapter": {"target_modules": ["lm_head", "embed_tokens"]}})
    parts = ModelParts(AutoConfig.from_pretrained(llama))
    with pytest.raises(ValueError, match=r"^segprop.adapter.target_modules \('lm_head', 'embed_tokens'\) matches no "
                                         r"linear module of the llama decoder layers$"):
        check_segments(cfg, parts, SegPropPlan.from_config(cfg.segprop, parts.num_layers))
    cohere = ModelParts(family_config("cohere"))
    halves = make_config(llama, segprop={"granularity": "sublayer"})
    with pytest.raises(UnsupportedArchitecture, match=r"^segprop.granularity sublayer is not supported for cohere"):
        check_segments(halves, cohere, SegPropPlan.from_config(halves.segprop, cohere.num_layers))
