"""``data.packing: false``: padded examples batched by length as HF's ``group_by_length`` does.

The tokenize job stores one padded example per block, sorted by length; every micro-batch of Stage 1, Stage 2 and
evaluation is a run of consecutive blocks of that order, cut to its longest example, while the reader still reads
each row group once. Every rank gets the same number of full micro-batches in every epoch.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from helpers import make_config, tiny_model_dir
from segprop_ray.core.blocks import CONTEXT, PAD, TARGET, TokenBlocks, trim_padding
from segprop_ray.core.data_order import BlockOrder, sequential_batches
from segprop_ray.core.inprocess import InProcessRun
from segprop_ray.core.packing import Example, RowPacker
from segprop_ray.core.step_inputs import model_inputs
from segprop_ray.storage.layout import RunLayout
from segprop_ray.storage.reader import epoch_reader
from segprop_ray.storage.shard_format import ShardSpec
from segprop_ray.storage.shards import write_token_shards
from segprop_ray.storage.snapcheck import commit_depth, load_committed

SEQ_LEN = 32


def padded_rows(count: int, seed: int = 0) -> TokenBlocks:
    """``count`` examples of 3..40 tokens (some truncated) through the packer of ``packing: false``."""
    rng = random.Random(seed)
    examples = []
    for _ in range(count):
        n = rng.randrange(3, 41)
        kinds = [CONTEXT] * (n // 2) + [TARGET] * (n - n // 2)
        examples.append(Example([rng.randrange(3, 90) for _ in range(n)], kinds))
    packer = RowPacker(SEQ_LEN, pad_id=1)
    built = list(packer.add(examples)) + list(packer.finish())
    rows = torch.tensor([[b.ids, b.positions, b.kinds] for b in built])  # (N, 3, T)
    return TokenBlocks(rows[:, 0], rows[:, 1], rows[:, 2].to(torch.uint8))


def lengths_of(blocks: TokenBlocks) -> torch.Tensor:
    return (blocks.token_kind != PAD).sum(dim=1)  # (N,)


def padding(blocks: TokenBlocks, batches: list[list[int]]) -> int:
    """Padding tokens the micro-batches compute once each is cut to its longest example."""
    total = 0
    for rows in batches:
        cut = trim_padding(blocks.rows(rows))["token_kind"]  # (B, t)
        total += int((cut == PAD).sum())
    return total


GEOMETRIES = [(3, 4, 1), (4, 4, 1), (8, 2, 1), (3, 4, 2), (5, 3, 2), (2, 2, 3), (4, 3, 2)]
"""(rows per group, micro-batch size, data-parallel world): spans of lcm(group, batch) blocks where 61 blocks hold at
least 4 per rank, row groups in stored order where they do not ((3, 4, 2), (5, 3, 2), (4, 3, 2))."""


@pytest.mark.parametrize("group,batch,world", GEOMETRIES)
def test_padded_examples_are_batched_by_length(group, batch, world):
    blocks = padded_rows(61)
    lengths = lengths_of(blocks)
    assert torch.equal(lengths, lengths.sort(descending=True).values) and int(lengths.max()) == SEQ_LEN
    orders = [BlockOrder(len(blocks), group, batch, seed=7, world_size=world, rank=r, by_length=True)
              for r in range(world)]
    unit, n = orders[0].unit_size, orders[0].batches_per_epoch()
    spans = unit % batch == 0
    assert spans == (61 // math.lcm(group, batch) >= 4 * world) and n >= 4
    epochs = []
    for epoch in range(3):
        dealt = [order.epoch_batches(epoch) for order in orders]
        for rank in dealt:
            seams = 0
            for rows in rank:
                if rows[0] // unit == rows[-1] // unit:
                    assert rows == list(range(rows[0], rows[0] + batch))  # consecutive rows of the sorted order
                else:
                    seams += 1  # a micro-batch across two units (row groups taken in stored order)
            assert seams == 0 if spans else seams <= len(rank) * batch // unit + 1
        assert [len(rank) for rank in dealt] == [n] * world  # every rank, every epoch: n full micro-batches
        flat = [block for rank in dealt for rows in rank for block in rows]
        assert len(flat) == len(set(flat))
        epochs.append(dealt)
        again = [BlockOrder(len(blocks), group, batch, seed=7, world_size=world, rank=r, by_length=True)
                 for r in range(world)]
        assert [order.epoch_batches(epoch) for order in again] == dealt  # deterministic: a resumed rank sees the same
    assert epochs[0] != epochs[1]  # the units are shuffled anew each epoch


@pytest.mark.parametrize("num_blocks,group,batch,world", [(5000, 1000, 7, 2), (30000, 4096, 6, 8), (10000, 73, 16, 8)])
def test_length_batches_use_as_much_data_as_packed_batches(num_blocks, group, batch, world):
    """Row groups far larger than a micro-batch (small models' default group size) and many workers: each rank still
    gets the micro-batches it gets with packed data, not a fraction of them."""
    by_length, packed = (BlockOrder(num_blocks, group, batch, seed=0, world_size=world, rank=world - 1,
                                    by_length=flag) for flag in (True, False))
    assert by_length.batches_per_epoch() == packed.batches_per_epoch() >= num_blocks // (group * world) * group // batch
    assert len(by_length.epoch_batches(1)) == by_length.batches_per_epoch()


@pytest.mark.parametrize("by_length", [False, True])
def test_too_few_blocks_for_the_workers_is_refused_in_one_line(by_length):
    order = BlockOrder(10, 8, 2, seed=0, world_size=3, by_length=by_length)  # 2 row groups for 3 workers
    message = ("10 blocks in row groups of 8 cannot give each of 3 data-parallel workers a micro-batch of 2: lower the "
               "workers, per_device_train_batch_size or snapcheck.rows_per_group, or add data")
    with pytest.raises(ValueError, match=f"^{message}$"):
        order.epoch_batches(0)
    cfg = make_config("unused", data={"packing": not by_length}, training={"per_device_train_batch_size": 2})
    with pytest.raises(ValueError, match=f"^{message}$"):
        BlockOrder.for_training(10, 8, cfg.training, cfg.data, world_size=3)


@pytest.mark.parametrize("group,batch", [(3, 4), (4, 16), (8, 2), (64, 8)])
def test_by_length_micro_batches_are_cut_to_their_longest_example(group, batch):
    blocks = padded_rows(200, seed=3)
    lengths = lengths_of(blocks)
    grouped = BlockOrder(len(blocks), group, batch, seed=1, by_length=True).epoch_batches(0)
    for rows in grouped:
        cut = model_inputs(blocks.rows(rows), torch.device("cpu"))["input_ids"]
        assert cut.shape == (batch, int(lengths[rows].max()))
        assert int(lengths[rows].max() - lengths[rows].min()) <= 1 + batch // 4  # similar lengths side by side
    perm = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(0)).tolist()
    random_batches = [perm[i : i + batch] for i in range(0, len(perm) - batch + 1, batch)]
    assert padding(blocks, grouped) * 8 < padding(blocks, random_batches)
    if batch > group:  # block order without by_length mixes the rows of shuffled groups of any length
        plain = BlockOrder(len(blocks), group, batch, seed=1).epoch_batches(0)
        assert padding(blocks, grouped) * 8 < padding(blocks, plain)


def test_the_reader_reads_each_row_group_once_in_length_order(tmp_path):
    blocks = padded_rows(61, seed=5)
    layout = RunLayout.open(str(tmp_path / "run"))
    spec = ShardSpec(seq_len=SEQ_LEN, group_size=3, groups_per_file=2)
    commit_depth(layout, "train", None, write_token_shards(layout, "train", blocks, spec), "tokens", spec)
    marker = load_committed(layout, "train", None, "tokens", len(blocks), spec)
    order = BlockOrder(len(blocks), spec.group_size, 4, seed=2, by_length=True)
    for epoch, skip in ((0, 0), (1, 3)):
        expected = order.epoch_batches(epoch)[skip:]
        reader = epoch_reader(layout, marker, order, epoch, skip_batches=skip, with_hidden=False)
        read = list(reader)
        assert [batch["block_id"].tolist() for batch in read] == expected
        for batch, rows in zip(read, expected):
            assert torch.equal(batch["input_ids"], blocks.input_ids[rows])
            assert torch.equal(batch["token_kind"], blocks.token_kind[rows])
        groups = {block // spec.group_size for rows in expected for block in rows}
        assert reader.stats.groups_read == len(groups)  # each group read once, whole micro-batches never re-read


@pytest.mark.parametrize("by_length", [False, True])
@pytest.mark.parametrize("num_blocks,group,batch,world", [(18, 4, 2, 2), (23, 4, 3, 2), (40, 3, 2, 3), (50, 6, 4, 4)])
def test_every_rank_gets_the_same_full_micro_batches_in_every_epoch(by_length, num_blocks, group, batch, world):
    """A short last row group (or span) lands on another rank each epoch; no rank is ever left a short batch."""
    for seed in range(12):
        orders = [BlockOrder(num_blocks, group, batch, seed, world_size=world, rank=r, by_length=by_length)
                  for r in range(world)]
        n = orders[0].batches_per_epoch()
        assert n > 0
        for epoch in range(4):
            dealt = [order.epoch_batches(epoch) for order in orders]
            assert [[len(rows) for rows in rank] for rank in dealt] == [[batch] * n] * world, (seed, epoch)


def test_evaluation_batches_are_consecutive_blocks():
    assert sequential_batches(10, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_the_training_order_follows_the_packing_setting(tmp_path):
    for packing in (True, False):
        cfg = make_config("unused", data={"packing": packing})
        order = BlockOrder.for_training(40, 3, cfg.training, cfg.data, world_size=2, rank=1)
        assert order.by_length is not packing
        assert (order.batch_size, order.seed, order.shuffle, order.world_size, order.rank) == \
            (cfg.training.per_device_train_batch_size, cfg.training.seed, cfg.data.shuffle, 2, 1)


def test_inprocess_stage1_trains_on_length_batches_cut_to_the_longest(tmp_path):
    model_dir = tiny_model_dir(tmp_path, "llama", 4)
    cfg = make_config(model_dir, data={"seq_len": SEQ_LEN, "packing": False, "format": "prompt_completion"},
                      training={"max_steps": 5, "per_device_train_batch_size": 4, "eval_steps": 0},
                      snapcheck={"rows_per_group": 3}, segprop={"base_depth": 1, "last_layers": 1})
    train, evaluation = padded_rows(40, seed=8), padded_rows(8, seed=9)
    seen: list[torch.Tensor] = []

    def observe(event, depth, segment):
        if event == "built":
            segment.register_forward_pre_hook(
                lambda module, args, kwargs: seen.append(kwargs["input_ids"].clone()) if module.training else None,
                with_kwargs=True)

    run = InProcessRun(str(model_dir), train, evaluation, cfg, observer=observe)
    run.train_depth(run.plan.iterations[0], None, None)
    expected = BlockOrder.for_training(len(train), 3, cfg.training, cfg.data).epoch_batches(0)[:5]
    lengths = lengths_of(train)
    assert len(seen) == 5
    for ids, rows in zip(seen, expected):
        longest = int(lengths[rows].max())
        assert torch.equal(ids, train.input_ids[rows, :longest])
