"""The SnapCheck shard format: Parquet files a plain pyarrow reader understands without segprop_ray or Ray.

One row per block of ``seq_len`` tokens; columns (all non-nullable):

- ``block_id``  int64: the block's index in its split (0..N-1).
- ``input_ids`` fixed_size_binary(seq_len * 4): the block's token ids, raw little-endian int32, row-major.
- ``position_ids`` fixed_size_binary(seq_len * 4): each token's position within its own example (restarting
  at 0 where a packed example starts), raw little-endian int32.
- ``token_kind`` fixed_size_binary(seq_len): one byte per token, 0 padding, 1 context (no loss), 2 target
  (carries loss); see :mod:`segprop_ray.core.blocks`. Written once by the tokenize job and carried unchanged
  into every snapshot depth, so no stage recomputes where examples start or which tokens are labels.
- ``hidden``    fixed_size_binary(seq_len * hidden_size * itemsize), snapshot shards only: the [seq_len,
  hidden_size] activations after layer ``depth``, raw row-major; ``bfloat16`` is stored as its 16 bits
  (little-endian 2-byte values, bit-exact: NaN payloads, infinities and -0 survive), ``float32`` as 4 bytes.

One fixed-size binary value per block reads at close to raw-copy speed, where Arrow's nested
fixed-shape-tensor type reads several times slower (see BENCHMARKS.md, "SnapCheck shard I/O").

Files are written with compression ``none`` by default, no dictionary, no statistics, data pages of
about 8 MiB (at least one block; below glibc's 32 MiB mmap threshold, so page buffers are reused rather
than page-faulted afresh: faster writes than 64 MiB pages, see BENCHMARKS.md), and row groups of exactly
``group_size`` rows (the last one of a split may be short): row group
``g`` of file ``f`` holds block ids ``[(f * groups_per_file + g) * group_size, ... + group_size)``, so a
block id's file, row group and row are arithmetic (:meth:`ShardSpec.locate`).

The Arrow schema metadata key ``segprop_ray.shard`` holds a JSON description (format name and version,
kind ``tokens``/``hidden``, split, depth, seq_len, hidden_size, dtype, group geometry, and per column its
dtype, shape per row and encoding); each field also carries its own ``dtype``/``shape``/``encoding``
metadata. Decoding by hand::

    table = pyarrow.parquet.read_table(path)
    hidden = numpy.frombuffer(table["hidden"].chunk(0).buffers()[1], "<u2").reshape(-1, seq_len, hidden_size)
    torch.from_numpy(hidden.view(numpy.int16)).view(torch.bfloat16)      # (n, T, H) bf16
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from segprop_ray.storage.documents import WRITTEN_BY, DocumentFormat
from segprop_ray.storage.errors import StorageError

SHARD_FORMAT = DocumentFormat("segprop_ray.shard", 2)
METADATA_KEY = b"segprop_ray.shard"
KINDS = ("tokens", "hidden")
DATA_PAGE_BYTES = 8 << 20
# dtype name -> (torch dtype, numpy carrier of its bits, bytes per value)
HIDDEN_DTYPES: dict[str, tuple[torch.dtype, np.dtype, int]] = {
    "bfloat16": (torch.bfloat16, np.dtype("<i2"), 2),
    "float32": (torch.float32, np.dtype("<f4"), 4),
}
DTYPE_ALIASES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp32": "float32", "float32": "float32"}
TOKEN_DTYPE = np.dtype("<i4")
KIND_DTYPE = np.dtype("u1")
ROW_COLUMNS = ("input_ids", "position_ids", "token_kind")
"""The per-token columns every shard holds (before ``hidden``)."""


@dataclass(frozen=True)
class ShardSpec:
    """Geometry and encoding shared by a split's token shards and all its snapshot depths."""

    seq_len: int
    group_size: int
    groups_per_file: int
    hidden_size: int = 0
    dtype: str = "bfloat16"
    compression: str = "none"

    def __post_init__(self) -> None:
        if min(self.seq_len, self.group_size, self.groups_per_file) < 1 or self.hidden_size < 0:
            raise ValueError(f"invalid shard geometry {self}")
        if self.dtype not in HIDDEN_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(HIDDEN_DTYPES)}, got {self.dtype!r}")

    @classmethod
    def for_snapcheck(cls, seq_len: int, hidden_size: int, dtype: str = "bf16", rows_per_group: int | None = None,
                      groups_per_file: int = 4, compression: str = "none") -> "ShardSpec":
        """The spec from SnapCheckConfig's values (``rows_per_group=None``: about 64 MiB of activations per group)."""
        from segprop_ray.core.data_order import default_group_size

        name = DTYPE_ALIASES[dtype]
        group_size = rows_per_group or default_group_size(seq_len, hidden_size, HIDDEN_DTYPES[name][2])
        return cls(seq_len, group_size, groups_per_file, hidden_size, name, compression)

    @property
    def rows_per_file(self) -> int:
        """Blocks per full file."""
        return self.group_size * self.groups_per_file

    @property
    def hidden_row_bytes(self) -> int:
        """Bytes of one block's activations."""
        return self.seq_len * self.hidden_size * HIDDEN_DTYPES[self.dtype][2]

    def num_files(self, num_blocks: int) -> int:
        """Files holding ``num_blocks`` blocks."""
        return -(-num_blocks // self.rows_per_file)

    def file_blocks(self, file_index: int, num_blocks: int) -> range:
        """Block ids stored in file ``file_index``."""
        start = file_index * self.rows_per_file
        return range(start, min(start + self.rows_per_file, num_blocks))

    def locate(self, block_id: int) -> tuple[int, int, int]:
        """``(file index, row group in file, row in group)`` of ``block_id``."""
        group, row = divmod(block_id, self.group_size)
        file_index, group_in_file = divmod(group, self.groups_per_file)
        return file_index, group_in_file, row

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able copy (for markers and metadata)."""
        return asdict(self)


def shard_schema(spec: ShardSpec, kind: str, split: str, depth: int | None, file_index: int) -> pa.Schema:
    """The self-describing Arrow schema of one shard file."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    columns = _column_descriptions(spec, kind)
    fields = [pa.field(name, _arrow_type(spec, name), nullable=False,
                       metadata={k: json.dumps(v) if not isinstance(v, str) else v for k, v in info.items()})
              for name, info in columns.items()]
    description = {"format": SHARD_FORMAT.name, "format_version": SHARD_FORMAT.version, "written_by": WRITTEN_BY,
                   "kind": kind, "split": split, "depth": depth, "file_index": file_index, **spec.to_dict(),
                   "columns": columns}
    return pa.schema(fields, metadata={METADATA_KEY: json.dumps(description).encode()})


def _column_descriptions(spec: ShardSpec, kind: str) -> dict[str, dict[str, Any]]:
    int32 = "one fixed_size_binary value per block: raw little-endian int32, row-major"
    columns: dict[str, dict[str, Any]] = {
        "block_id": {"dtype": "int64", "shape": [], "encoding": "plain int64"},
        "input_ids": {"dtype": "int32", "shape": [spec.seq_len], "encoding": int32},
        "position_ids": {"dtype": "int32", "shape": [spec.seq_len], "encoding": int32},
        "token_kind": {"dtype": "uint8", "shape": [spec.seq_len],
                       "encoding": "one fixed_size_binary value per block: one byte per token, 0 pad, 1 context, "
                                   "2 target"},
    }
    if kind == "hidden":
        itemsize = HIDDEN_DTYPES[spec.dtype][2]
        columns["hidden"] = {"dtype": spec.dtype, "shape": [spec.seq_len, spec.hidden_size],
                             "encoding": f"one fixed_size_binary value per block: raw little-endian {spec.dtype} "
                                         f"({itemsize} bytes per value, bf16 as its 16 bits), row-major"}
    return columns


def _arrow_type(spec: ShardSpec, column: str) -> pa.DataType:
    if column == "block_id":
        return pa.int64()
    if column in ("input_ids", "position_ids"):
        return pa.binary(spec.seq_len * TOKEN_DTYPE.itemsize)
    if column == "token_kind":
        return pa.binary(spec.seq_len * KIND_DTYPE.itemsize)
    return pa.binary(spec.hidden_row_bytes)


def parse_shard_metadata(schema: pa.Schema, where: str) -> dict[str, Any]:
    """The ``segprop_ray.shard`` description of a shard's schema, checked for format and version."""
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise StorageError(f"{where}: not a segprop_ray shard (no {METADATA_KEY.decode()} schema metadata)")
    description = json.loads(raw)
    body = SHARD_FORMAT.unwrap(description, where)
    return {"format": SHARD_FORMAT.name, "format_version": SHARD_FORMAT.version, **body}


def input_ids_values(input_ids: torch.Tensor | np.ndarray, seq_len: int, name: str = "input_ids") -> np.ndarray:
    """(n, T) integers (token ids or positions) checked and as a C-contiguous (n, T) little-endian int32 array."""
    ids = _as_numpy(input_ids)
    if ids.ndim != 2 or ids.shape[1] != seq_len:
        raise ValueError(f"{name} must be (n, {seq_len}), got {tuple(ids.shape)}")
    if ids.size and (ids.min() < np.iinfo(np.int32).min or ids.max() > np.iinfo(np.int32).max):
        raise ValueError(f"{name} do not fit in int32")
    return np.ascontiguousarray(ids, dtype=TOKEN_DTYPE)  # (n, T) int32


def encode_input_ids(input_ids: torch.Tensor | np.ndarray, seq_len: int, name: str = "input_ids"
                     ) -> pa.FixedSizeBinaryArray:
    """(n, T) integers (token ids or positions) -> one fixed_size_binary(T*4) value per block (int32 little-endian)."""
    ids32 = input_ids_values(input_ids, seq_len, name)  # (n, T) int32
    return _fixed_binary(ids32, ids32.shape[0], seq_len * TOKEN_DTYPE.itemsize)


def token_kind_values(kinds: torch.Tensor | np.ndarray, seq_len: int) -> np.ndarray:
    """(n, T) token kinds (0, 1, 2) checked and as a C-contiguous (n, T) uint8 array."""
    values = _as_numpy(kinds)
    if values.ndim != 2 or values.shape[1] != seq_len:
        raise ValueError(f"token_kind must be (n, {seq_len}), got {tuple(values.shape)}")
    if values.size and (values.min() < 0 or values.max() > 2):
        raise ValueError("token_kind values must be 0 (pad), 1 (context) or 2 (target)")
    return np.ascontiguousarray(values, dtype=KIND_DTYPE)  # (n, T) uint8


def encode_token_kind(kinds: torch.Tensor | np.ndarray, seq_len: int) -> pa.FixedSizeBinaryArray:
    """(n, T) token kinds (0, 1, 2) -> one fixed_size_binary(T) value per block."""
    packed = token_kind_values(kinds, seq_len)  # (n, T) uint8
    return _fixed_binary(packed, packed.shape[0], seq_len)


def _as_numpy(values: torch.Tensor | np.ndarray) -> np.ndarray:
    return values.cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)


def check_hidden(hidden: torch.Tensor, spec: ShardSpec) -> None:
    """ValueError unless ``hidden`` is (n, T, H) for ``spec``."""
    expected = (spec.seq_len, spec.hidden_size)
    if hidden.dim() != 3 or tuple(hidden.shape[1:]) != expected:
        raise ValueError(f"hidden must be (n, {expected[0]}, {expected[1]}), got {tuple(hidden.shape)}")


def hidden_values(hidden: torch.Tensor, spec: ShardSpec) -> np.ndarray:
    """(n, T, H) float activations cast to ``spec.dtype``, as a C-contiguous array of their raw bits (no copy
    when they already are a contiguous CPU tensor of that dtype)."""
    check_hidden(hidden, spec)
    torch_dtype, carrier, _ = HIDDEN_DTYPES[spec.dtype]
    cast = hidden.detach().to(device="cpu", dtype=torch_dtype).contiguous()  # (n, T, H) bf16 | fp32
    return cast.view(torch.int16).numpy() if torch_dtype == torch.bfloat16 else cast.numpy()  # (n, T, H) i2 | f4


def encode_hidden(hidden: torch.Tensor, spec: ShardSpec) -> pa.FixedSizeBinaryArray:
    """(n, T, H) float activations -> cast to ``spec.dtype`` -> one fixed_size_binary value per block (raw bits)."""
    bits = hidden_values(hidden, spec)  # (n, T, H) i2 | f4
    return _fixed_binary(bits, bits.shape[0], spec.hidden_row_bytes)


def _fixed_binary(array: np.ndarray, rows: int, row_bytes: int) -> pa.FixedSizeBinaryArray:
    """Wrap a contiguous array's bytes as ``rows`` fixed-size binary values, without copying."""
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(row_bytes), rows, [None, pa.py_buffer(array)])


def decode_input_ids(column: pa.ChunkedArray | pa.Array, seq_len: int) -> torch.Tensor:
    """fixed_size_binary int32 column (token ids, positions) -> (n, T) int64 tensor."""
    ids32 = fixed_binary_to_numpy(column, TOKEN_DTYPE, (seq_len,))  # (n, T) int32
    return torch.from_numpy(ids32.astype(np.int64))  # (n, T) int64


def decode_token_kind(column: pa.ChunkedArray | pa.Array, seq_len: int) -> torch.Tensor:
    """fixed_size_binary token-kind column -> (n, T) uint8 tensor."""
    return torch.from_numpy(fixed_binary_to_numpy(column, KIND_DTYPE, (seq_len,)))  # (n, T) uint8


def decode_hidden(column: pa.ChunkedArray | pa.Array, spec: ShardSpec) -> torch.Tensor:
    """fixed_size_binary activation column -> (n, T, H) tensor of ``spec.dtype``, sharing the Arrow buffer."""
    torch_dtype, carrier, _ = HIDDEN_DTYPES[spec.dtype]
    bits = fixed_binary_to_numpy(column, carrier, (spec.seq_len, spec.hidden_size))  # (n, T, H) i2 | f4
    return torch.from_numpy(bits).view(torch_dtype)  # (n, T, H) bf16 | fp32


def fixed_binary_to_numpy(column: pa.ChunkedArray | pa.Array, dtype: np.dtype,
                          row_shape: tuple[int, ...]) -> np.ndarray:
    """A fixed_size_binary column as an (n, *row_shape) array: zero-copy for one chunk, one copy otherwise."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    parts = [_chunk_to_numpy(chunk, dtype) for chunk in chunks if len(chunk)]
    flat = parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else np.empty(0, dtype)
    if not flat.flags.writeable:  # torch.from_numpy warns on read-only memory
        flat = flat.copy()
    return flat.reshape(-1, *row_shape)  # (n, *row_shape)


def _chunk_to_numpy(chunk: pa.Array, dtype: np.dtype) -> np.ndarray:
    if chunk.null_count:
        raise ValueError("shard column has null values")
    width = chunk.type.byte_width
    raw = np.frombuffer(chunk.buffers()[1], dtype=np.uint8, count=len(chunk) * width, offset=chunk.offset * width)
    return raw.view(dtype)  # (n * row values,) flat
