"""SnapCheck depths: streaming transforms, commit markers, validation, retention; on file:// and s3://."""

from __future__ import annotations

import logging

import pytest
import torch

from segprop_ray.storage.documents import read_json, write_json_atomic
from segprop_ray.storage.shard_format import ShardSpec
from segprop_ray.storage.shards import read_row_group, write_token_shards
from segprop_ray.storage.snapcheck import (apply_retention, commit_depth, committed_depths, delete_depth,
                                           inspect_committed, load_committed, transform_file)
from segprop_ray.storage.reader import sequential_reader

T, H, N = 8, 16, 14
SPEC = ShardSpec(seq_len=T, group_size=3, groups_per_file=2, hidden_size=H, dtype="bfloat16")
EMBED = torch.randn(64, H, generator=torch.Generator().manual_seed(0))


def embed(rows: dict) -> torch.Tensor:
    assert "hidden" not in rows
    return EMBED[rows["input_ids"] % 64]  # (n, T, H) fp32


def double(rows: dict) -> torch.Tensor:
    return rows["hidden"].float() * 2  # (n, T, H) fp32


def layer(rows: dict) -> torch.Tensor:
    return torch.tanh(rows["hidden"].float() * 1.5 + 0.25)  # (n, T, H) fp32


def tokens(n: int = N) -> torch.Tensor:
    return torch.randint(0, 1000, (n, T), generator=torch.Generator().manual_seed(1))  # (N, T) int64


def commit_tokens(layout, ids: torch.Tensor) -> None:
    commit_depth(layout, "train", None, write_token_shards(layout, "train", ids, SPEC), "tokens-v1", SPEC)


def make_depth(layout, depth: int, fn, source_depth: int | None, weights_hash: str = "w") -> list:
    infos = [transform_file(layout, "train", index, source_depth=source_depth, depth=depth, fn=fn, spec=SPEC)
             for index in range(SPEC.num_files(N))]
    commit_depth(layout, "train", depth, infos, weights_hash, SPEC)
    return infos


def read_all_hidden(layout, depth: int) -> torch.Tensor:
    marker = load_committed(layout, "train", depth, None)
    return torch.cat([batch["hidden"] for batch in sequential_reader(layout, marker, batch_size=5)])  # (N, T, H)


def test_identity_and_double_transforms_match(run_layout):
    ids = tokens()
    commit_tokens(run_layout, ids)
    make_depth(run_layout, 2, embed, None)
    make_depth(run_layout, 3, lambda rows: rows["hidden"], 2)
    make_depth(run_layout, 4, double, 3)
    first = read_all_hidden(run_layout, 2)
    assert torch.equal(first, EMBED[ids % 64].to(torch.bfloat16))
    assert torch.equal(read_all_hidden(run_layout, 3).view(torch.int16), first.view(torch.int16))
    assert torch.equal(read_all_hidden(run_layout, 4), (first.float() * 2).to(torch.bfloat16))


def test_streaming_chain_equals_applying_the_functions_in_memory(run_layout):
    ids = tokens()
    commit_tokens(run_layout, ids)
    make_depth(run_layout, 5, embed, None)
    make_depth(run_layout, 6, layer, 5)
    make_depth(run_layout, 7, layer, 6)
    expected = embed({"input_ids": ids}).to(torch.bfloat16)  # (N, T, H) bf16, what each depth stores
    for depth in (6, 7):
        expected = layer({"input_ids": ids, "hidden": expected}).to(torch.bfloat16)
        assert torch.equal(read_all_hidden(run_layout, depth).view(torch.int16), expected.view(torch.int16))


def test_marker_content_and_valid_load(run_layout):
    commit_tokens(run_layout, tokens())
    infos = make_depth(run_layout, 2, embed, None, weights_hash="abc123")
    marker = load_committed(run_layout, "train", 2, "abc123", expected_rows=N, spec=SPEC, verify_checksums=True)
    assert marker is not None and marker.files == tuple(infos) and marker.total_rows == N
    raw = read_json(run_layout.fs, run_layout.commit_marker("train", 2))
    assert raw["format_version"] == 1 and raw["depth"] == 2 and raw["dtype"] == "bfloat16"
    assert raw["seq_len"] == T and raw["hidden_size"] == H and raw["weights_hash"] == "abc123"
    assert [f["rows"] for f in raw["files"]] == [6, 6, 2] and all(len(f["sha256"]) == 64 for f in raw["files"])
    assert load_committed(run_layout, "train", None, "tokens-v1", expected_rows=N) is not None


@pytest.mark.parametrize("damage, reason", [
    ("no_marker", "no commit marker"),
    ("weights", "written from weights"),
    ("rows", "expected 15"),
    ("truncate", "truncated or rewritten"),
    ("missing_file", "part-00001.parquet missing"),
    ("newer_marker", "format 2 > 1: upgrade"),
    ("older_marker", "format 0 < 1"),
    ("garbage_marker", "not a valid JSON document"),
    ("malformed_marker", "malformed commit marker"),
    ("wrong_depth", "expected 'train' depth 2"),
    ("spec", "written with"),
])
def test_doubtful_depths_are_regenerated_not_read(run_layout, damage, reason, caplog):
    commit_tokens(run_layout, tokens())
    make_depth(run_layout, 2, embed, None, weights_hash="good")
    fs, marker_path = run_layout.fs, run_layout.commit_marker("train", 2)
    part = run_layout.shard_file("train", 2, 1)
    body = read_json(fs, marker_path)
    expected_rows, spec, weights = N, SPEC, "good"
    if damage == "no_marker":
        fs.rm_file(marker_path)
    elif damage == "weights":
        weights = "other"
    elif damage == "rows":
        expected_rows = 15
    elif damage == "truncate":
        fs.pipe_file(part, fs.cat_file(part)[:-100])
    elif damage == "missing_file":
        fs.rm_file(part)
    elif damage in ("newer_marker", "older_marker"):
        write_json_atomic(fs, marker_path, {**body, "format_version": 2 if damage == "newer_marker" else 0})
    elif damage == "garbage_marker":
        fs.pipe_file(marker_path, b"{not json")
    elif damage == "malformed_marker":
        write_json_atomic(fs, marker_path, {key: value for key, value in body.items() if key != "files"})
    elif damage == "wrong_depth":
        write_json_atomic(fs, marker_path, {**body, "depth": 9})
    elif damage == "spec":
        spec = ShardSpec(seq_len=T, group_size=3, groups_per_file=2, hidden_size=H, dtype="float32")
    with caplog.at_level(logging.WARNING, logger="segprop_ray.storage.snapcheck"):
        assert load_committed(run_layout, "train", 2, weights, expected_rows, spec) is None
    assert reason in caplog.text and "regenerate" in caplog.text


def test_same_size_corruption_is_caught_by_checksums(run_layout):
    commit_tokens(run_layout, tokens())
    make_depth(run_layout, 2, embed, None)
    part = run_layout.shard_file("train", 2, 0)
    data = bytearray(run_layout.fs.cat_file(part))
    data[len(data) // 2] ^= 0xFF
    run_layout.fs.pipe_file(part, bytes(data))
    assert load_committed(run_layout, "train", 2, "w") is not None  # sizes alone cannot see it
    marker, reason = inspect_committed(run_layout, "train", 2, "w", verify_checksums=True)
    assert marker is None and "sha256" in reason


def test_regenerating_a_depth_drops_its_marker_first(run_layout):
    commit_tokens(run_layout, tokens())
    make_depth(run_layout, 2, embed, None)

    def failing(rows):
        raise RuntimeError("worker died")

    with pytest.raises(RuntimeError, match="worker died"):
        transform_file(run_layout, "train", 0, source_depth=None, depth=2, fn=failing, spec=SPEC)
    assert not run_layout.fs.exists(run_layout.commit_marker("train", 2))
    assert load_committed(run_layout, "train", 2, "w") is None


def test_delete_removes_marker_before_files(run_layout, monkeypatch):
    commit_tokens(run_layout, tokens())
    make_depth(run_layout, 2, embed, None)
    fs = run_layout.fs

    def broken_rm(*args, **kwargs):
        raise OSError("storage went away mid-delete")

    monkeypatch.setattr(fs, "rm", broken_rm)
    with pytest.raises(OSError):
        delete_depth(run_layout, "train", 2)
    monkeypatch.undo()
    assert load_committed(run_layout, "train", 2, "w") is None  # never seen as committed again
    delete_depth(run_layout, "train", 2)
    assert not fs.exists(run_layout.shard_dir("train", 2))


def test_retention_keeps_newest_committed_and_the_depth_being_read(run_layout):
    commit_tokens(run_layout, tokens())
    make_depth(run_layout, 1, embed, None)
    for depth in (2, 3, 4):
        make_depth(run_layout, depth, layer, depth - 1)
    transform_file(run_layout, "train", 0, source_depth=4, depth=5, fn=layer, spec=SPEC)  # in progress
    assert apply_retention(run_layout, "train", keep=2, protect=[1]) == [2]
    assert committed_depths(run_layout, "train") == [1, 3, 4]
    assert run_layout.fs.exists(run_layout.shard_file("train", 5, 0))
    assert apply_retention(run_layout, "train", keep=2) == [1]
    assert apply_retention(run_layout, "train", keep=5) == []


def test_next_row_group_is_read_while_the_current_one_is_computed(run_layout, monkeypatch):
    import threading

    import segprop_ray.storage.snapcheck as snapcheck_module

    commit_tokens(run_layout, tokens())
    second_read = threading.Event()
    original = snapcheck_module.read_rows

    def reading(fs, path, group, *args, **kwargs):
        if group == 1:
            second_read.set()
        return original(fs, path, group, *args, **kwargs)

    overlapped = []

    def slow_embed(rows):
        if not overlapped:
            overlapped.append(second_read.wait(timeout=10))  # group 1's read starts before group 0 is done
        return embed(rows)

    monkeypatch.setattr(snapcheck_module, "read_rows", reading)
    info = transform_file(run_layout, "train", 0, source_depth=None, depth=2, fn=slow_embed, spec=SPEC)
    assert overlapped == [True] and info.rows == SPEC.rows_per_file
    for group in range(SPEC.groups_per_file):  # and every group was computed from its own rows
        rows = read_row_group(run_layout.fs, run_layout.shard_file("train", 2, 0), group, SPEC)
        assert torch.equal(rows["hidden"], embed({"input_ids": rows["input_ids"]}).to(torch.bfloat16))
