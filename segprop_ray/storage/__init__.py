"""Run directory, documents and SnapCheck shards on any fsspec URI (local, s3://, ...). Never imports ray."""

from segprop_ray.storage.documents import DocumentFormat, read_json, write_json_atomic
from segprop_ray.storage.errors import DocumentNotFound, FormatVersionError, StorageError
from segprop_ray.storage.fs import (check_writable, describe_storage, redact_uri, resolve_filesystem,
                                    resolve_pyarrow_filesystem)
from segprop_ray.storage.layout import RunLayout
from segprop_ray.storage.reader import ReadStats, ShardBatchReader, epoch_reader, sequential_reader
from segprop_ray.storage.shard_format import ShardSpec
from segprop_ray.storage.shard_rows import read_rows
from segprop_ray.storage.shard_sinks import WriteOptions
from segprop_ray.storage.shards import (FileInfo, ShardWriter, describe_shard, read_row_group, read_token_shards,
                                        write_token_file, write_token_shards)
from segprop_ray.storage.snapcheck import (CommitMarker, apply_retention, commit_depth, delete_depth,
                                           load_committed, transform_file)

__all__ = [
    "CommitMarker", "DocumentFormat", "DocumentNotFound", "FileInfo", "FormatVersionError", "ReadStats",
    "RunLayout", "ShardBatchReader", "ShardSpec", "ShardWriter", "StorageError", "apply_retention",
    "check_writable", "commit_depth", "delete_depth", "describe_shard", "describe_storage", "epoch_reader",
    "load_committed", "read_json", "read_row_group", "read_rows", "read_token_shards", "redact_uri", "resolve_filesystem",
    "resolve_pyarrow_filesystem", "sequential_reader", "transform_file", "write_json_atomic",
    "write_token_file", "write_token_shards", "WriteOptions",
]
