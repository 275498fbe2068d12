"""Per-file records of a snapshot depth being written, so a restarted job redoes only unfinished files.

A snapshot job writes a depth file by file. Right after a file is finished its writer leaves
``_written/part-NNNNN.json`` beside it: the file's :class:`FileInfo` and the weights hash of the
depth. A job started again for the same depth (a preempted node, a killed driver) keeps a file
only if its record names the expected weights hash and the file still has the recorded size
(:func:`recorded_files`, on the driver) and sha256 (:func:`is_intact`, in the job's actors, in
parallel); every other file is written again. The records are removed once the depth is
committed: its ``_COMMITTED`` marker then holds the same facts.

Each file has its own record, so concurrent writers never share a document.
"""

from __future__ import annotations

import logging

from segprop_ray.storage.documents import DocumentFormat, describe_path
from segprop_ray.storage.errors import StorageError
from segprop_ray.storage.fs import file_sha256
from segprop_ray.storage.layout import RunLayout, part_index
from segprop_ray.storage.shards import FileInfo

log = logging.getLogger(__name__)

WRITTEN_FORMAT = DocumentFormat("segprop_ray.snapcheck_written", 1)


def record_written(layout: RunLayout, split: str, depth: int, info: FileInfo, weights_hash: str) -> None:
    """Record that ``info``'s file of ``depth`` is finished, written from the weights ``weights_hash``."""
    index = part_index(info.name)
    if index is None:
        raise ValueError(f"{info.name} is not a shard file name")
    body = {"split": split, "depth": depth, "weights_hash": weights_hash, "file": info.to_dict()}
    WRITTEN_FORMAT.write(layout.fs, layout.written_record(split, depth, index), body)


def recorded_files(layout: RunLayout, split: str, depth: int, weights_hash: str) -> dict[int, FileInfo]:
    """``file index -> FileInfo`` of the depth's files that an earlier attempt recorded as finished from the
    weights ``weights_hash`` and that still have the recorded size (their content: :func:`is_intact`)."""
    directory = layout.written_dir(split, depth)
    layout.fs.invalidate_cache(directory)
    try:
        names = layout.fs.ls(directory, detail=False)
    except FileNotFoundError:
        return {}
    kept: dict[int, FileInfo] = {}
    for name in sorted(names):
        info, reason = _check_record(layout, split, depth, name, weights_hash)
        if info is None:
            log.info("%s: written again (%s)", describe_path(layout.fs, name), reason)
        else:
            kept[part_index(info.name)] = info
    return kept


def is_intact(layout: RunLayout, split: str, depth: int | None, info: FileInfo) -> bool:
    """Whether the depth's file ``info.name`` (a token file with ``depth=None``) has the recorded sha256 (reads
    the whole file)."""
    index = part_index(info.name)
    try:
        return index is not None and file_sha256(layout.fs, layout.shard_file(split, depth, index)) == info.sha256
    except FileNotFoundError:
        return False


def clear_written(layout: RunLayout, split: str, depth: int) -> None:
    """Remove the depth's per-file records (after its commit)."""
    directory = layout.written_dir(split, depth)
    if layout.fs.exists(directory):
        layout.fs.rm(directory, recursive=True)
    layout.fs.invalidate_cache(layout.shard_dir(split, depth))


def _check_record(layout: RunLayout, split: str, depth: int, record: str,
                  weights_hash: str) -> tuple[FileInfo | None, str]:
    try:
        body = WRITTEN_FORMAT.read(layout.fs, record)
        info = FileInfo.from_dict(body["file"])
    except (StorageError, KeyError, TypeError, ValueError) as error:
        return None, f"unreadable record: {error}"
    index = part_index(info.name)
    if index is None or layout.written_record(split, depth, index).rsplit("/", 1)[-1] != record.rsplit("/", 1)[-1]:
        return None, f"record names {info.name!r}"
    if (body.get("split"), body.get("depth")) != (split, depth):
        return None, f"record is for {body.get('split')!r} depth {body.get('depth')}"
    if body.get("weights_hash") != weights_hash:
        return None, "written from other weights"
    path = layout.shard_file(split, depth, index)
    try:
        size = layout.fs.size(path)
    except FileNotFoundError:
        return None, f"{info.name} missing"
    if size != info.bytes:
        return None, f"{info.name} has {size} bytes, record says {info.bytes}"
    return info, "ok"
