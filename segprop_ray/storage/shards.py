"""Writing shard files (format: :mod:`segprop_ray.storage.shard_format`) on any fsspec filesystem.

A :class:`ShardWriter` streams one file a row group at a time. Each group is handed to the writer's own
thread, which lays out its pages and passes them to the storage (:mod:`segprop_ray.storage.shard_sinks`)
while the caller computes the next group; the bytes are sha256-hashed on the way. Uncompressed shards
(the default) are laid out by :mod:`segprop_ray.storage.parquet_plain`, which writes pyarrow's exact bytes
straight from the tensors' memory; compressed ones by pyarrow. Token shards of a whole split are written
with :func:`write_token_shards`. The reading side lives in :mod:`segprop_ray.storage.shard_read` and is
re-exported here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from segprop_ray.core.blocks import TokenBlocks
from segprop_ray.storage.layout import RunLayout
from segprop_ray.storage.parquet_plain import PlainFileEncoder, matches_pyarrow, writer_options
from segprop_ray.storage.shard_format import (DATA_PAGE_BYTES, ShardSpec, check_hidden, hidden_values,
                                              input_ids_values, shard_schema, token_kind_values)
from segprop_ray.storage.shard_read import (ShardFooter, describe_shard, read_footer, read_row_group,  # noqa: F401
                                            read_token_shards)
from segprop_ray.storage.shard_sinks import HashedOutput, WriteOptions, OrderedWorker, open_sink

ENGINES = ("auto", "plain", "arrow")
"""``plain``: pages laid out here from the tensors' memory (uncompressed shards only); ``arrow``: pyarrow's
writer; ``auto``: ``plain`` where it is exact (see :func:`~segprop_ray.storage.parquet_plain.matches_pyarrow`)."""


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


class _ArrowEncoder:
    """The pyarrow layout of a shard file (compressed shards, or where the plain layout is not exact here)."""

    def __init__(self, schema: pa.Schema, options: dict[str, Any]) -> None:
        self.schema, self.options, self._writer = schema, options, None

    def start(self, emit: Any) -> None:
        """pyarrow writes the magic bytes itself."""
        self._writer = pq.ParquetWriter(_EmitFile(emit), self.schema, **self.options)

    def group(self, columns: dict[str, np.ndarray], emit: Any) -> None:
        """One row group through ``ParquetWriter.write_table``."""
        arrays = [pa.array(values) if field.name == "block_id" else
                  pa.FixedSizeBinaryArray.from_buffers(field.type, len(values), [None, pa.py_buffer(values)])
                  for field, values in zip(self.schema, columns.values())]
        self._writer.write_table(pa.Table.from_arrays(arrays, schema=self.schema), row_group_size=len(arrays[0]))

    def finish(self, emit: Any) -> None:
        """The footer."""
        self._writer.close()


class _EmitFile:
    """The write-only file object pyarrow writes into: every chunk goes to ``emit`` (copied unless immutable)."""

    closed = False

    def __init__(self, emit: Any) -> None:
        self.emit, self.position = emit, 0

    def write(self, data: Any) -> int:
        """Pass ``data`` on; returns its length."""
        chunk = data if isinstance(data, bytes) else bytes(memoryview(data).cast("B"))
        self.emit(chunk)
        self.position += len(chunk)
        return len(chunk)

    def tell(self) -> int:
        """Bytes written so far."""
        return self.position

    def flush(self) -> None:
        """Nothing buffered here."""

    def writable(self) -> bool:
        """Always True."""
        return True

    def close(self) -> None:
        """Mark closed (the sink is closed by :class:`ShardWriter`)."""
        self.closed = True


class ShardWriter:
    """Context manager writing one shard file, one row group of ``spec.group_size`` blocks per :meth:`write_group`.

    Block ids are implied by the file index (file ``f`` starts at block ``f * spec.rows_per_file``); only
    the split's last group may be short. Groups are written on the writer's thread while the caller goes on
    (at most ``options.groups_in_flight`` queued): tensors handed to :meth:`write_group` must not be changed
    afterwards. Rewriting a path overwrites it; on an error the partial file is discarded (an S3 multipart
    upload is aborted). :attr:`info` is the :class:`FileInfo` after a clean exit.
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, spec: ShardSpec, kind: str, split: str,
                 depth: int | None, file_index: int, data_page_bytes: int = DATA_PAGE_BYTES,
                 options: WriteOptions | None = None, engine: str = "auto") -> None:
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        self.fs, self.path, self.spec, self.kind, self.file_index = fs, path, spec, kind, file_index
        self.data_page_bytes, self.options = data_page_bytes, options or WriteOptions()
        self.schema = shard_schema(spec, kind, split, depth, file_index)
        self.engine = engine if engine != "auto" else "plain" if spec.compression == "none" and matches_pyarrow() \
            else "arrow"
        if self.engine == "plain" and spec.compression != "none":
            raise ValueError(f"the plain layout writes uncompressed shards only, not {spec.compression}")
        self.first_block = file_index * spec.rows_per_file
        self.rows = 0
        self.info: FileInfo | None = None
        self._finished = False

    def __enter__(self) -> "ShardWriter":
        row_bytes = self.spec.hidden_row_bytes if self.kind == "hidden" else self.spec.seq_len * 4
        self._sink = open_sink(self.fs, self.path, self.options)
        self._output = HashedOutput(self._sink)
        self._encoder = PlainFileEncoder(self.schema, self.data_page_bytes, row_bytes) if self.engine == "plain" \
            else _ArrowEncoder(self.schema, writer_options(self.data_page_bytes, row_bytes, self.spec.compression))
        self._thread = OrderedWorker(lambda job: job(), self.options.groups_in_flight, "segprop-shard-write")
        self._thread.put(lambda: self._encoder.start(self._output.write))
        return self

    def write_group(self, input_ids: torch.Tensor | np.ndarray, hidden: torch.Tensor | None = None,
                    block_ids: torch.Tensor | np.ndarray | None = None, position_ids: Any = None,
                    token_kind: Any = None) -> None:
        """Append one row group: ``input_ids`` (n, T), ``hidden`` (n, T, H) for snapshot shards, and the rows'
        ``position_ids`` and ``token_kind`` (n, T) (default: one text sequence per block, every token a target).
        Returns once the group is queued (blocks while ``groups_in_flight`` groups wait)."""
        n, seq_len = len(input_ids), self.spec.seq_len
        expected = np.arange(self.first_block + self.rows, self.first_block + self.rows + n, dtype=np.int64)
        self._check_group(n, hidden, block_ids, expected)
        if position_ids is None or token_kind is None:
            text = TokenBlocks.of_text(torch.as_tensor(np.asarray(input_ids)))
            position_ids = text.position_ids if position_ids is None else position_ids
            token_kind = text.token_kind if token_kind is None else token_kind
        columns: dict[str, Any] = {"block_id": expected.astype("<i8"), "input_ids": input_ids_values(input_ids, seq_len),
                                   "position_ids": input_ids_values(position_ids, seq_len, "position_ids"),
                                   "token_kind": token_kind_values(token_kind, seq_len)}
        if self.kind == "hidden":
            check_hidden(hidden, self.spec)
        self._thread.put(lambda: self._write(columns, hidden))
        self.rows += n
        self._finished = n < self.spec.group_size

    def _write(self, columns: dict[str, Any], hidden: torch.Tensor | None) -> None:
        """On the writer's thread: cast the activations to their storage bits, lay out and store the group."""
        if hidden is not None:
            columns["hidden"] = hidden_values(hidden, self.spec)  # (n, T, H) raw bits
        self._encoder.group(columns, self._output.write)

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
            self._thread.put(lambda: self._encoder.finish(self._output.write))
            self._thread.finish()
            self._sink.close()  # made durable (fsync, or the upload completed) while the hash catches up
            sha256 = self._output.finish()
        except BaseException:
            self._abort()
            raise
        self.info = FileInfo(self.path.rsplit("/", 1)[-1], self.rows, self._output.bytes_written, sha256,
                             self.first_block, self.first_block + self.rows - 1)

    def _abort(self) -> None:
        self._thread.finish(raise_error=False)
        self._output.abandon()
        self._sink.abort()


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

