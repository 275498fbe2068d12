"""SnapCheck depths: producing, committing, validating and retiring the activation snapshots of a split.

A depth ``q`` of split ``s`` is usable only through its ``_COMMITTED`` marker, written last and
atomically by :func:`commit_depth`; :func:`load_committed` returns None (with the reason logged) for
anything doubtful, and the caller regenerates the depth. Regenerating or deleting a depth removes its
marker first, so a half-rewritten depth is never taken for a committed one. Token shards use the same
markers with ``depth=None``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from segprop_ray.storage.documents import DocumentFormat, describe_path
from segprop_ray.storage.errors import DocumentNotFound, StorageError
from segprop_ray.storage.fs import file_sha256
from segprop_ray.storage.layout import RunLayout, depth_of_dir
from segprop_ray.storage.shard_format import ShardSpec
from segprop_ray.storage.shard_rows import read_rows
from segprop_ray.storage.shard_sinks import WriteOptions
from segprop_ray.storage.shards import FileInfo, ShardWriter, read_footer

log = logging.getLogger(__name__)

COMMIT_FORMAT = DocumentFormat("segprop_ray.snapcheck_commit", 1)
HiddenFn = Callable[[dict[str, torch.Tensor]], torch.Tensor]
"""``fn(rows) -> hidden (n, T, H) float``: ``rows`` is a row group of the source (``input_ids``, ``position_ids``,
``token_kind`` and, from a snapshot depth, ``hidden``)."""


@dataclass(frozen=True)
class CommitMarker:
    """The content of a ``_COMMITTED`` marker: what the depth holds and what produced it."""

    split: str
    depth: int | None
    spec: ShardSpec
    files: tuple[FileInfo, ...]
    total_rows: int
    weights_hash: str

    @property
    def kind(self) -> str:
        """``tokens`` (depth None) or ``hidden``."""
        return "tokens" if self.depth is None else "hidden"

    def to_body(self) -> dict[str, Any]:
        """JSON body of the marker (the envelope adds format name and version)."""
        return {"kind": self.kind, "split": self.split, "depth": self.depth, "dtype": self.spec.dtype,
                "seq_len": self.spec.seq_len, "hidden_size": self.spec.hidden_size, "spec": self.spec.to_dict(),
                "files": [info.to_dict() for info in self.files], "total_rows": self.total_rows,
                "weights_hash": self.weights_hash}

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> "CommitMarker":
        """Inverse of :meth:`to_body` (KeyError/TypeError on a malformed body)."""
        files = tuple(FileInfo.from_dict(item) for item in body["files"])
        return cls(body["split"], body["depth"], ShardSpec(**body["spec"]), files, body["total_rows"],
                   body["weights_hash"])


def transform_file(layout: RunLayout, split: str, file_index: int, *, source_depth: int | None, depth: int,
                   fn: HiddenFn, spec: ShardSpec, options: WriteOptions | None = None,
                   pin_memory: bool = False) -> FileInfo:
    """Write snapshot file ``file_index`` of ``depth`` as ``fn`` applied to the same file of ``source_depth``
    (``None``: the token shards), one row group at a time, three groups at work at once: group k+1 is read
    (into page-locked memory with ``pin_memory``, for a GPU's ``fn``) while ``fn`` computes group k, and group
    k-1 is laid out, hashed and stored (an S3 upload in parallel parts, see ``options``) by the writer's
    threads meanwhile, so memory stays bounded by a few groups.

    ``fn``'s output is cast to ``spec.dtype`` and must not be changed afterwards. Rewriting overwrites the file;
    the depth's stale marker is removed first. This is the per-file work of the snapshot job.
    """
    source, target = layout.shard_file(split, source_depth, file_index), layout.shard_file(split, depth, file_index)
    footer = read_footer(layout.fs, source)
    source_spec = _spec_of(footer.description, source)
    _check_same_geometry(source_spec, spec, describe_path(layout.fs, source))
    _remove_marker(layout, split, depth)

    def read(group: int) -> dict[str, torch.Tensor]:
        return read_rows(layout.fs, source, group, source_spec, footer, pin_memory=pin_memory)

    with ShardWriter(layout.fs, target, spec, "hidden", split, depth, file_index, options=options) as writer, \
            ThreadPoolExecutor(1, thread_name_prefix="segprop-snapshot-read") as reader:
        pending = reader.submit(read, 0) if footer.num_row_groups else None
        for group in range(footer.num_row_groups):
            rows = pending.result()
            if group + 1 < footer.num_row_groups:
                pending = reader.submit(read, group + 1)  # the next group is read while this one is computed
            hidden = fn(rows)  # (n, T, H) float
            writer.write_group(rows["input_ids"], hidden, block_ids=rows["block_id"], position_ids=rows["position_ids"],
                               token_kind=rows["token_kind"])  # the token columns carried over as they are
            del rows, hidden  # the next group's output is not made while this one is held
    return writer.info


def _spec_of(description: dict[str, Any], where: str) -> ShardSpec:
    fields = ShardSpec.__dataclass_fields__
    try:
        return ShardSpec(**{name: description[name] for name in fields})
    except (KeyError, TypeError, ValueError) as error:
        raise StorageError(f"{where}: shard description incomplete ({error})") from None


def _check_same_geometry(source: ShardSpec, target: ShardSpec, where: str) -> None:
    same = (source.seq_len, source.group_size, source.groups_per_file) == (
        target.seq_len, target.group_size, target.groups_per_file)
    if not same:
        raise StorageError(f"{where}: source geometry {source} does not match the target's {target}")


def commit_depth(layout: RunLayout, split: str, depth: int | None, file_infos: Iterable[FileInfo],
                 weights_hash: str, spec: ShardSpec) -> CommitMarker:
    """Write the ``_COMMITTED`` marker of a depth (or of the tokens, ``depth=None``), atomically and last.

    ``file_infos`` are the :class:`FileInfo` of every file of the depth; they must cover block ids
    0..N-1 in file order (any order of the list is accepted).
    """
    files = tuple(sorted(file_infos, key=lambda info: info.first_block))
    for index, info in enumerate(files):
        if info.name != layout.shard_file(split, depth, index).rsplit("/", 1)[-1] or \
                info.first_block != index * spec.rows_per_file:
            raise ValueError(f"file list of {split} depth {depth} has a gap or a stray file at {info.name}")
    marker = CommitMarker(split, depth, spec, files, sum(info.rows for info in files), weights_hash)
    COMMIT_FORMAT.write(layout.fs, layout.commit_marker(split, depth), marker.to_body())
    return marker


def load_committed(layout: RunLayout, split: str, depth: int | None, expected_weights_hash: str | None,
                   expected_rows: int | None = None, spec: ShardSpec | None = None,
                   verify_checksums: bool = False) -> CommitMarker | None:
    """The depth's marker if the depth can be read as is, else None (reason logged: regenerate the depth).

    Checks the marker's presence, format version, split/depth, weights hash, row count, shard geometry
    (if ``spec``), that every file exists with its recorded size and, with ``verify_checksums``, its sha256.
    """
    marker, reason = inspect_committed(layout, split, depth, expected_weights_hash, expected_rows, spec,
                                       verify_checksums)
    if marker is None:
        log.warning("%s: not usable, regenerate it: %s", describe_path(layout.fs, layout.shard_dir(split, depth)),
                    reason)
    return marker


def inspect_committed(layout: RunLayout, split: str, depth: int | None, expected_weights_hash: str | None,
                      expected_rows: int | None = None, spec: ShardSpec | None = None,
                      verify_checksums: bool = False) -> tuple[CommitMarker | None, str]:
    """``(marker, "ok")`` or ``(None, reason)``: the checks of :func:`load_committed`, without logging."""
    marker, reason = _read_marker(layout, split, depth)
    if marker is None:
        return None, reason
    reason = _marker_mismatch(marker, split, depth, expected_weights_hash, expected_rows, spec)
    if reason is None:
        reason = _files_mismatch(layout, marker, verify_checksums)
    return (marker, "ok") if reason is None else (None, reason)


def _read_marker(layout: RunLayout, split: str, depth: int | None) -> tuple[CommitMarker | None, str]:
    try:
        return CommitMarker.from_body(COMMIT_FORMAT.read(layout.fs, layout.commit_marker(split, depth))), "ok"
    except DocumentNotFound:
        return None, "no commit marker (never finished, or being regenerated)"
    except StorageError as error:  # unparsable or another format version
        return None, str(error)
    except (KeyError, TypeError, ValueError) as error:
        return None, f"malformed commit marker ({type(error).__name__}: {error})"


def _marker_mismatch(marker: CommitMarker, split: str, depth: int | None, weights_hash: str | None,
                     rows: int | None, spec: ShardSpec | None) -> str | None:
    if (marker.split, marker.depth) != (split, depth):
        return f"marker is for split {marker.split!r} depth {marker.depth}, expected {split!r} depth {depth}"
    if weights_hash is not None and marker.weights_hash != weights_hash:
        return f"written from weights {marker.weights_hash[:16]}, expected {weights_hash[:16]}"
    if rows is not None and marker.total_rows != rows:
        return f"marker has {marker.total_rows} rows, expected {rows}"
    if spec is not None and _geometry(marker.spec) != _geometry(spec):
        return f"written with {marker.spec}, expected {spec}"
    return None


def _geometry(spec: ShardSpec) -> tuple:
    return spec.seq_len, spec.group_size, spec.groups_per_file, spec.hidden_size, spec.dtype


def _files_mismatch(layout: RunLayout, marker: CommitMarker, verify_checksums: bool) -> str | None:
    directory = layout.shard_dir(marker.split, marker.depth)
    layout.fs.invalidate_cache(directory)
    try:
        sizes = {entry["name"].rsplit("/", 1)[-1]: entry["size"] for entry in layout.fs.ls(directory, detail=True)}
    except FileNotFoundError:
        return "shard directory missing"
    for info in marker.files:
        if info.name not in sizes:
            return f"{info.name} missing"
        if sizes[info.name] != info.bytes:
            return f"{info.name} has {sizes[info.name]} bytes, marker says {info.bytes} (truncated or rewritten)"
        if verify_checksums and file_sha256(layout.fs, f"{directory}/{info.name}") != info.sha256:
            return f"{info.name} sha256 differs from the marker's"
    return None


def list_depths(layout: RunLayout, split: str) -> list[int]:
    """Snapshot depths that have a directory (committed or not), ascending."""
    directory = layout.snapshots_dir(split)
    layout.fs.invalidate_cache(directory)
    if not layout.fs.exists(directory):
        return []
    names = layout.fs.ls(directory, detail=False)
    return sorted(depth for depth in map(depth_of_dir, names) if depth is not None)


def committed_depths(layout: RunLayout, split: str) -> list[int]:
    """Depths whose marker exists (not validated), ascending."""
    return [depth for depth in list_depths(layout, split) if layout.fs.exists(layout.commit_marker(split, depth))]


def delete_depth(layout: RunLayout, split: str, depth: int) -> None:
    """Delete a depth: its marker first (so it is never seen as committed again), then its files.

    Call it before regenerating a depth whose old files may differ in number from the new ones.
    """
    _remove_marker(layout, split, depth)
    directory = layout.shard_dir(split, depth)
    if layout.fs.exists(directory):
        layout.fs.rm(directory, recursive=True)
    layout.fs.invalidate_cache(layout.snapshots_dir(split))


def apply_retention(layout: RunLayout, split: str, keep: int = 2, protect: Sequence[int] = ()) -> list[int]:
    """Delete depths older than the newest ``keep`` committed ones, except ``protect`` (e.g. the depth being
    read); depths newer than those (in progress) are left alone. Returns the deleted depths."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    committed = committed_depths(layout, split)
    if len(committed) <= keep:
        return []
    oldest_kept = committed[-keep]
    doomed = [depth for depth in list_depths(layout, split) if depth < oldest_kept and depth not in protect]
    for depth in doomed:
        delete_depth(layout, split, depth)
    return doomed


def _remove_marker(layout: RunLayout, split: str, depth: int | None) -> None:
    marker = layout.commit_marker(split, depth)
    try:
        layout.fs.rm_file(marker)
    except FileNotFoundError:
        pass
    layout.fs.invalidate_cache(layout.shard_dir(split, depth))
