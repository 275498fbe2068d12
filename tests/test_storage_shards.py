"""Shard files: bit-exact round trips, self-description, geometry, streaming writes; on file:// and s3://."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from segprop_ray.storage.shard_format import ShardSpec
from segprop_ray.core.blocks import TokenBlocks
from segprop_ray.storage.shard_read import read_token_blocks
from segprop_ray.storage.shards import (ShardWriter, describe_shard, read_footer, read_row_group,
                                        read_token_shards, write_token_shards)

T, H = 8, 16
SPEC = ShardSpec(seq_len=T, group_size=3, groups_per_file=2, hidden_size=H, dtype="bfloat16")


def special_bf16(n: int, seed: int = 0) -> torch.Tensor:
    """(n, T, H) bf16 with every kind of bit pattern: random bits (NaN payloads, subnormals), +-inf, -0."""
    gen = torch.Generator().manual_seed(seed)
    bits = torch.randint(-(2**15), 2**15, (n, T, H), generator=gen, dtype=torch.int32).to(torch.int16)
    specials = torch.tensor([0x7F80, -0x0080, -0x8000, 0x7FC1, -0x0001, 0x0001, 0x7F81], dtype=torch.int16)
    bits.view(-1)[: len(specials)] = specials  # +inf, -inf, -0, NaN payloads, subnormal
    return bits.view(torch.bfloat16)  # (n, T, H) bf16


def token_ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 2**31 - 1, (n, T), generator=torch.Generator().manual_seed(seed))  # (n, T) int64


def write_hidden_file(layout, spec, hidden, ids, depth=3, file_index=0):
    path = layout.shard_file("train", depth, file_index)
    with ShardWriter(layout.fs, path, spec, "hidden", "train", depth, file_index) as writer:
        for start in range(0, len(ids), spec.group_size):
            writer.write_group(ids[start : start + spec.group_size], hidden[start : start + spec.group_size])
    return path, writer.info


def test_bf16_round_trip_is_bit_exact(run_layout):
    hidden, ids = special_bf16(6), token_ids(6)
    path, info = write_hidden_file(run_layout, SPEC, hidden, ids)
    for group in range(2):
        rows = read_row_group(run_layout.fs, path, group, SPEC)
        part = slice(3 * group, 3 * group + 3)
        assert rows["hidden"].dtype == torch.bfloat16 and rows["hidden"].shape == (3, T, H)
        assert torch.equal(rows["hidden"].view(torch.int16), hidden[part].view(torch.int16))
        assert rows["input_ids"].dtype == torch.int64 and torch.equal(rows["input_ids"], ids[part])
        assert rows["block_id"].tolist() == list(range(3 * group, 3 * group + 3))
    assert info.rows == 6 and (info.first_block, info.last_block) == (0, 5)


def test_fp32_round_trip_is_bit_exact_and_casts_are_applied(run_layout):
    spec = ShardSpec(seq_len=T, group_size=3, groups_per_file=2, hidden_size=H, dtype="float32")
    bits = torch.randint(-(2**31), 2**31 - 1, (3, T, H), dtype=torch.int64).to(torch.int32)
    path, _ = write_hidden_file(run_layout, spec, bits.view(torch.float32), token_ids(3))
    rows = read_row_group(run_layout.fs, path, 0, spec)
    assert rows["hidden"].dtype == torch.float32 and torch.equal(rows["hidden"].view(torch.int32), bits)
    values = torch.randn(3, T, H, dtype=torch.float64)
    path, _ = write_hidden_file(run_layout, SPEC, values, token_ids(3), depth=4)
    assert torch.equal(read_row_group(run_layout.fs, path, 0, SPEC)["hidden"], values.to(torch.bfloat16))


def test_file_info_matches_the_bytes_on_storage(run_layout):
    path, info = write_hidden_file(run_layout, SPEC, special_bf16(5), token_ids(5))
    data = run_layout.fs.cat_file(path)
    assert info.bytes == len(data) == run_layout.fs.size(path)
    assert info.sha256 == hashlib.sha256(data).hexdigest() and info.name == "part-00000.parquet"


def test_shard_describes_itself_to_a_plain_reader(run_layout, tmp_path):
    hidden, ids = special_bf16(4), token_ids(4)
    path, _ = write_hidden_file(run_layout, SPEC, hidden, ids, depth=5, file_index=0)
    description = describe_shard(run_layout.uri(path))
    assert description["kind"] == "hidden" and description["depth"] == 5 and description["split"] == "train"
    assert description["columns"]["hidden"]["shape"] == [T, H] and description["dtype"] == "bfloat16"
    assert description["rows_per_group"] == [3, 1] and description["format_version"] == 2
    assert description["columns"]["token_kind"] == {"dtype": "uint8", "shape": [T], "encoding": description[
        "columns"]["token_kind"]["encoding"]} and description["columns"]["position_ids"]["dtype"] == "int32"
    local = tmp_path / "copy.parquet"
    local.write_bytes(run_layout.fs.cat_file(path))
    table = pq.read_table(local)  # plain pyarrow from here on
    meta = json.loads(table.schema.metadata[b"segprop_ray.shard"])
    shape = meta["columns"]["hidden"]["shape"]
    bits = np.frombuffer(table["hidden"].combine_chunks().buffers()[1], "<i2").reshape(-1, *shape)
    assert np.array_equal(bits, hidden.view(torch.int16).numpy())
    row_group = pq.ParquetFile(local).metadata.row_group(0)
    assert row_group.num_rows == 3 and row_group.column(2).compression == "UNCOMPRESSED"
    assert table.schema.field("input_ids").metadata[b"dtype"] == b"int32"
    kinds = np.frombuffer(table["token_kind"].combine_chunks().buffers()[1], "u1").reshape(-1, T)
    positions = np.frombuffer(table["position_ids"].combine_chunks().buffers()[1], "<i4").reshape(-1, T)
    assert (kinds == 2).all() and (positions == np.arange(T)).all()  # written as text blocks: one sequence, all targets


def test_geometry_is_enforced_by_the_writer(run_layout):
    path = run_layout.shard_file("train", 1, 1)
    with pytest.raises(ValueError, match="breaks the layout"):
        with ShardWriter(run_layout.fs, path, SPEC, "hidden", "train", 1, 1) as writer:
            writer.write_group(token_ids(2), special_bf16(2))  # short group ...
            writer.write_group(token_ids(3), special_bf16(3))  # ... must be the last
    with pytest.raises(ValueError, match="block ids 6..8"):
        with ShardWriter(run_layout.fs, path, SPEC, "hidden", "train", 1, 1) as writer:
            writer.write_group(token_ids(3), special_bf16(3), block_ids=np.arange(3))
    assert not run_layout.fs.exists(path)  # aborted writes leave nothing


def test_rewriting_a_file_overwrites_it(run_layout):
    write_hidden_file(run_layout, SPEC, special_bf16(6, seed=1), token_ids(6))
    path, info = write_hidden_file(run_layout, SPEC, special_bf16(6, seed=2), token_ids(6))
    assert run_layout.fs.size(path) == info.bytes
    assert len([p for p in run_layout.fs.ls(run_layout.shard_dir("train", 3)) if "part-" in str(p)]) == 1
    expected = special_bf16(6, seed=2)[:3].view(torch.int16)
    assert torch.equal(read_row_group(run_layout.fs, path, 0, SPEC)["hidden"].view(torch.int16), expected)


def test_token_shards_round_trip(run_layout):
    ids = token_ids(14)
    infos = write_token_shards(run_layout, "eval", ids, SPEC)
    assert [info.name for info in infos] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert [info.rows for info in infos] == [6, 6, 2]
    assert torch.equal(read_token_shards(run_layout, "eval", SPEC, 14), ids)
    footer = read_footer(run_layout.fs, run_layout.shard_file("eval", None, 2))
    assert footer.description["kind"] == "tokens" and footer.num_row_groups == 1
    rows = read_row_group(run_layout.fs, run_layout.shard_file("eval", None, 1), 1, SPEC)
    assert set(rows) == {"block_id", "input_ids", "position_ids", "token_kind"}
    assert rows["block_id"].tolist() == [9, 10, 11]


def test_block_id_arithmetic():
    spec = ShardSpec(seq_len=4, group_size=5, groups_per_file=3)
    assert spec.locate(0) == (0, 0, 0) and spec.locate(14) == (0, 2, 4) and spec.locate(31) == (2, 0, 1)
    assert spec.num_files(31) == 3 and spec.file_blocks(2, 31) == range(30, 31)
    assert ShardSpec.for_snapcheck(2048, 4096, "bf16").group_size == 4


def test_a_failing_storage_write_surfaces_and_leaves_no_file(tmp_path, monkeypatch):
    """A write that fails on the writer's thread (disk full after 1000 bytes) is raised in the caller, and the
    partial file is removed."""
    from segprop_ray.storage.layout import RunLayout
    from segprop_ray.storage.shard_sinks import LocalSink

    layout = RunLayout.open(str(tmp_path / "run"))
    real_write, written = LocalSink.write, [0]

    def failing(self, segment):
        written[0] += len(segment)
        if written[0] > 1000:
            raise OSError("disk full")
        return real_write(self, segment)

    monkeypatch.setattr(LocalSink, "write", failing)
    with pytest.raises(OSError, match="disk full"):
        write_hidden_file(layout, SPEC, special_bf16(6), token_ids(6))
    monkeypatch.undo()
    assert written[0] > 1000 and not layout.fs.exists(layout.shard_file("train", 3, 0))


def test_packed_token_blocks_round_trip_with_positions_and_kinds(run_layout):
    """Per-example columns (positions restarting at 0, token kinds) come back exactly as written."""
    ids = token_ids(14)
    positions = torch.cat([torch.arange(3), torch.arange(T - 3)]).expand(14, T).clone()  # two examples per block
    kinds = torch.randint(0, 3, (14, T), generator=torch.Generator().manual_seed(3)).to(torch.uint8)
    write_token_shards(run_layout, "train", TokenBlocks(ids, positions, kinds), SPEC)
    back = read_token_blocks(run_layout, "train", SPEC, 14)
    assert torch.equal(back.input_ids, ids) and torch.equal(back.position_ids, positions)
    assert back.token_kind.dtype == torch.uint8 and torch.equal(back.token_kind, kinds)
