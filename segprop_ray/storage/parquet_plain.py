"""Shard files in the plain layout, written and read without copying the column values.

The shard format (:mod:`segprop_ray.storage.shard_format`) stores every column non-nullable, PLAIN,
uncompressed: a data page is a Thrift page header followed by the raw values, nothing else (no
definition or repetition levels). So a page can be written straight from the tensor's memory and a row
read straight into its destination. This module makes exactly the bytes that pyarrow's ``ParquetWriter``
makes with the format's settings (same pages, same headers, same footer; the footer's schema, key-value
metadata, ``created_by`` and column orders are taken from pyarrow's own empty file of the same schema).
:func:`matches_pyarrow` checks that on this installation once per process; where it does not hold (or for
compressed shards) the writer uses pyarrow itself.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from segprop_ray.storage import thrift_compact as tc

MAGIC = b"PAR1"
MAX_ROWS_PER_PAGE = 20_000
"""pyarrow's default ``max_rows_per_page``: a page never holds more rows."""
DATA_PAGE, PLAIN, RLE, UNCOMPRESSED = 0, 0, 3, 0
PHYSICAL_TYPES = {"block_id": 2, "input_ids": 7, "position_ids": 7, "token_kind": 7, "hidden": 7}
"""Parquet physical type per column: INT64 for ``block_id``, FIXED_LEN_BYTE_ARRAY for the rest."""
Segment = bytes | memoryview
Emit = Callable[[Segment], None]


def writer_options(data_page_bytes: int, row_bytes: int, compression: str = "none") -> dict:
    """The ``pq.ParquetWriter`` settings of the shard format (pages stay small even for huge rows)."""
    return {"compression": compression, "use_dictionary": False, "write_statistics": False,
            "data_page_size": data_page_bytes, "write_batch_size": max(1, data_page_bytes // row_bytes)}


def page_rows(num_rows: int, width: int, batch: int, page_bytes: int, max_rows: int = MAX_ROWS_PER_PAGE) -> list[int]:
    """Rows of each data page of a column chunk, as pyarrow cuts them: values go in batches of ``batch``
    (clipped at ``max_rows`` per page), and a page is closed after a batch once it holds ``page_bytes``."""
    pages, rows, done = [], 0, 0
    while done < num_rows:
        take = min(batch, num_rows - done, max_rows - rows)
        rows, done = rows + take, done + take
        if rows * width >= page_bytes or rows >= max_rows:
            pages.append(rows)
            rows = 0
    return pages + [rows] if rows else pages


def page_header(num_values: int, body_bytes: int) -> bytes:
    """The Thrift header of a PLAIN, uncompressed v1 data page without levels or statistics."""
    data_page = [(1, tc.I32, num_values), (2, tc.I32, PLAIN), (3, tc.I32, RLE), (4, tc.I32, RLE), (5, tc.STRUCT, [])]
    return tc.encode_struct([(1, tc.I32, DATA_PAGE), (2, tc.I32, body_bytes), (3, tc.I32, body_bytes),
                             (5, tc.STRUCT, data_page)])


class PlainFileEncoder:
    """The bytes of one shard file in the plain layout, row group by row group, handed to ``emit`` as
    segments: small headers, and views of the callers' arrays for the values (never copied here)."""

    def __init__(self, schema: pa.Schema, data_page_bytes: int, row_bytes: int) -> None:
        self.schema, self.page_bytes = schema, data_page_bytes
        self.batch = max(1, data_page_bytes // row_bytes)
        self.position, self.num_rows = 0, 0
        self.row_groups: list[list[tc.Field]] = []

    def start(self, emit: Emit) -> None:
        """The file's leading magic bytes."""
        self._emit(emit, MAGIC)

    def group(self, columns: dict[str, np.ndarray], emit: Emit) -> None:
        """One row group: ``columns`` in schema order, each a C-contiguous (n, ...) array of its raw values."""
        start, chunks, total = self.position, [], 0
        num_rows = len(next(iter(columns.values())))
        for name, values in columns.items():
            meta, size = self._column_chunk(name, values, emit)
            chunks.append([(2, tc.I64, 0), (3, tc.STRUCT, meta)])
            total += size
        self.row_groups.append([(1, tc.LIST, tc.ThriftList(tc.STRUCT, chunks)), (2, tc.I64, total),
                                (3, tc.I64, num_rows), (5, tc.I64, start), (6, tc.I64, total)])
        self.num_rows += num_rows

    def _column_chunk(self, name: str, values: np.ndarray, emit: Emit) -> tuple[list[tc.Field], int]:
        flat = memoryview(values).cast("B")  # (n * width,) the values' own bytes
        width = len(flat) // len(values)
        start, row = self.position, 0
        pages = page_rows(len(values), width, self.batch, self.page_bytes)
        for rows in pages:
            body = flat[row * width : (row + rows) * width]
            self._emit(emit, page_header(rows, len(body)))
            self._emit(emit, body)
            row += rows
        size = self.position - start
        stats = [(1, tc.I32, DATA_PAGE), (2, tc.I32, PLAIN), (3, tc.I32, len(pages))]
        meta = [(1, tc.I32, PHYSICAL_TYPES[name]), (2, tc.LIST, tc.ThriftList(tc.I32, [RLE, PLAIN])),
                (3, tc.LIST, tc.ThriftList(tc.BINARY, [name.encode()])), (4, tc.I32, UNCOMPRESSED),
                (5, tc.I64, len(values)), (6, tc.I64, size), (7, tc.I64, size), (9, tc.I64, start),
                (13, tc.LIST, tc.ThriftList(tc.STRUCT, [stats]))]
        return meta, size

    def finish(self, emit: Emit) -> None:
        """The footer: pyarrow's own metadata of this schema with these row groups, its length, the magic."""
        template = _empty_file_footer(self.schema)
        fields = [(3, tc.I64, self.num_rows) if fid == 3 else
                  (4, tc.LIST, tc.ThriftList(tc.STRUCT, self.row_groups)) if fid == 4 else (fid, kind, value)
                  for fid, kind, value in template]
        footer = tc.encode_struct(fields)
        self._emit(emit, footer + struct.pack("<i", len(footer)) + MAGIC)

    def _emit(self, emit: Emit, segment: Segment) -> None:
        emit(segment)
        self.position += len(segment)


def _empty_file_footer(schema: pa.Schema) -> list[tc.Field]:
    """The decoded footer of the empty file pyarrow writes for ``schema`` (no row groups)."""
    sink = pa.BufferOutputStream()
    pq.ParquetWriter(sink, schema, **writer_options(1 << 20, 1)).close()
    data = sink.getvalue().to_pybytes()
    size = struct.unpack("<i", data[-8:-4])[0]
    fields, _ = tc.decode_struct(data, len(data) - 8 - size)
    return fields


@dataclass(frozen=True)
class Page:
    """A data page of a column chunk: where its values start in the file, and how many rows it holds."""

    body_offset: int
    rows: int


def parse_page(data: bytes | memoryview, base: int, offset: int, width: int) -> Page:
    """The page whose header is at file ``offset``, in ``data`` (which starts at file offset ``base``)."""
    header, end = tc.decode_struct(data, offset - base)
    return Page(base + end, check_page_header(header, width))


def parse_pages(data: bytes | memoryview, base: int, chunk_offset: int, chunk_bytes: int, width: int) -> list[Page]:
    """The pages of a plain column chunk whose bytes ``[chunk_offset, chunk_offset + chunk_bytes)`` are in
    ``data`` (which starts at file offset ``base``); ValueError for anything but PLAIN uncompressed v1 pages
    of ``width``-byte values."""
    pages, offset = [], chunk_offset
    while offset < chunk_offset + chunk_bytes:
        pages.append(parse_page(data, base, offset, width))
        offset = pages[-1].body_offset + pages[-1].rows * width
    if offset != chunk_offset + chunk_bytes:
        raise ValueError(f"column chunk at {chunk_offset} ends at {offset}, footer says {chunk_offset + chunk_bytes}")
    return pages


def check_page_header(header: list[tc.Field], width: int) -> int:
    """The row count of a decoded page header of the plain layout (ValueError for any other page)."""
    data_page = tc.field_value(header, 5) or []
    rows = tc.field_value(data_page, 1, -1)
    sizes = (tc.field_value(header, 2), tc.field_value(header, 3))
    if tc.field_value(header, 1) != DATA_PAGE or tc.field_value(data_page, 2) != PLAIN or \
            sizes != (rows * width, rows * width) or rows < 1:
        raise ValueError(f"not a plain page of {width}-byte values: {header}")
    return rows


@functools.cache
def matches_pyarrow() -> bool:
    """Whether :class:`PlainFileEncoder` writes exactly pyarrow's bytes here (checked once per process on small
    files of both kinds whose pages split by bytes, by the row limit and at group ends)."""
    from segprop_ray.storage.shard_format import ShardSpec, shard_schema

    cases = [(ShardSpec(8, 3, 2, 16), "hidden", 600, [3, 2]), (ShardSpec(8, 3, 2, 16), "hidden", 256, [3, 3]),
             (ShardSpec(1, 45_000, 1, 1), "hidden", 14_001, [45_000]), (ShardSpec(4, 5, 2), "tokens", 40, [5, 1])]
    for spec, kind, page_bytes, groups in cases:
        schema = shard_schema(spec, kind, "train", 1 if kind == "hidden" else None, 0)
        row_bytes = spec.hidden_row_bytes if kind == "hidden" else spec.seq_len * 4
        if _plain_bytes(schema, groups, page_bytes, row_bytes) != _pyarrow_bytes(schema, groups, page_bytes, row_bytes):
            return False
    return True


def _probe_columns(schema: pa.Schema, rows: int, start: int) -> dict[str, np.ndarray]:
    columns = {}
    for field in schema:
        width = 8 if field.name == "block_id" else field.type.byte_width
        values = (np.arange(rows * width, dtype=np.int64) * 7 + start) % 251
        columns[field.name] = np.arange(start, start + rows, dtype="<i8") if field.name == "block_id" else \
            values.astype(np.uint8).reshape(rows, width)
    return columns


def _plain_bytes(schema: pa.Schema, groups: list[int], page_bytes: int, row_bytes: int) -> bytes:
    out = bytearray()
    encoder = PlainFileEncoder(schema, page_bytes, row_bytes)
    encoder.start(out.extend)
    for index, rows in enumerate(groups):
        encoder.group(_probe_columns(schema, rows, index * 1000), out.extend)
    encoder.finish(out.extend)
    return bytes(out)


def _pyarrow_bytes(schema: pa.Schema, groups: list[int], page_bytes: int, row_bytes: int) -> bytes:
    sink = pa.BufferOutputStream()
    with pq.ParquetWriter(sink, schema, **writer_options(page_bytes, row_bytes)) as writer:
        for index, rows in enumerate(groups):
            arrays = [pa.array(values) if field.name == "block_id" else
                      pa.FixedSizeBinaryArray.from_buffers(field.type, rows, [None, pa.py_buffer(values)])
                      for field, values in zip(schema, _probe_columns(schema, rows, index * 1000).values())]
            writer.write_table(pa.Table.from_arrays(arrays, schema=schema), row_group_size=rows)
    return sink.getvalue().to_pybytes()
