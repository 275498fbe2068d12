"""One driver per run directory: a lease document taken with a conditional write and renewed in the background.

``<run_dir>/driver.lease`` names the driver that holds the run (host, process id, when it started and
when it last renewed). A driver takes it before it writes anything:

- no lease yet: a conditional create (S3 ``If-None-Match: *``; on local disk a hard link, which fails if
  the name exists), so of two drivers starting together exactly one wins;
- a lease of another driver that renewed within ``timeout_s`` (and, on this host, whose process is alive):
  :class:`LeaseHeld`, one line naming the holder;
- a stale lease (not renewed for ``timeout_s``, or its process gone on this host): taken over by a write
  conditional on the version read (S3 ``If-Match: <ETag>``; on local disk under an ``flock``).

The holder renews every quarter of ``timeout_s`` the same way; a renewal that finds another lease marks
this one lost, and :meth:`RunLease.check` (called before every manifest write) then raises
:class:`LeaseLost`, so a driver that was taken over never overwrites the new driver's manifest.
Staleness compares the holder's clock with the reader's: keep the clocks in sync (NTP) to well within
``timeout_s``. Filesystems other than local disk and S3 get the same protocol without the atomicity.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any, Iterator

from segprop_ray.storage.documents import describe_path
from segprop_ray.storage.errors import StorageError
from segprop_ray.storage.fs import S3_PROTOCOLS, ensure_parent_dir, is_local
from segprop_ray.storage.layout import RunLayout

log = logging.getLogger(__name__)

LEASE_NAME = "driver.lease"
PROCESS_TOKEN = uuid.uuid4().hex
"""This process's identity in a lease: a driver process may take over its own lease (a second Driver object)."""


class LeaseHeld(StorageError):
    """Another driver holds the run directory (the message names it)."""


class LeaseLost(StorageError):
    """This driver's lease was taken over by another driver: it must not write the run directory again."""


class LeaseConflict(Exception):
    """A conditional write found another version of the lease than the one expected."""


@dataclass
class Holder:
    """Who holds a lease, as written in it."""

    host: str
    pid: int
    process: str
    lease: str
    started: float
    renewed: float
    timeout_s: float

    def describe(self, now: float | None = None) -> str:
        """``host H, pid P, since T, renewed N s ago``."""
        since = datetime.fromtimestamp(self.started, timezone.utc).isoformat(timespec="seconds")
        ago = max((now or time.time()) - self.renewed, 0)
        return f"host {self.host}, pid {self.pid}, since {since}, renewed {ago:.0f} s ago"

    def stale(self, now: float) -> bool:
        """Whether the holder is gone: not renewed for its timeout, or (on this host) its process has ended."""
        if now - self.renewed > self.timeout_s:
            return True
        return self.host == socket.gethostname() and not _alive(self.pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class RunLease:
    """The lease of one driver on one run directory (see the module docstring)."""

    def __init__(self, layout: RunLayout, timeout_s: float = 120.0, process: str = PROCESS_TOKEN):
        self.layout, self.timeout_s = layout, timeout_s
        self.path = layout.join(LEASE_NAME)
        now = time.time()
        self.holder = Holder(socket.gethostname(), os.getpid(), process, uuid.uuid4().hex, now, now, timeout_s)
        self.store = _store_for(layout)
        self.version: str | None = None
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lease, taking over a stale one or our own process's; :class:`LeaseHeld` if it is held."""
        for _ in range(5):  # each retry follows a race another driver won or a document being replaced
            current = self.store.read(self.path)
            if current is None:
                if self._try(lambda body: self.store.create(self.path, body)):
                    return
                continue
            holder, version = current
            if holder is not None and not self._may_take(holder):
                raise LeaseHeld(f"run directory {self.layout.describe()} is in use by another driver "
                                f"({holder.describe()}); wait for it to end, or for its lease to go stale "
                                f"after {holder.timeout_s:.0f} s without renewal (resources.driver_lease_s)")
            if self._try(lambda body: self.store.replace(self.path, body, version)):
                if holder is not None and holder.process != self.holder.process:
                    log.warning("took over the stale lease of %s on %s", holder.describe(), self.layout.describe())
                return
        raise LeaseHeld(f"run directory {self.layout.describe()}: lost every race for its driver lease")

    def _may_take(self, holder: Holder) -> bool:
        return holder.process == self.holder.process or holder.stale(time.time())

    def _try(self, write) -> bool:
        self.holder.renewed = time.time()
        try:
            self.version = write(_body(self.holder))
        except (FileExistsError, FileNotFoundError, LeaseConflict):  # another driver moved first: read again
            return False
        self.lost = False
        return True

    def renew(self) -> None:
        """Rewrite the lease with a new renewal time, if it is still ours (else mark it lost)."""
        if self.lost:
            return
        self.holder.renewed = time.time()
        try:
            self.version = self.store.replace(self.path, _body(self.holder), self.version)
        except (LeaseConflict, FileNotFoundError):
            self.lost = True
            log.warning("driver lease on %s was taken over by another driver: this driver stops writing",
                        self.layout.describe())

    def check(self) -> None:
        """Raise :class:`LeaseLost` if another driver took the run directory over."""
        if self.lost:
            raise LeaseLost(f"run directory {self.layout.describe()} was taken over by another driver "
                            "(this one did not renew its lease in time); this driver stops")

    def start_renewing(self) -> "RunLease":
        """Renew every quarter of the timeout on a daemon thread, until :meth:`release` (or the lease is lost)."""
        def loop() -> None:
            while not self._stop.wait(self.timeout_s / 4) and not self.lost:
                try:
                    self.renew()
                except Exception as error:  # noqa: BLE001 - a transient storage error: retried next period
                    log.warning("renewing the driver lease on %s failed: %s", self.layout.describe(), error)

        self._thread = threading.Thread(target=loop, name="segprop-driver-lease", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        """Stop renewing and remove the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.lost:
            return
        current = self.store.read(self.path)
        if current is not None and current[0] is not None and current[0].lease == self.holder.lease:
            self.store.delete(self.path)
        self.lost = True

    def read_holder(self) -> Holder | None:
        """The lease's current holder, if any (for messages and tests)."""
        current = self.store.read(self.path)
        return None if current is None else current[0]


def _body(holder: Holder) -> bytes:
    return (json.dumps({"format": "segprop_ray.driver_lease", "format_version": 1, **asdict(holder)},
                       indent=2) + "\n").encode()


def _parse(body: bytes) -> Holder | None:
    """The holder of a lease body, or None for an unreadable one (treated as stale: taken over)."""
    try:
        data = json.loads(body)
        return Holder(**{key: data[key] for key in Holder.__dataclass_fields__})
    except (ValueError, KeyError, TypeError):
        return None


def _store_for(layout: RunLayout) -> "_Store":
    if is_local(layout.fs):
        return _LocalStore(layout.fs)
    protocols = (layout.fs.protocol,) if isinstance(layout.fs.protocol, str) else tuple(layout.fs.protocol)
    if any(p in S3_PROTOCOLS for p in protocols):
        return _S3Store(layout.fs)
    return _Store(layout.fs)


class _Store:
    """Lease documents on a filesystem without conditional writes: the same steps, not atomic."""

    def __init__(self, fs: Any):
        self.fs = fs

    def read(self, path: str) -> tuple[Holder | None, str] | None:
        """``(holder, version)`` of the lease at ``path``, or None if there is none."""
        try:
            body = self.fs.cat_file(path)
        except FileNotFoundError:
            return None
        holder = _parse(body)
        return holder, holder.lease if holder is not None else ""

    def create(self, path: str, body: bytes) -> str:
        """Write ``body`` unless ``path`` exists (FileExistsError); returns the new version."""
        if self.fs.exists(path):
            raise FileExistsError(path)
        ensure_parent_dir(self.fs, path)
        self.fs.pipe_file(path, body)
        return _parse(body).lease

    def replace(self, path: str, body: bytes, version: str | None) -> str:
        """Write ``body`` if the lease at ``path`` is still ``version`` (LeaseConflict otherwise)."""
        current = self.read(path)
        if current is None:
            raise FileNotFoundError(path)
        if current[1] != version:
            raise LeaseConflict(describe_path(self.fs, path))
        self.fs.pipe_file(path, body)
        return _parse(body).lease

    def delete(self, path: str) -> None:
        """Remove the lease document."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(path)


class _LocalStore(_Store):
    """Local disk: create by hard link (atomic, fails if the name exists); replace under an ``flock``."""

    def create(self, path: str, body: bytes) -> str:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        temporary = f"{path}.{uuid.uuid4().hex}.tmp"
        with open(temporary, "wb") as file:
            file.write(body)
            file.flush()
            os.fsync(file.fileno())
        try:
            os.link(temporary, path)
        finally:
            os.unlink(temporary)
        return _parse(body).lease

    def replace(self, path: str, body: bytes, version: str | None) -> str:
        with self._locked(path):
            current = self.read(path)
            if current is None:
                raise FileNotFoundError(path)
            if current[1] != version:
                raise LeaseConflict(path)
            temporary = f"{path}.{uuid.uuid4().hex}.tmp"
            with open(temporary, "wb") as file:
                file.write(body)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        return _parse(body).lease

    @contextlib.contextmanager
    def _locked(self, path: str) -> Iterator[None]:
        with open(f"{path}.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


class _S3Store(_Store):
    """S3: create with ``If-None-Match: *``, replace with ``If-Match: <ETag>`` (the version is the ETag)."""

    def read(self, path: str) -> tuple[Holder | None, str] | None:
        for _ in range(5):  # the body and the ETag from one version of the object
            try:
                before = self.fs.info(path, refresh=True)["ETag"]
                body = self.fs.cat_file(path)
                after = self.fs.info(path, refresh=True)["ETag"]
            except FileNotFoundError:
                return None
            if before == after:
                return _parse(body), before
        raise StorageError(f"{describe_path(self.fs, path)}: changing too fast to read")

    def create(self, path: str, body: bytes) -> str:
        return self.fs.pipe_file(path, body, mode="create")["ETag"]  # FileExistsError when it exists

    def replace(self, path: str, body: bytes, version: str | None) -> str:
        try:
            return self.fs.pipe_file(path, body, IfMatch=version)["ETag"]
        except FileNotFoundError:
            raise
        except OSError as error:  # s3fs maps 412 PreconditionFailed to OSError(EINVAL)
            if "pre-condition" in str(error).lower() or "precondition" in str(error).lower():
                raise LeaseConflict(describe_path(self.fs, path)) from None
            raise
