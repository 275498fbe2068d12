"""Reading shard files (format: :mod:`segprop_ray.storage.shard_format`) on any fsspec filesystem.

:func:`read_footer` reads what a reader keeps per file; :func:`read_row_group` reads one row group with pyarrow as
torch tensors without holding the file open (any shard, compressed ones included; the readers use
:func:`~segprop_ray.storage.shard_rows.read_rows`, which reads the plain layout without copies in Python);
:func:`describe_shard` says what a file is from its footer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from segprop_ray.storage.documents import describe_path
from segprop_ray.storage.errors import StorageError, one_line
from segprop_ray.storage.fs import is_local, resolve_filesystem
from segprop_ray.storage.layout import RunLayout
from segprop_ray.core.blocks import TokenBlocks
from segprop_ray.storage.shard_format import (ROW_COLUMNS, ShardSpec, decode_hidden, decode_input_ids, decode_token_kind,
                                              parse_shard_metadata)


@dataclass(frozen=True)
class ShardFooter:
    """What a reader keeps of a shard file between row groups: Parquet footer, description, size."""

    metadata: pq.FileMetaData
    description: dict[str, Any]
    size: int

    @property
    def num_row_groups(self) -> int:
        """Row groups in the file."""
        return self.metadata.num_row_groups


def read_footer(fs: fsspec.AbstractFileSystem, path: str) -> ShardFooter:
    """A shard's Parquet footer, its checked ``segprop_ray.shard`` description and its size in bytes."""
    where = describe_path(fs, path)
    try:
        with fs.open(path, "rb") as file:
            metadata, size = pq.ParquetFile(file).metadata, file.size
    except FileNotFoundError:
        raise StorageError(f"{where}: shard file missing") from None
    except (OSError, pa.ArrowException) as error:
        raise StorageError(f"{where}: unreadable shard ({one_line(error)})") from None
    return ShardFooter(metadata, parse_shard_metadata(metadata.schema.to_arrow_schema(), where), size)


def read_row_group(fs: fsspec.AbstractFileSystem, path: str, group_in_file: int, spec: ShardSpec,
                   with_hidden: bool = True, footer: ShardFooter | None = None) -> dict[str, torch.Tensor]:
    """Row group ``group_in_file`` of a shard as ``{"block_id": (n,) int64, "input_ids": (n, T) int64,
    "position_ids": (n, T) int64, "token_kind": (n, T) uint8, "hidden": (n, T, H) bf16|fp32}`` (hidden only for
    snapshot shards and ``with_hidden``), sharing Arrow memory where it can.

    Nothing stays open between calls. Local files are read by pyarrow's native reader; elsewhere the row
    group's byte range is fetched in one ranged GET and decoded from memory. ``footer`` (from
    :func:`read_footer`) saves re-reading the footer.
    """
    footer = footer or read_footer(fs, path)
    names = set(footer.metadata.schema.names)
    columns = [c for c in ("block_id", *ROW_COLUMNS, "hidden") if c in names and (with_hidden or c != "hidden")]
    where = describe_path(fs, path)
    try:
        with _open_row_group(fs, path, group_in_file, footer) as source:
            table = pq.ParquetFile(source, metadata=footer.metadata).read_row_group(group_in_file, columns=columns)
    except FileNotFoundError:
        raise StorageError(f"{where}: shard file missing") from None
    except (OSError, pa.ArrowException) as error:
        raise StorageError(f"{where}: cannot read row group {group_in_file} ({one_line(error)})") from None
    return _table_to_tensors(table, spec)


def _open_row_group(fs: fsspec.AbstractFileSystem, path: str, group: int, footer: ShardFooter) -> Any:
    if is_local(fs):
        return pa.OSFile(path, "r")
    if not 0 <= group < footer.num_row_groups:
        raise OSError(f"row group {group} outside 0..{footer.num_row_groups - 1}")
    start, end = row_group_span(footer.metadata, group)
    return _ByteRangeFile(fs.cat_file(path, start=start, end=end), start, footer.size)


def row_group_span(metadata: pq.FileMetaData, group: int) -> tuple[int, int]:
    """``(start, end)`` byte offsets covering all column chunks of row group ``group``."""
    row_group = metadata.row_group(group)
    chunks = [row_group.column(i) for i in range(row_group.num_columns)]
    starts = [c.dictionary_page_offset if c.has_dictionary_page else c.data_page_offset for c in chunks]
    return min(starts), max(s + c.total_compressed_size for s, c in zip(starts, chunks))


class _ByteRangeFile:
    """A read-only file of ``size`` bytes of which only ``[start, start + len(data))`` is in memory.

    pyarrow reads a row group's column chunks through it (with the footer given separately), so a row
    group costs one ranged GET; reads outside the range are an error, never a silent refetch.
    """

    closed = False

    def __init__(self, data: bytes, start: int, size: int) -> None:
        self._data, self._start, self._size, self._position = memoryview(data), start, size, 0

    def __enter__(self) -> "_ByteRangeFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def seek(self, position: int, whence: int = 0) -> int:
        """Move to ``position`` (from start, current or end per ``whence``)."""
        self._position = position + (0, self._position, self._size)[whence]
        return self._position

    def tell(self) -> int:
        """The current position."""
        return self._position

    def read(self, nbytes: int = -1) -> memoryview:
        """``nbytes`` from the current position, without copying."""
        nbytes = self._size - self._position if nbytes < 0 else nbytes
        offset = self._position - self._start
        if offset < 0 or offset + nbytes > len(self._data):
            raise OSError(f"read of {nbytes} bytes at {self._position} outside the fetched row group")
        self._position += nbytes
        return self._data[offset : offset + nbytes]

    def readable(self) -> bool:
        """Always True."""
        return True

    def seekable(self) -> bool:
        """Always True."""
        return True

    def writable(self) -> bool:
        """Always False."""
        return False

    def close(self) -> None:
        """Release the buffer view."""
        self.closed = True


def _table_to_tensors(table: pa.Table, spec: ShardSpec) -> dict[str, torch.Tensor]:
    batch = {"block_id": torch.from_numpy(table["block_id"].to_numpy().astype(np.int64)),  # (n,) int64
             "input_ids": decode_input_ids(table["input_ids"], spec.seq_len),  # (n, T) int64
             "position_ids": decode_input_ids(table["position_ids"], spec.seq_len),  # (n, T) int64
             "token_kind": decode_token_kind(table["token_kind"], spec.seq_len)}  # (n, T) uint8
    if "hidden" in table.column_names:
        batch["hidden"] = decode_hidden(table["hidden"], spec)  # (n, T, H) bf16 | fp32
    return batch


def read_token_blocks(layout: RunLayout, split: str, spec: ShardSpec, num_blocks: int) -> TokenBlocks:
    """All ``num_blocks`` token blocks of ``split`` (ids, positions, token kinds), for small splits and tests."""
    groups = []
    for file_index in range(spec.num_files(num_blocks)):
        path = layout.shard_file(split, None, file_index)
        footer = read_footer(layout.fs, path)
        groups += [read_row_group(layout.fs, path, group, spec, footer=footer) for group in range(footer.num_row_groups)]
    if not groups:
        return TokenBlocks.of_text(torch.empty(0, spec.seq_len, dtype=torch.int64))
    return TokenBlocks(*(torch.cat([g[name] for g in groups]) for name in ROW_COLUMNS))  # (N, T) each


def read_token_shards(layout: RunLayout, split: str, spec: ShardSpec, num_blocks: int) -> torch.Tensor:
    """All ``num_blocks`` token ids of ``split`` as one (N, T) int64 tensor (for small splits and tests)."""
    return read_token_blocks(layout, split, spec, num_blocks).input_ids


def describe_shard(path: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a shard file is, from its footer alone: its ``segprop_ray.shard`` description plus
    ``num_rows``, ``num_row_groups``, ``rows_per_group`` and ``bytes`` (no segprop_ray state needed)."""
    fs, inner = resolve_filesystem(path, storage_options)
    footer = read_footer(fs, inner)
    metadata = footer.metadata
    rows_per_group = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
    return {**footer.description, "num_rows": metadata.num_rows, "num_row_groups": metadata.num_row_groups,
            "rows_per_group": rows_per_group, "bytes": footer.size}
