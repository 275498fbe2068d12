"""The streaming reader: exact BlockOrder batches, resume without re-reading, prefetch and wait stats."""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch

import segprop_ray.storage.reader as reader_module
from segprop_ray.core.data_order import BlockOrder
from segprop_ray.storage.errors import StorageError
from segprop_ray.storage.reader import epoch_reader, sequential_reader
from segprop_ray.storage.shard_format import ShardSpec
from segprop_ray.storage.shards import write_token_shards
from segprop_ray.storage.snapcheck import commit_depth, load_committed, transform_file

T, H, N = 4, 8, 23
SPEC = ShardSpec(seq_len=T, group_size=3, groups_per_file=2, hidden_size=H, dtype="bfloat16")
IDS = torch.randint(0, 500, (N, T), generator=torch.Generator().manual_seed(3))  # (N, T) int64


def reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(reader_module.THREAD_PREFIX)]


def hidden_of(ids: torch.Tensor) -> torch.Tensor:
    return ids.float()[..., None] + torch.arange(H) / 8  # (n, T, H) fp32, exact in bf16


def hidden_of_rows(rows: dict) -> torch.Tensor:
    return hidden_of(rows["input_ids"])


@pytest.fixture
def committed(run_layout):
    """Tokens and depth 1 of the train split, committed; returns (layout, tokens marker, depth-1 marker)."""
    commit_depth(run_layout, "train", None, write_token_shards(run_layout, "train", IDS, SPEC), "t", SPEC)
    infos = [transform_file(run_layout, "train", f, source_depth=None, depth=1, fn=hidden_of_rows, spec=SPEC)
             for f in range(SPEC.num_files(N))]
    commit_depth(run_layout, "train", 1, infos, "w", SPEC)
    return run_layout, load_committed(run_layout, "train", None, "t"), load_committed(run_layout, "train", 1, "w")


@pytest.mark.parametrize("world_size, rank, shuffle", [(1, 0, True), (2, 1, True), (3, 0, False)])
def test_batches_follow_block_order_exactly(committed, world_size, rank, shuffle):
    layout, _, marker = committed
    order = BlockOrder(N, SPEC.group_size, batch_size=4, seed=7, shuffle=shuffle, world_size=world_size, rank=rank)
    for epoch in (0, 1):
        batches = list(epoch_reader(layout, marker, order, epoch))
        expected = order.epoch_batches(epoch)
        assert [batch["block_id"].tolist() for batch in batches] == expected
        for batch, ids in zip(batches, expected):
            assert torch.equal(batch["input_ids"], IDS[ids])
            assert torch.equal(batch["hidden"], hidden_of(IDS[ids]).to(torch.bfloat16))
            assert batch["hidden"].shape == (len(ids), T, H)


def test_skip_batches_resumes_without_reading_skipped_groups(committed, monkeypatch):
    layout, _, marker = committed
    order = BlockOrder(N, SPEC.group_size, batch_size=4, seed=11)
    full = order.epoch_batches(0)
    reads: list[tuple[str, int]] = []
    original = reader_module.read_rows

    def counting(fs, path, group_in_file, *args, **kwargs):
        reads.append((path.rsplit("/", 1)[-1], group_in_file))
        return original(fs, path, group_in_file, *args, **kwargs)

    monkeypatch.setattr(reader_module, "read_rows", counting)
    resumed = list(epoch_reader(layout, marker, order, 0, skip_batches=2))
    assert [batch["block_id"].tolist() for batch in resumed] == full[2:]
    stream = [block for batch in full for block in batch]
    skipped_groups = {block // 3 for block in stream[:8]} - {block // 3 for block in stream[8:]}
    read_groups = {int(name[5:10]) * SPEC.groups_per_file + group for name, group in reads}
    assert skipped_groups and not skipped_groups & read_groups
    assert len(reads) == len(read_groups)  # every group read once
    assert list(epoch_reader(layout, marker, order, 0, skip_batches=len(full))) == []
    with pytest.raises(ValueError, match="skip_batches"):
        epoch_reader(layout, marker, order, 0, skip_batches=len(full) + 1)


def test_token_reader_and_sequential_evaluation(committed):
    layout, tokens_marker, marker = committed
    batches = list(sequential_reader(layout, tokens_marker, batch_size=5))
    assert [len(batch["block_id"]) for batch in batches] == [5, 5, 5, 5, 3] and "hidden" not in batches[0]
    assert torch.equal(torch.cat([batch["input_ids"] for batch in batches]), IDS)
    no_hidden = next(iter(sequential_reader(layout, marker, batch_size=2, with_hidden=False)))
    assert set(no_hidden) == {"block_id", "input_ids", "position_ids", "token_kind"}


def test_wait_time_is_tracked(committed, monkeypatch):
    """Reads slowed to 50 ms a group, consumed at once: the consumer's wait and the read time show it."""
    layout, _, marker = committed
    original = reader_module.read_rows

    def slow(*args, **kwargs):
        time.sleep(0.05)
        return original(*args, **kwargs)

    monkeypatch.setattr(reader_module, "read_rows", slow)
    reader = epoch_reader(layout, marker, BlockOrder(N, 3, 4, seed=0), 0, prefetch_groups=2)
    assert sum(1 for _ in reader) == len(reader)
    groups = reader.stats.groups_read
    assert groups > 1 and reader.stats.read_seconds >= 0.05 * groups
    assert reader.stats.wait_seconds >= 0.05  # at least the first group is waited for in full
    assert reader.stats.wait_share(reader.stats.wait_seconds * 2) == 0.5


def test_read_errors_reach_the_consumer_and_threads_stop(committed):
    layout, _, marker = committed
    layout.fs.pipe_file(layout.shard_file("train", 1, 1), b"not parquet at all")
    reader = sequential_reader(layout, marker, batch_size=4)
    with pytest.raises(StorageError, match="part-00001.parquet"):
        list(reader)
    assert not reader_threads()


def test_breaking_out_early_stops_the_prefetch_thread(committed):
    layout, _, marker = committed
    for batch in sequential_reader(layout, marker, batch_size=1, prefetch_groups=1):
        break
    assert not reader_threads()


def test_mismatched_order_is_rejected(committed):
    layout, _, marker = committed
    with pytest.raises(ValueError, match="groups of 4"):
        epoch_reader(layout, marker, BlockOrder(N, 4, 4, seed=0), 0)
    with pytest.raises(ValueError, match="only 23"):
        epoch_reader(layout, marker, BlockOrder(N + 1, 3, 4, seed=0), 0)


def test_footers_are_read_once_per_file_content(committed, monkeypatch):
    """Later epochs reuse each file's footer; a regenerated file (new sha256) is read afresh."""
    layout, _, marker = committed
    monkeypatch.setattr(reader_module, "FOOTERS", reader_module.FooterCache())
    reads: list[str] = []
    original = reader_module.read_footer

    def counting(fs, path):
        reads.append(path.rsplit("/", 1)[-1])
        return original(fs, path)

    monkeypatch.setattr(reader_module, "read_footer", counting)
    order = BlockOrder(N, SPEC.group_size, batch_size=4, seed=7)
    for epoch in (0, 1, 2):
        list(epoch_reader(layout, marker, order, epoch))
    assert sorted(reads) == [info.name for info in marker.files]

    double = lambda rows: 2 * hidden_of(rows["input_ids"])  # noqa: E731
    infos = [transform_file(layout, "train", f, source_depth=None, depth=1, fn=double, spec=SPEC)
             for f in range(SPEC.num_files(N))]
    commit_depth(layout, "train", 1, infos, "w2", SPEC)
    regenerated = load_committed(layout, "train", 1, "w2")
    batches = list(epoch_reader(layout, regenerated, order, 0))
    assert len(reads) == 2 * len(marker.files)
    assert torch.equal(batches[0]["hidden"], (2 * hidden_of(IDS[batches[0]["block_id"]])).to(torch.bfloat16))


def test_threaded_reader_yields_the_single_threaded_batches_for_every_seed_and_resume(committed, monkeypatch):
    """Four reading threads, three groups ahead, groups finishing in random order: for every seed, rank, epoch
    and resume position the batches are the single-threaded reader's, block for block and bit for bit, and both
    are BlockOrder's."""
    layout, _, marker = committed
    original, jitter = reader_module.read_rows, random.Random(0)

    def jittered(*args, **kwargs):  # reads finish out of submission order on the reading threads
        time.sleep(jitter.random() * 0.004)
        return original(*args, **kwargs)

    monkeypatch.setattr(reader_module, "read_rows", jittered)
    for seed in range(5):
        for world_size, rank in ((1, 0), (2, 1)):
            order = BlockOrder(N, SPEC.group_size, batch_size=4, seed=seed, world_size=world_size, rank=rank)
            for epoch in (0, 1):
                full = order.epoch_batches(epoch)
                for skip in range(len(full) + 1):
                    single = list(epoch_reader(layout, marker, order, epoch, skip, prefetch_groups=1, read_threads=1))
                    threaded = list(epoch_reader(layout, marker, order, epoch, skip, prefetch_groups=3, read_threads=4))
                    assert [batch["block_id"].tolist() for batch in threaded] == full[skip:]
                    assert [batch["block_id"].tolist() for batch in single] == full[skip:]
                    for one, many in zip(single, threaded):
                        assert one.keys() == many.keys()
                        for key in one:
                            assert torch.equal(one[key].view(torch.int16) if key == "hidden" else one[key],
                                               many[key].view(torch.int16) if key == "hidden" else many[key]), key
                        assert torch.equal(many["hidden"], hidden_of(IDS[many["block_id"]]).to(torch.bfloat16))
    assert not reader_threads()
