"""Reading rows of a shard's row group straight into the tensors they end up in.

Shards in the plain layout (uncompressed, PLAIN pages: :mod:`segprop_ray.storage.parquet_plain`) keep every
block's activations as one contiguous run of bytes in the file. :func:`read_rows` reads the row group's page
headers, then each wanted block's bytes with ``os.preadv`` straight into its slot of the output tensor, in
the order asked for (a training epoch's shuffled order included), into page-locked memory with
``pin_memory``: one copy from the page cache, none in Python, and the GIL released throughout, so several
threads read several groups at once. On object stores the row group is one ranged GET, copied row by row into
place. Other shards (compressed) are decoded by pyarrow (:func:`~segprop_ray.storage.shard_read.read_row_group`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow.parquet as pq
import torch

from segprop_ray.storage.documents import describe_path
from segprop_ray.storage.errors import StorageError, one_line
from segprop_ray.storage.fs import is_local
from segprop_ray.storage.parquet_plain import Page, parse_page, parse_pages
from segprop_ray.storage.shard_format import HIDDEN_DTYPES, KIND_DTYPE, TOKEN_DTYPE, ShardSpec
from segprop_ray.storage.shard_read import ShardFooter, read_row_group, row_group_span

HEADER_BYTES = 256
"""Bytes read at a page header's offset: a plain page header is under 40."""
Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class _Chunk:
    """A column chunk of a row group: name, file offset, bytes, value width."""

    name: str
    offset: int
    size: int
    width: int


def plain_chunks(metadata: pq.FileMetaData, group: int, spec: ShardSpec) -> list[_Chunk] | None:
    """The column chunks of row group ``group`` if all are uncompressed PLAIN without dictionary, else None."""
    row_group, chunks = metadata.row_group(group), []
    for index in range(row_group.num_columns):
        column = row_group.column(index)
        if column.compression != "UNCOMPRESSED" or column.has_dictionary_page or "PLAIN" not in column.encodings:
            return None
        chunks.append(_Chunk(column.path_in_schema, column.data_page_offset, column.total_compressed_size,
                             _width(column.path_in_schema, spec)))
    return chunks


def _width(name: str, spec: ShardSpec) -> int:
    return {"block_id": 8, "input_ids": spec.seq_len * TOKEN_DTYPE.itemsize, "token_kind": spec.seq_len,
            "position_ids": spec.seq_len * TOKEN_DTYPE.itemsize, "hidden": spec.hidden_row_bytes}[name]


def read_rows(fs: fsspec.AbstractFileSystem, path: str, group_in_file: int, spec: ShardSpec, footer: ShardFooter,
              rows: Sequence[int] | None = None, with_hidden: bool = True, pin_memory: bool = False) -> Batch:
    """Rows ``rows`` (indices within the group, in the order wanted; None: all, in order) of a row group, as
    :func:`~segprop_ray.storage.shard_read.read_row_group`'s dict (hidden only with ``with_hidden``), its
    tensors fresh and, with ``pin_memory`` (CUDA only), page-locked."""
    if not 0 <= group_in_file < footer.num_row_groups:
        raise StorageError(f"{describe_path(fs, path)}: no row group {group_in_file}")
    count = footer.metadata.row_group(group_in_file).num_rows
    wanted = list(range(count)) if rows is None else list(rows)
    if any(not 0 <= row < count for row in wanted):
        raise ValueError(f"rows outside 0..{count - 1} of row group {group_in_file}")
    pin_memory = pin_memory and torch.cuda.is_available()
    chunks = plain_chunks(footer.metadata, group_in_file, spec)
    if chunks is None:
        return _take(read_row_group(fs, path, group_in_file, spec, with_hidden, footer), wanted, pin_memory)
    chunks = [chunk for chunk in chunks if with_hidden or chunk.name != "hidden"]
    try:
        if is_local(fs):
            return _read_local(path, chunks, wanted, spec, pin_memory)
        return _read_remote(fs, path, footer, group_in_file, chunks, wanted, spec, pin_memory)
    except FileNotFoundError:
        raise StorageError(f"{describe_path(fs, path)}: shard file missing") from None
    except (OSError, ValueError, IndexError) as error:
        raise StorageError(f"{describe_path(fs, path)}: cannot read row group {group_in_file} "
                           f"({one_line(error)})") from None


def _read_local(path: str, chunks: list[_Chunk], rows: list[int], spec: ShardSpec, pin: bool) -> Batch:
    """Small columns with one pread (plus the first activation page's header), activations row by row."""
    handle = os.open(path, os.O_RDONLY)
    try:
        small = [chunk for chunk in chunks if chunk.name != "hidden"]
        hidden = next((chunk for chunk in chunks if chunk.name == "hidden"), None)
        start = small[0].offset
        end = hidden.offset + min(HEADER_BYTES, hidden.size) if hidden else small[-1].offset + small[-1].size
        head = _pread(handle, end - start, start)
        out = {chunk.name: _small_column(head, start, chunk, rows, spec, pin) for chunk in small}
        if hidden is not None:
            pages = _local_pages(handle, head, start, hidden)
            out["hidden"] = _hidden_tensor(len(rows), spec, pin)
            _pread_rows(handle, pages, rows, hidden.width, _bytes_view(out["hidden"]))
        return out
    finally:
        os.close(handle)


def _read_remote(fs: fsspec.AbstractFileSystem, path: str, footer: ShardFooter, group: int, chunks: list[_Chunk],
                 rows: list[int], spec: ShardSpec, pin: bool) -> Batch:
    """One ranged GET of the row group's columns, then every row copied into place."""
    start, _ = row_group_span(footer.metadata, group)
    end = chunks[-1].offset + chunks[-1].size  # without the activations when they are not wanted
    data = memoryview(fs.cat_file(path, start=start, end=end))
    out = {}
    for chunk in chunks:
        if chunk.name != "hidden":
            out[chunk.name] = _small_column(data, start, chunk, rows, spec, pin)
            continue
        pages = parse_pages(data, start, chunk.offset, chunk.size, chunk.width)
        out["hidden"] = _hidden_tensor(len(rows), spec, pin)
        target = _bytes_view(out["hidden"])
        for slot, row in enumerate(rows):
            offset = _row_offset(pages, row, chunk.width) - start
            target[slot * chunk.width : (slot + 1) * chunk.width] = data[offset : offset + chunk.width]
    return out


def _small_column(data: bytes | memoryview, base: int, chunk: _Chunk, rows: list[int], spec: ShardSpec,
                  pin: bool) -> torch.Tensor:
    """A token column (or ``block_id``) of the chunk held in ``data`` (from file offset ``base``), rows picked."""
    pages = parse_pages(data, base, chunk.offset, chunk.size, chunk.width)
    parts = [np.frombuffer(data, np.uint8, page.rows * chunk.width, page.body_offset - base) for page in pages]
    values = (parts[0] if len(parts) == 1 else np.concatenate(parts)).reshape(-1, chunk.width)[rows]  # (b, width)
    if chunk.name == "block_id":
        tensor = torch.from_numpy(values.view("<i8").reshape(-1).copy())  # (b,) int64
    elif chunk.name == "token_kind":
        tensor = torch.from_numpy(values.view(KIND_DTYPE).reshape(-1, spec.seq_len))  # (b, T) uint8
    else:
        tensor = torch.from_numpy(values.view(TOKEN_DTYPE).reshape(-1, spec.seq_len).astype(np.int64))  # (b, T) int64
    return tensor.pin_memory() if pin else tensor


def _local_pages(handle: int, head: bytes, base: int, chunk: _Chunk) -> list[Page]:
    """The activation chunk's pages: each header read where it is (the first one is already in ``head``)."""
    pages, offset = [], chunk.offset
    while offset < chunk.offset + chunk.size:
        if offset + HEADER_BYTES <= base + len(head) or offset < base + len(head) == chunk.offset + chunk.size:
            pages.append(parse_page(head, base, offset, chunk.width))
        else:
            pages.append(parse_page(os.pread(handle, HEADER_BYTES, offset), offset, offset, chunk.width))
        offset = pages[-1].body_offset + pages[-1].rows * chunk.width
    if offset != chunk.offset + chunk.size:
        raise ValueError(f"activation chunk ends at {offset}, footer says {chunk.offset + chunk.size}")
    return pages


def _row_offset(pages: list[Page], row: int, width: int) -> int:
    """File offset of row ``row``'s values in a chunk of ``pages``."""
    for page in pages:
        if row < page.rows:
            return page.body_offset + row * width
        row -= page.rows
    raise ValueError(f"row {row} beyond the chunk's pages")


def _pread_rows(handle: int, pages: list[Page], rows: list[int], width: int, target: memoryview) -> None:
    """Each row's bytes into its slot of ``target``; runs of rows adjacent in the file and in ``target`` are read
    with one call."""
    slot = 0
    while slot < len(rows):
        offset, run = _row_offset(pages, rows[slot], width), 1
        while slot + run < len(rows) and _row_offset(pages, rows[slot + run], width) == offset + run * width:
            run += 1
        _pread_into(handle, target[slot * width : (slot + run) * width], offset)
        slot += run


def _pread(handle: int, size: int, offset: int) -> bytes:
    data = os.pread(handle, size, offset)
    if len(data) != size:
        raise OSError(f"read {len(data)} of {size} bytes at {offset} (file truncated?)")
    return data


def _pread_into(handle: int, view: memoryview, offset: int) -> None:
    while len(view):
        got = os.preadv(handle, [view], offset)
        if got <= 0:
            raise OSError(f"unexpected end of file at {offset}")
        view, offset = view[got:], offset + got


def _hidden_tensor(rows: int, spec: ShardSpec, pin: bool) -> torch.Tensor:
    """An uninitialised (rows, T, H) tensor of the shard's dtype (page-locked with ``pin``)."""
    torch_dtype = HIDDEN_DTYPES[spec.dtype][0]
    return torch.empty((rows, spec.seq_len, spec.hidden_size), dtype=torch_dtype, pin_memory=pin)


def _bytes_view(tensor: torch.Tensor) -> memoryview:
    """A writable flat byte view of a contiguous CPU tensor."""
    return memoryview(tensor.view(torch.uint8).numpy()).cast("B")  # (numel * itemsize,) bytes


def _take(batch: Batch, rows: list[int], pin: bool) -> Batch:
    """Rows of a decoded row group (a fresh copy, page-locked with ``pin``)."""
    index = torch.tensor(rows, dtype=torch.int64)  # (b,)
    out = {}
    for key, value in batch.items():
        target = torch.empty((len(rows), *value.shape[1:]), dtype=value.dtype, pin_memory=pin)
        out[key] = torch.index_select(value, 0, index, out=target)  # (b, ...)
    return out
