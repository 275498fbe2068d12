"""Per-file records of a depth being written: what a restarted snapshot job keeps and what it redoes."""

from __future__ import annotations

import pytest

from segprop_ray.storage.snapshot_resume import clear_written, is_intact, recorded_files, record_written
from test_storage_snapcheck import N, SPEC, commit_tokens, embed, tokens
from segprop_ray.storage.snapcheck import transform_file

DEPTH = 2


def finished_files(layout, split, depth, weights_hash):
    """What a restarted job keeps: recorded files (driver's check) whose content is intact (actors' check)."""
    return {index: info for index, info in recorded_files(layout, split, depth, weights_hash).items()
            if is_intact(layout, split, depth, info)}


@pytest.fixture
def written(run_layout):
    """Every file of S[2] written and recorded with weights hash "w"; returns their FileInfos."""
    commit_tokens(run_layout, tokens())
    infos = []
    for index in range(SPEC.num_files(N)):
        info = transform_file(run_layout, "train", index, source_depth=None, depth=DEPTH, fn=embed, spec=SPEC)
        record_written(run_layout, "train", DEPTH, info, "w")
        infos.append(info)
    return infos


def test_recorded_intact_files_are_kept(run_layout, written):
    assert len(written) == 3
    assert finished_files(run_layout, "train", DEPTH, "w") == dict(enumerate(written))


def test_other_weights_or_split_keep_nothing(run_layout, written):
    fs = run_layout.fs
    record = fs.cat_file(run_layout.written_record("train", DEPTH, 0))
    for split, depth in (("eval", DEPTH), ("train", DEPTH + 1)):  # a train depth-DEPTH record copied elsewhere
        fs.pipe_file(run_layout.written_record(split, depth, 0), record)
        fs.pipe_file(run_layout.shard_file(split, depth, 0), fs.cat_file(run_layout.shard_file("train", DEPTH, 0)))
    assert finished_files(run_layout, "train", DEPTH, "other") == {}
    assert finished_files(run_layout, "eval", DEPTH, "w") == {}
    assert finished_files(run_layout, "train", DEPTH + 1, "w") == {}


def test_damaged_or_missing_files_are_written_again(run_layout, written):
    fs = run_layout.fs
    first, second, third = (run_layout.shard_file("train", DEPTH, i) for i in range(3))
    data = bytearray(fs.cat_file(first))
    data[len(data) // 2] ^= 0xFF  # same size, other content
    fs.pipe_file(first, bytes(data))
    fs.pipe_file(second, fs.cat_file(second)[:-10])  # truncated
    fs.rm_file(third)
    assert set(recorded_files(run_layout, "train", DEPTH, "w")) == {0}  # the size check alone misses the flip
    assert not is_intact(run_layout, "train", DEPTH, written[0])
    assert finished_files(run_layout, "train", DEPTH, "w") == {}


def test_unfinished_file_without_record_is_not_kept(run_layout, written):
    fs = run_layout.fs
    fs.rm_file(run_layout.written_record("train", DEPTH, 1))  # killed between the file and its record
    fs.pipe_file(run_layout.written_record("train", DEPTH, 2), b"{not json")
    assert set(finished_files(run_layout, "train", DEPTH, "w")) == {0}


def test_record_under_another_name_is_ignored(run_layout, written):
    fs = run_layout.fs
    first = run_layout.written_record("train", DEPTH, 0)
    fs.pipe_file(run_layout.written_record("train", DEPTH, 7), fs.cat_file(first))  # file 0's record, named 7
    fs.rm_file(first)
    assert set(finished_files(run_layout, "train", DEPTH, "w")) == {1, 2}


def test_clear_removes_the_records_only(run_layout, written):
    clear_written(run_layout, "train", DEPTH)
    assert finished_files(run_layout, "train", DEPTH, "w") == {}
    assert all(run_layout.fs.exists(run_layout.shard_file("train", DEPTH, i)) for i in range(3))
