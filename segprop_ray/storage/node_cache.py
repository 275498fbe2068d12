"""The node-local cache (``SEGPROP_CACHE``) kept under a size limit (``SEGPROP_CACHE_MAX_GB``).

Workers copy the staged model and committed weight files into the cache of their node; on Kubernetes
the cache is a volume with a size limit, and a pod writing past an ``emptyDir``'s ``sizeLimit`` is
evicted. Before a fetch, the least recently used entries are removed until the new files fit; an entry
used within the last :data:`IN_USE_S` seconds is kept (another process on the node may be reading it),
and a fetch that still does not fit is refused in one line rather than filling the volume.

An entry is fetched by one process per node: the others wait on its lock file (:func:`entry_lock`) and then
use what it published. A fetch under way counts with its expected size (:func:`fetching`), so two fetches
of different entries that each fit alone cannot together pass the limit.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from segprop_ray.storage.errors import StorageError

LIMIT_ENV = "SEGPROP_CACHE_MAX_GB"
IN_USE_S = 600.0
"""An entry used this recently is never evicted."""
_COMPLETE = ".complete"
_FETCHING = "fetching"
"""Directory of the cache's records of fetches under way: ``<key>.<pid>`` holding the expected bytes."""
_ROOM_LOCK = ".room.lock"


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


@contextmanager
def entry_lock(lock_file: Path) -> Iterator[None]:
    """Hold the exclusive lock of one cache entry (``fcntl.flock`` on ``lock_file``, waiting for its holder): one
    process on the node fetches the entry while the others wait, then find it published."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def fetching(root: Path, key: str, incoming: int) -> Iterator[None]:
    """Make room for ``incoming`` bytes (:func:`make_room`) and count them as in use until the fetch ends; the check
    and the record are one step under the cache's lock, so concurrent fetches see each other."""
    record = root / _FETCHING / f"{key}.{os.getpid()}"
    with entry_lock(root / _ROOM_LOCK):
        make_room(root, incoming)
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(str(incoming))
    try:
        yield
    finally:
        record.unlink(missing_ok=True)


def _in_flight(root: Path) -> int:
    """Expected bytes of the fetches under way on this node (records of processes that are gone are dropped)."""
    total = 0
    for record in sorted((root / _FETCHING).glob("*.*")) if (root / _FETCHING).is_dir() else []:
        try:
            os.kill(int(record.suffix[1:]), 0)
            total += int(record.read_text() or 0)
        except (ProcessLookupError, ValueError):
            record.unlink(missing_ok=True)
        except (PermissionError, OSError):
            continue
    return total


def make_room(root: Path, incoming: int) -> None:
    """Evict least recently used entries of the cache at ``root`` until ``incoming`` more bytes fit the limit (beside
    what fetches under way are bringing)."""
    limit = cache_limit()
    if limit is None:
        return
    entries = sorted(_entries(root))
    used = sum(size for _, size, _ in entries) + _in_flight(root)
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
                           f"{used / 2**30:.2f} GiB were used in the last {IN_USE_S:.0f} s or are being fetched and the "
                           f"limit is {limit / 2**30:.2f} GiB ({LIMIT_ENV}); give the cache volume more room")
