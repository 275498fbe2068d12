"""Writing shard files (format: :mod:`segprop_ray.storage.shard_format`) on any fsspec filesystem.

A :class:`ShardWriter` streams one file a row group at a time and hashes what it writes as it goes;
token shards of a whole split are written with :func:`write_token_shards`. The reading side lives in
:mod:`segprop_ray.storage.shard_read` and is re-exported here.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from dataclasses import asdict, dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from segprop_ray.core.blocks import TokenBlocks
from segprop_ray.storage.fs import ensure_parent_dir, is_local
from segprop_ray.storage.layout import RunLayout
from segprop_ray.storage.shard_format import (DATA_PAGE_BYTES, ShardSpec, encode_hidden, encode_input_ids,
                                              encode_token_kind, shard_schema)
from segprop_ray.storage.shard_read import (ShardFooter, describe_shard, read_footer, read_row_group,  # noqa: F401
                                            read_token_shards)


@dataclass(frozen=True)
class FileInfo:
    """What a finished shard file holds: name, rows, size, sha256 and its block id range (inclusive)."""

    name: str
    rows: int
    bytes: int
    sha256: str
    first_block: int
    last_block: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (for commit markers)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FileInfo":
        """Inverse of :meth:`to_dict`."""
        return cls(**{key: data[key] for key in cls.__dataclass_fields__})


class _ChunkWorker:
    """Applies ``consume`` to queued chunks, in order, on its own thread (bounded queue)."""

    def __init__(self, consume: Any, depth: int, name: str) -> None:
        self._consume, self._queue, self.error = consume, queue.Queue(maxsize=depth), None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (chunk := self._queue.get()) is not None:
            if self.error is None:
                try:
                    self._consume(chunk)
                except BaseException as error:  # noqa: BLE001 - re-raised by finish()
                    self.error = error

    def put(self, chunk: bytes) -> None:
        """Queue ``chunk`` (blocks while the queue is full)."""
        self._queue.put(chunk)

    def finish(self) -> None:
        """Wait for the queued chunks; raise the first error."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if self.error is not None:
            raise self.error


class HashingFile:
    """A write-only file-like object that forwards bytes to ``file`` while counting and sha256-hashing them.

    Hashing and writing each run on a background thread (bounded queues of ``depth`` chunks), so they
    overlap with each other and with Parquet encoding in the caller's thread. pyarrow hands over
    immutable ``bytes``; other buffers are copied. :meth:`finish` drains both and re-raises any error.
    """

    def __init__(self, file: Any, depth: int = 2) -> None:
        self.file = file
        self.sha256 = hashlib.sha256()
        self.bytes_written = 0
        self.closed = False
        self._workers = (_ChunkWorker(self.sha256.update, depth, "segprop-shard-hash"),
                         _ChunkWorker(file.write, depth, "segprop-shard-write"))

    def write(self, data: Any) -> int:
        """Queue ``data`` for hashing and writing; returns its length."""
        for worker in self._workers:
            if worker.error is not None:
                raise worker.error
        chunk = data if isinstance(data, bytes) else bytes(memoryview(data).cast("B"))
        for worker in self._workers:
            worker.put(chunk)
        self.bytes_written += len(chunk)
        return len(chunk)

    def finish(self) -> None:
        """Wait until every queued byte is hashed and written; raise the first background error."""
        for worker in self._workers:
            worker.finish()

    def tell(self) -> int:
        """Bytes written so far (queued included)."""
        return self.bytes_written

    def flush(self) -> None:
        """Nothing to flush here: :meth:`finish` drains, the underlying file is closed by its owner."""

    def writable(self) -> bool:
        """Always True."""
        return True

    def close(self) -> None:
        """Mark closed (the underlying file is closed by :class:`ShardWriter` after :meth:`finish`)."""
        self.closed = True


class ShardWriter:
    """Context manager writing one shard file, one row group of ``spec.group_size`` blocks per :meth:`write_group`.

    Block ids are implied by the file index (file ``f`` starts at block ``f * spec.rows_per_file``); only
    the split's last group may be short. Rewriting a path overwrites it; on an error the partial file is
    discarded (an S3 multipart upload is aborted). :attr:`info` is the :class:`FileInfo` after a clean exit.
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, spec: ShardSpec, kind: str, split: str,
                 depth: int | None, file_index: int, data_page_bytes: int = DATA_PAGE_BYTES) -> None:
        self.fs, self.path, self.spec, self.kind, self.file_index = fs, path, spec, kind, file_index
        self.data_page_bytes = data_page_bytes
        self.schema = shard_schema(spec, kind, split, depth, file_index)
        self.first_block = file_index * spec.rows_per_file
        self.rows = 0
        self.info: FileInfo | None = None
        self._finished = False

    def __enter__(self) -> "ShardWriter":
        ensure_parent_dir(self.fs, self.path)
        self._file = self.fs.open(self.path, "wb")
        self._hashing = HashingFile(self._file)
        row_bytes = self.spec.hidden_row_bytes if self.kind == "hidden" else self.spec.seq_len * 4
        self._writer = pq.ParquetWriter(
            self._hashing, self.schema, compression=self.spec.compression, use_dictionary=False,
            write_statistics=False, data_page_size=self.data_page_bytes,
            write_batch_size=max(1, self.data_page_bytes // row_bytes))  # pages stay small even for huge groups
        return self

    def write_group(self, input_ids: torch.Tensor | np.ndarray, hidden: torch.Tensor | None = None,
                    block_ids: torch.Tensor | np.ndarray | None = None, position_ids: Any = None,
                    token_kind: Any = None) -> None:
        """Append one row group: ``input_ids`` (n, T), ``hidden`` (n, T, H) for snapshot shards, and the rows'
        ``position_ids`` and ``token_kind`` (n, T) (default: one text sequence per block, every token a target)."""
        n, seq_len = len(input_ids), self.spec.seq_len
        expected = np.arange(self.first_block + self.rows, self.first_block + self.rows + n, dtype=np.int64)
        self._check_group(n, hidden, block_ids, expected)
        if position_ids is None or token_kind is None:
            text = TokenBlocks.of_text(torch.as_tensor(np.asarray(input_ids)))
            position_ids = text.position_ids if position_ids is None else position_ids
            token_kind = text.token_kind if token_kind is None else token_kind
        columns = {"block_id": pa.array(expected), "input_ids": encode_input_ids(input_ids, seq_len),
                   "position_ids": encode_input_ids(position_ids, seq_len, "position_ids"),
                   "token_kind": encode_token_kind(token_kind, seq_len)}
        if self.kind == "hidden":
            columns["hidden"] = encode_hidden(hidden, self.spec)
        self._writer.write_table(pa.Table.from_pydict(columns, schema=self.schema), row_group_size=n)
        self.rows += n
        self._finished = n < self.spec.group_size

    def _check_group(self, n: int, hidden: Any, block_ids: Any, expected: np.ndarray) -> None:
        if self._finished or self.rows + n > self.spec.rows_per_file or not 0 < n <= self.spec.group_size:
            raise ValueError(f"{self.path}: a group of {n} rows after {self.rows} breaks the layout "
                             f"(groups of {self.spec.group_size}, {self.spec.groups_per_file} per file, "
                             f"only the last one short)")
        if (hidden is None) != (self.kind == "tokens") or (hidden is not None and len(hidden) != n):
            raise ValueError(f"{self.path}: hidden must be given for snapshot shards only, with {n} rows")
        if block_ids is not None and not np.array_equal(np.asarray(block_ids, dtype=np.int64), expected):
            raise ValueError(f"{self.path}: block ids {expected[0]}..{expected[-1]} expected at this position")

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
        if exc_type is not None:
            self._abort()
            return
        try:
            self._writer.close()
            self._hashing.finish()
            self._file.close()
            if is_local(self.fs):
                _fsync_local(self.path)
        except BaseException:
            self._abort()
            raise
        self.info = FileInfo(self.path.rsplit("/", 1)[-1], self.rows, self._hashing.bytes_written,
                             self._hashing.sha256.hexdigest(), self.first_block, self.first_block + self.rows - 1)

    def _abort(self) -> None:
        for step in (self._writer.close, self._hashing.finish, getattr(self._file, "discard", None),
                     self._file.close):
            try:
                if step is not None:
                    step()
            except Exception:  # noqa: BLE001 - best effort: the file is being thrown away
                pass
        if is_local(self.fs) and self.fs.exists(self.path):
            self.fs.rm_file(self.path)


def _fsync_local(path: str) -> None:
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def write_token_file(layout: RunLayout, split: str, file_index: int, blocks: TokenBlocks | torch.Tensor | np.ndarray,
                     spec: ShardSpec) -> FileInfo:
    """Write token shard ``file_index`` of ``split`` from its ``blocks`` (token blocks, or (n, T) ids of a text
    stream), group by group."""
    blocks = _token_blocks(blocks)
    path = layout.shard_file(split, None, file_index)
    with ShardWriter(layout.fs, path, spec, "tokens", split, None, file_index) as writer:
        for start in range(0, len(blocks), spec.group_size):
            rows = blocks.span(start, start + spec.group_size)  # (g, T) each
            writer.write_group(rows.input_ids, position_ids=rows.position_ids, token_kind=rows.token_kind)
    return writer.info


def write_token_shards(layout: RunLayout, split: str, blocks: TokenBlocks | torch.Tensor | np.ndarray,
                       spec: ShardSpec) -> list[FileInfo]:
    """Write all ``N`` blocks of ``split`` (token blocks, or (N, T) ids of a text stream) as token shard files
    (then commit them)."""
    blocks = _token_blocks(blocks)
    infos = []
    for file_index in range(spec.num_files(len(blocks))):
        span = spec.file_blocks(file_index, len(blocks))
        infos.append(write_token_file(layout, split, file_index, blocks.span(span.start, span.stop), spec))
    return infos


def _token_blocks(blocks: TokenBlocks | torch.Tensor | np.ndarray) -> TokenBlocks:
    if isinstance(blocks, TokenBlocks):
        return blocks
    return TokenBlocks.of_text(torch.as_tensor(np.asarray(blocks), dtype=torch.int64))

