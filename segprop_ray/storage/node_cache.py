"""The node-local cache (``SEGPROP_CACHE``) kept under a size limit (``SEGPROP_CACHE_MAX_GB``).

Workers copy the staged model and committed weight files into the cache of their node; on Kubernetes
the cache is a volume with a size limit, and a pod writing past an ``emptyDir``'s ``sizeLimit`` is
evicted. Before a fetch, the least recently used entries are removed until the new files fit; an entry
used within the last :data:`IN_USE_S` seconds is kept (another process on the node may be reading it),
and a fetch that still does not fit is refused in one line rather than filling the volume.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from segprop_ray.storage.errors import StorageError

LIMIT_ENV = "SEGPROP_CACHE_MAX_GB"
IN_USE_S = 600.0
"""An entry used this recently is never evicted."""
_COMPLETE = ".complete"


def cache_limit() -> int | None:
    """The cache's limit in bytes (``SEGPROP_CACHE_MAX_GB``), or None for no limit."""
    value = os.environ.get(LIMIT_ENV, "").strip()
    if not value:
        return None
    try:
        return int(float(value) * (1 << 30))
    except ValueError:
        raise StorageError(f"{LIMIT_ENV}={value!r} is not a number of GiB") from None


def touch(path: Path) -> None:
    """Mark a cache entry (a weights file, or a model directory's ``.complete``) as just used."""
    try:
        os.utime(path)
    except OSError:
        pass


def _entries(root: Path) -> list[tuple[float, int, Path]]:
    """``(last used, bytes, path)`` of every entry: model directories and weight files."""
    found = []
    for directory in sorted((root / "models").glob("*")) if (root / "models").is_dir() else []:
        if (directory / _COMPLETE).is_file():
            size = sum(f.stat().st_size for f in directory.iterdir() if f.is_file())
            found.append(((directory / _COMPLETE).stat().st_mtime, size, directory))
    for file in sorted((root / "weights").glob("*.safetensors")) if (root / "weights").is_dir() else []:
        found.append((file.stat().st_mtime, file.stat().st_size, file))
    return found


def make_room(root: Path, incoming: int) -> None:
    """Evict least recently used entries of the cache at ``root`` until ``incoming`` more bytes fit the limit."""
    limit = cache_limit()
    if limit is None:
        return
    entries = sorted(_entries(root))
    used = sum(size for _, size, _ in entries)
    now = time.time()
    for last_used, size, path in entries:
        if used + incoming <= limit:
            return
        if now - last_used < IN_USE_S:
            continue
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        used -= size
    if used + incoming > limit:
        raise StorageError(f"the node cache {root} cannot take {incoming / 2**30:.2f} GiB more: "
                           f"{used / 2**30:.2f} GiB were used in the last {IN_USE_S:.0f} s and the limit is "
                           f"{limit / 2**30:.2f} GiB ({LIMIT_ENV}); give the cache volume more room")
