"""Checking committed shard files on a resumed run without reading them on the head.

A driver that did not write a depth itself (a resumed run) checks it before trusting it: the
``_COMMITTED`` marker and every file's size come from one listing on the driver, and every file's
sha256 is computed by Ray tasks on the CPU group (``resources.cpu``), in parallel, next to the
storage rather than through the head. The head reads markers and listings, never shard bytes.
"""

from __future__ import annotations

from typing import Any

import ray

from segprop_ray.storage.fs import file_sha256
from segprop_ray.storage.layout import RunLayout
from segprop_ray.storage.shard_format import ShardSpec
from segprop_ray.storage.snapcheck import CommitMarker, inspect_committed


def file_mismatch(layout: RunLayout, directory: str, name: str, sha256: str) -> str | None:
    """Why the shard file ``name`` of ``directory`` is not the one its marker names, or None (a Ray task)."""
    try:
        found = file_sha256(layout.fs, f"{directory}/{name}")
    except FileNotFoundError:
        return f"{name} missing"
    return None if found == sha256 else f"{name} sha256 differs from the marker's"


def checksums_mismatch(layout: RunLayout, marker: CommitMarker, options: dict[str, Any]) -> str | None:
    """The first file of ``marker`` whose sha256 differs from the recorded one (hashed by Ray tasks), or None."""
    directory = layout.shard_dir(marker.split, marker.depth)
    task = ray.remote(file_mismatch).options(**options, max_retries=2)
    refs = [task.remote(layout, directory, info.name, info.sha256) for info in marker.files]
    reasons = [reason for reason in ray.get(refs) if reason]
    return reasons[0] if reasons else None


def check_committed(layout: RunLayout, split: str, depth: int | None, weights_hash: str, rows: int, spec: ShardSpec,
                    options: dict[str, Any]) -> tuple[CommitMarker | None, str]:
    """``(marker, "ok")`` when the depth (``None``: the tokens) is committed with these weights, rows and geometry
    and every file has its size (checked here) and sha256 (checked on workers); else ``(None, reason)``."""
    marker, reason = inspect_committed(layout, split, depth, weights_hash, rows, spec, verify_checksums=False)
    if marker is None:
        return None, reason
    mismatch = checksums_mismatch(layout, marker, options)
    return (marker, "ok") if mismatch is None else (None, mismatch)
