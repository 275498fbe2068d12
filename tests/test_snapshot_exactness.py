"""SnapCheck with the real layer runner: S[q] built incrementally through the shards equals f^[0:q](x)
computed from scratch, on file:// and on s3:// alike, for text blocks and for blocks of packed examples.

fp32 snapshots: the same bits. bf16 snapshots: exactly the scratch chain rounded to bf16 after every
stored depth (that rounding is the only difference), and within bf16 rounding of the fp32 chain.
Packed examples (several per block, positions restarting at 0, prompt and completion tokens) are written
with the token shards as the tokenize job writes them; every depth carries their positions, so each
example's activations are those the HF model gives it alone, and a Stage 2 step fed from the shards
equals the same step fed from the scratch forward.
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from helpers import corpus_blocks, make_config, tiny_model_dir
from segprop_ray.core.blocks import CONTEXT, PAD, TARGET, TokenBlocks
from segprop_ray.core.data_order import BlockOrder
from segprop_ray.core.exits import IterationExit
from segprop_ray.core.iteration import build_segment, snapshot_cast
from segprop_ray.core.packing import Block, Example, ExamplePacker
from segprop_ray.core.parts import ModelParts
from segprop_ray.core.plan import SegPropPlan, snapshot_spec, stage2_spec
from segprop_ray.core.step_inputs import model_inputs
from segprop_ray.core.training import LoopHooks, SegmentLoop
from segprop_ray.core.weights import SafetensorsSource
from segprop_ray.storage.layout import RunLayout
from segprop_ray.storage.reader import epoch_reader, sequential_reader
from segprop_ray.storage.shard_format import ShardSpec
from segprop_ray.storage.shards import write_token_shards
from segprop_ray.storage.snapcheck import commit_depth, load_committed, transform_file

BASE, DEEPEST = 1, 4
SEQ_LEN = 16


def example_spans(block: Block) -> list[tuple[int, int]]:
    """(start, stop) of each example in a packed block: an example starts where its positions restart at 0."""
    end = block.kinds.index(PAD) if PAD in block.kinds else len(block.kinds)
    starts = [t for t in range(end) if block.positions[t] == 0]
    return list(zip(starts, starts[1:] + [end]))


def packed_blocks(vocab_size: int, seed: int = 0) -> tuple[TokenBlocks, list[list[tuple[int, int]]]]:
    """About 20 blocks of whole examples (2-8 tokens: a prompt, then a completion) packed as the tokenize job packs
    them, and each block's example spans."""
    rng = random.Random(seed)
    examples = []
    for _ in range(64):
        n = rng.randrange(2, 9)
        examples.append(Example([rng.randrange(3, vocab_size) for _ in range(n)],
                                [CONTEXT] * (n // 2) + [TARGET] * (n - n // 2)))
    packer = ExamplePacker(SEQ_LEN, pad_id=1)
    built = list(packer.add(examples)) + list(packer.finish())
    rows = torch.tensor([[b.ids, b.positions, b.kinds] for b in built])  # (N, 3, T)
    spans = [example_spans(block) for block in built]
    assert len(built) < len(examples) and sum(len(s) >= 3 for s in spans) >= 3  # several examples share a block
    assert any(PAD in block.kinds for block in built)
    return TokenBlocks(rows[:, 0], rows[:, 1], rows[:, 2].to(torch.uint8)), spans


def tokens_of(data: str, vocab_size: int) -> tuple[torch.Tensor | TokenBlocks, list | None]:
    """The token blocks of a test: a text stream cut into blocks, or packed examples (with their spans)."""
    if data == "text":
        return corpus_blocks(20, SEQ_LEN), None
    return packed_blocks(vocab_size)


def producer(parts, source, layers, embed):
    return parts.segment(snapshot_spec(layers, source, embed)).eval()


def build_depths(layout, parts, source, ids, spec, dtype):
    """Tokens, then S[BASE] from them, then S[q] = f_q(S[q-1]) file by file through the storage."""
    commit_depth(layout, "train", None, write_token_shards(layout, "train", ids, spec), "tokens", spec)
    for depth in range(BASE, DEEPEST + 1):
        first = depth == BASE
        module = producer(parts, source, list(range(BASE + 1)) if first else [depth], embed=first)

        @torch.no_grad()
        def apply(rows, module=module):
            hidden = rows.get("hidden")
            return snapshot_cast(module(rows["input_ids"], None if hidden is None else hidden.float(),
                                        rows["position_ids"]), dtype)

        infos = [transform_file(layout, "train", i, source_depth=None if first else depth - 1, depth=depth, fn=apply,
                                spec=spec) for i in range(spec.num_files(len(ids)))]
        commit_depth(layout, "train", depth, infos, f"weights-{depth}", spec)
    marker = load_committed(layout, "train", DEEPEST, f"weights-{DEEPEST}", len(ids), spec)
    return torch.cat([batch["hidden"] for batch in sequential_reader(layout, marker, batch_size=5)])


def assert_each_example_as_alone(model_dir, spans, stored: torch.Tensor, blocks: TokenBlocks, tolerance: float) -> None:
    """Each packed example's stored activations at DEEPEST are what the HF model's layers give that example alone."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    checked = 0
    with torch.no_grad():
        for row, held in enumerate(spans):
            for start, stop in held:
                ids = blocks.input_ids[row, start:stop][None]  # (1, L)
                alone = model(ids, output_hidden_states=True).hidden_states[DEEPEST + 1][0]  # after layer DEEPEST
                torch.testing.assert_close(stored[row, start:stop].float(), alone, rtol=tolerance, atol=tolerance)
                checked += 1
    assert checked == sum(len(held) for held in spans) > len(spans)


@pytest.mark.parametrize("data", ["text", "packed"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_incremental_snapshot_equals_scratch_forward(run_layout, tmp_path, dtype, data):
    model_dir = tiny_model_dir(tmp_path, "llama", 6)
    parts, source = ModelParts(AutoConfig.from_pretrained(model_dir)), SafetensorsSource.from_model_dir(model_dir)
    tokens, spans = tokens_of(data, parts.config.vocab_size)
    ids = tokens if data == "text" else tokens.input_ids  # (N, T)
    positions = None if data == "text" else tokens.position_ids  # (N, T), restarting at 0 per example
    spec = ShardSpec.for_snapcheck(SEQ_LEN, parts.config.hidden_size, dtype, rows_per_group=4, groups_per_file=2)

    stored = build_depths(run_layout, parts, source, tokens, spec, dtype)  # (N, T, H)

    if spans is not None:  # fp32: the split's float error only; bf16: its rounding besides
        assert_each_example_as_alone(model_dir, spans, stored, tokens, 1e-5 if dtype == "fp32" else 2 ** -6)
    with torch.no_grad():
        scratch = producer(parts, source, list(range(DEEPEST + 1)), embed=True)(ids, None, positions)  # f^[0:q](x)
        if dtype == "fp32":
            assert stored.dtype == torch.float32 and torch.equal(stored, scratch)
            return
        base = producer(parts, source, list(range(BASE + 1)), embed=True)
        chained = snapshot_cast(base(ids, None, positions), "bf16")
        for depth in range(BASE + 1, DEEPEST + 1):
            chained = snapshot_cast(producer(parts, source, [depth], embed=False)(ids, chained.float(), positions),
                                    "bf16")
    assert stored.dtype == torch.bfloat16 and torch.equal(stored.view(torch.int16), chained.view(torch.int16))
    torch.testing.assert_close(stored.float(), scratch, rtol=2 ** -6, atol=2 ** -6)


def test_stage2_steps_from_packed_shards_equal_steps_from_scratch(tmp_path):
    """Layer DEEPEST + LL + head trained for 3 steps on S[DEEPEST-1] read from the shards (block order, reader, the
    positions and token kinds every depth carries) ends bit for bit where the same steps fed from f^[0:q-1](x),
    computed in one forward from the tokens, end."""
    model_dir = tiny_model_dir(tmp_path, "llama", 6)
    parts, source = ModelParts(AutoConfig.from_pretrained(model_dir)), SafetensorsSource.from_model_dir(model_dir)
    blocks, _ = packed_blocks(parts.config.vocab_size, seed=1)
    spec = ShardSpec.for_snapcheck(SEQ_LEN, parts.config.hidden_size, "fp32", rows_per_group=4, groups_per_file=2)
    layout = RunLayout.open((tmp_path / "run").as_uri())
    build_depths(layout, parts, source, blocks, spec, "fp32")
    q = DEEPEST
    marker = load_committed(layout, "train", q - 1, f"weights-{q - 1}", len(blocks), spec)
    with torch.no_grad():  # f^[0:q-1](x) from scratch, each example with its own mask and positions
        scratch = producer(parts, source, list(range(q)), embed=True)(blocks.input_ids, None, blocks.position_ids)
    cfg = make_config(model_dir, data={"seq_len": SEQ_LEN, "format": "prompt_completion"},
                      training={"max_steps": 3, "per_device_train_batch_size": 3, "learning_rate": 1e-2,
                                "logging_steps": 1}, snapcheck={"rows_per_group": 4})
    args = cfg.training_for("stage2")
    order = BlockOrder.for_training(len(blocks), spec.group_size, args, cfg.data)
    plan = SegPropPlan(parts.num_layers, BASE, 1)

    def from_shards(epoch, skip):
        return iter(epoch_reader(layout, marker, order, epoch, skip))

    def from_scratch(epoch, skip):
        for rows in order.epoch_batches(epoch)[skip:]:
            yield {**blocks.rows(rows), "hidden": scratch[rows]}  # (B, T) each, (B, T, H)

    trained = []
    for batches in (from_shards, from_scratch):
        torch.manual_seed(0)
        segment = build_segment(parts, stage2_spec(plan, q, source, source, source), trainable=True)
        before = {k: v.clone() for k, v in segment.state_dict().items()}
        loop = SegmentLoop(segment, args, batches, order.batches_per_epoch(), torch.device("cpu"),
                           IterationExit.from_config(cfg.exit.layer, args), LoopHooks())
        state = loop.run()
        trained.append((segment.state_dict(), state.history))
        assert state.step == 3 and any(not torch.equal(before[k], v) for k, v in segment.state_dict().items())
    (shard_weights, shard_history), (scratch_weights, scratch_history) = trained
    assert shard_history == scratch_history and len(shard_history) >= 3
    for name, tensor in scratch_weights.items():
        assert torch.equal(shard_weights[name], tensor), name

    first = next(from_shards(0, 0))  # the per-example structure matters: ignoring it gives another loss
    with torch.no_grad():
        own, text = (segment(**{**model_inputs(first, torch.device("cpu")), **extra})
                     for extra in ({}, {"position_ids": None}))
    assert not torch.equal(own, text)
