"""The shard writer: byte for byte what the pyarrow writer wrote before, its sha256 that of the stored bytes, groups
stored while the next is computed, S3 parts uploaded in parallel, and a writer killed mid-file leaves nothing a
reader accepts; on file:// and s3:// (moto's server)."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import segprop_ray.storage.shards as shards_module
from segprop_ray.core.blocks import TokenBlocks
from segprop_ray.storage.errors import StorageError
from segprop_ray.storage.fs import file_sha256
from segprop_ray.storage.parquet_plain import PlainFileEncoder
from segprop_ray.storage.shard_format import (DATA_PAGE_BYTES, ShardSpec, encode_hidden, encode_input_ids,
                                              encode_token_kind, shard_schema)
from segprop_ray.storage.shard_sinks import MIB, WriteOptions
from segprop_ray.storage.shards import ShardWriter, read_footer, write_token_shards
from segprop_ray.storage.snapcheck import commit_depth, inspect_committed, transform_file
from segprop_ray.storage.snapshot_resume import recorded_files

TESTS = Path(__file__).resolve().parent


def todays_bytes(spec: ShardSpec, kind: str, depth, groups: list[dict], page_bytes: int = DATA_PAGE_BYTES) -> bytes:
    """The file the pyarrow-based writer made before the plain layout (its code, to a memory buffer)."""
    schema = shard_schema(spec, kind, "train", depth, 0)
    row_bytes = spec.hidden_row_bytes if kind == "hidden" else spec.seq_len * 4
    sink, first = io.BytesIO(), 0
    with pq.ParquetWriter(sink, schema, compression=spec.compression, use_dictionary=False, write_statistics=False,
                          data_page_size=page_bytes, write_batch_size=max(1, page_bytes // row_bytes)) as writer:
        for group in groups:
            n = len(group["ids"])
            columns = {"block_id": pa.array(np.arange(first, first + n, dtype=np.int64)),
                       "input_ids": encode_input_ids(group["ids"], spec.seq_len),
                       "position_ids": encode_input_ids(group["positions"], spec.seq_len, "position_ids"),
                       "token_kind": encode_token_kind(group["kinds"], spec.seq_len)}
            if kind == "hidden":
                columns["hidden"] = encode_hidden(group["hidden"], spec)
            writer.write_table(pa.Table.from_pydict(columns, schema=schema), row_group_size=n)
            first += n
    return sink.getvalue()


def make_groups(spec: ShardSpec, sizes: list[int], kind: str, seed: int = 0) -> list[dict]:
    """Row groups of random packed blocks (ids, positions restarting mid-block, kinds) and float32 activations."""
    gen, groups = torch.Generator().manual_seed(seed), []
    for n in sizes:
        ids = torch.randint(0, 2**31 - 1, (n, spec.seq_len), generator=gen)  # (n, T) int64
        positions = torch.cat([torch.arange(spec.seq_len // 2), torch.arange(spec.seq_len - spec.seq_len // 2)])
        kinds = torch.randint(0, 3, (n, spec.seq_len), generator=gen).to(torch.uint8)  # (n, T)
        hidden = torch.randn(n, spec.seq_len, spec.hidden_size, generator=gen) if kind == "hidden" else None
        groups.append({"ids": ids, "positions": positions.expand(n, -1).clone(), "kinds": kinds, "hidden": hidden})
    return groups


def write_file(layout, spec, kind, depth, groups, page_bytes=DATA_PAGE_BYTES, options=None):
    path = layout.shard_file("train", depth, 0)
    with ShardWriter(layout.fs, path, spec, kind, "train", depth, 0, page_bytes, options) as writer:
        for group in groups:
            writer.write_group(group["ids"], group["hidden"], position_ids=group["positions"], token_kind=group["kinds"])
    return path, writer


CASES = {  # name: spec, kind, group sizes, data page bytes
    "bf16, short last group": (ShardSpec(16, 5, 3, 32), "hidden", [5, 5, 2], DATA_PAGE_BYTES),
    "fp32, a page per row": (ShardSpec(8, 4, 2, 16, "float32"), "hidden", [4, 3], 256),
    "bf16, pages of 3 rows": (ShardSpec(8, 7, 2, 16), "hidden", [7, 7], 600),
    "tokens, 20,000-row pages": (ShardSpec(2, 45_000, 1), "tokens", [45_000], DATA_PAGE_BYTES),
}


@pytest.mark.parametrize("case", list(CASES))
def test_files_equal_the_pyarrow_writers_and_record_the_sha256_of_the_stored_bytes(run_layout, case):
    spec, kind, sizes, page_bytes = CASES[case]
    groups = make_groups(spec, sizes, kind)
    depth = 3 if kind == "hidden" else None
    path, writer = write_file(run_layout, spec, kind, depth, groups, page_bytes)
    assert writer.engine == "plain"
    stored = run_layout.fs.cat_file(path)
    assert stored == todays_bytes(spec, kind, depth, groups, page_bytes)
    assert writer.info.sha256 == hashlib.sha256(stored).hexdigest() == file_sha256(run_layout.fs, path)
    assert writer.info.bytes == len(stored) == run_layout.fs.size(path) and writer.info.rows == sum(sizes)


def test_a_multipart_s3_upload_stores_the_same_bytes_and_sends_parts_in_parallel(s3_bucket, monkeypatch):
    """12 MiB in 5 MiB parts, up to 3 at once: parts overlap in time, the object is the pyarrow writer's file."""
    from segprop_ray.storage.layout import RunLayout

    layout = RunLayout.open(f"s3://{s3_bucket}/run")
    spec = ShardSpec(64, 16, 6, 1024)  # 128 KiB of bf16 per block, 2 MiB per group
    groups = make_groups(spec, [16] * 6, "hidden")
    calls, active, most = [], [0], [0]
    lock, real_call = threading.Lock(), layout.fs.call_s3

    def counted(method, *args, **kwargs):
        with lock:
            calls.append(method)
            active[0] += method == "upload_part"
            most[0] = max(most[0], active[0])
        try:
            if method == "upload_part":
                time.sleep(0.2)  # long enough for the next part to start meanwhile
            return real_call(method, *args, **kwargs)
        finally:
            with lock:
                active[0] -= method == "upload_part"

    monkeypatch.setattr(layout.fs, "call_s3", counted)
    path, writer = write_file(layout, spec, "hidden", 3, groups,
                              options=WriteOptions(upload_part_bytes=5 * MIB, upload_concurrency=3))
    monkeypatch.undo()
    assert calls.count("upload_part") == 3 and calls[-1] == "complete_multipart_upload" and most[0] >= 2
    stored = layout.fs.cat_file(path)
    assert stored == todays_bytes(spec, "hidden", 3, groups)
    assert writer.info.sha256 == hashlib.sha256(stored).hexdigest()


def test_the_pyarrow_writer_is_used_where_the_plain_layout_is_not_exact(tmp_path, monkeypatch):
    from segprop_ray.storage.layout import RunLayout

    layout = RunLayout.open(str(tmp_path / "run"))
    spec, kind, sizes, page_bytes = CASES["bf16, pages of 3 rows"]
    groups = make_groups(spec, sizes, kind)
    monkeypatch.setattr(shards_module, "matches_pyarrow", lambda: False)
    path, writer = write_file(layout, spec, kind, 3, groups, page_bytes)
    assert writer.engine == "arrow"
    assert Path(path).read_bytes() == todays_bytes(spec, kind, 3, groups, page_bytes)
    zstd = ShardSpec(16, 5, 3, 32, compression="zstd")
    assert ShardWriter(layout.fs, path, zstd, "hidden", "train", 3, 0).engine == "arrow"


def test_a_group_is_stored_while_the_next_one_is_computed(tmp_path, monkeypatch):
    """Group 0's pages are laid out and stored only once fn has started on group 1: the writer's threads work
    beside the forward (a writer that stored group 0 inside write_group would wait here in vain)."""
    from segprop_ray.storage.layout import RunLayout

    layout = RunLayout.open(str(tmp_path / "run"))
    spec = ShardSpec(8, 3, 2, 16)
    commit_depth(layout, "train", None, write_token_shards(layout, "train", torch.zeros(6, 8, dtype=torch.int64), spec),
                 "t", spec)
    computing_group_1, stored_after = threading.Event(), []
    real_group = PlainFileEncoder.group

    def group(self, columns, emit):
        if columns["block_id"][0] == 0:
            stored_after.append(computing_group_1.wait(timeout=20))
        return real_group(self, columns, emit)

    def fn(rows):
        if rows["block_id"][0] == 3:
            computing_group_1.set()
        return torch.ones(len(rows["input_ids"]), 8, 16)

    monkeypatch.setattr(PlainFileEncoder, "group", group)
    info = transform_file(layout, "train", 0, source_depth=None, depth=1, fn=fn, spec=spec)
    assert stored_after == [True] and info.rows == 6


KILLED_WRITER = """
import sys, time, torch
from segprop_ray.storage.layout import RunLayout
from segprop_ray.storage.shard_format import ShardSpec
from segprop_ray.storage.shard_sinks import MIB, WriteOptions
from segprop_ray.storage.snapcheck import transform_file
from segprop_ray.storage.snapshot_resume import record_written

uri, ready = sys.argv[1], sys.argv[2]
layout, spec = RunLayout.open(uri), ShardSpec(64, 48, 2, 1024)

def fn(rows):
    if rows["block_id"][0] > 0:  # group 1: group 0 is being stored meanwhile
        open(ready, "w").close()
        time.sleep(600)
    return (rows["input_ids"] % 97).float()[..., None].expand(-1, -1, 1024) / 7  # (n, T, H)

info = transform_file(layout, "train", 0, source_depth=None, depth=1, fn=fn, spec=spec,
                      options=WriteOptions(upload_part_bytes=5 * MIB, upload_concurrency=2))
record_written(layout, "train", 1, info, "weights-new")
"""


def test_a_writer_killed_mid_file_leaves_nothing_a_reader_accepts(run_layout, run_uri, tmp_path):
    """S[1] committed, then regenerated by a process killed (SIGKILL) once its first 6 MiB group reached storage:
    no marker, no per-file record, and the file left is no complete shard (local) or the old object (S3)."""
    spec = ShardSpec(64, 48, 2, 1024)
    ids = torch.randint(0, 1000, (96, 64), generator=torch.Generator().manual_seed(0))  # (N, T)
    commit_depth(run_layout, "train", None, write_token_shards(run_layout, "train", TokenBlocks.of_text(ids), spec),
                 "tokens", spec)
    old = transform_file(run_layout, "train", 0, source_depth=None, depth=1, spec=spec,
                         fn=lambda rows: torch.zeros(len(rows["input_ids"]), 64, 1024))
    commit_depth(run_layout, "train", 1, [old], "weights-old", spec)
    path, ready = run_layout.shard_file("train", 1, 0), tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, run_uri, str(ready)], env=env)
    try:
        wait_until(lambda: ready.exists() and group_stored(run_layout, path), process)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    marker, reason = inspect_committed(run_layout, "train", 1, None)
    assert marker is None and "no commit marker" in reason
    assert recorded_files(run_layout, "train", 1, "weights-new") == {}
    assert recorded_files(run_layout, "train", 1, "weights-old") == {}
    assert not run_layout.fs.exists(run_layout.written_dir("train", 1))
    if run_uri.startswith("s3://"):  # the unfinished upload is invisible: the old object is still there, unread
        assert run_layout.fs.cat_file(path) != b"" and run_layout.fs.size(path) == old.bytes
    else:
        assert 6 * MIB <= os.path.getsize(path) < old.bytes
        with pytest.raises(StorageError, match="unreadable shard"):
            read_footer(run_layout.fs, path)


def group_stored(layout, path: str) -> bool:
    """Whether group 0's 6 MiB reached storage: on local disk in the file, on S3 as an uploaded part."""
    if not path.startswith("/"):
        bucket, key = path.split("/", 1)
        client = boto3.client("s3")
        uploads = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        return any(client.list_parts(Bucket=bucket, Key=key, UploadId=u["UploadId"]).get("Parts") for u in uploads
                   if u["Key"] == key)
    return os.path.exists(path) and os.path.getsize(path) >= 6 * MIB


def wait_until(condition, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the writer exited early ({process.returncode})"
        assert time.monotonic() < deadline, "the writer never got to group 1"
        time.sleep(0.1)


def test_a_local_sink_starts_writeback_as_it_goes_and_stores_every_byte(tmp_path, monkeypatch):
    """Every WRITEBACK_BYTES written, the kernel is asked to start writing them out (so the fsync on close waits for
    the tail only); the file holds exactly the bytes given, and on Linux the call exists."""
    from segprop_ray.storage import shard_sinks

    if sys.platform.startswith("linux"):
        assert shard_sinks._SYNC_FILE_RANGE is not None
    calls = []
    monkeypatch.setattr(shard_sinks, "start_writeback", lambda fd, offset, length: calls.append((offset, length)))
    segment, step = os.urandom(shard_sinks.MIB), shard_sinks.WRITEBACK_BYTES
    sink = shard_sinks.LocalSink(str(tmp_path / "f.bin"))
    for _ in range(40):
        sink.write(segment)
    sink.close()
    total = 40 * shard_sinks.MIB
    assert calls == [(offset, step) for offset in range(0, total - step + 1, step)]
    assert (tmp_path / "f.bin").read_bytes() == segment * 40
