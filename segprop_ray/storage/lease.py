"""One driver per run directory: a lease document taken with a conditional write and renewed in the background.

``<run_dir>/driver.lease`` names the driver that holds the run (host, process id, when it started and
when it last renewed). A driver takes it before it writes anything:

- no lease yet: a conditional create (S3 ``If-None-Match: *``; on local disk a hard link, which fails if
  the name exists), so of two drivers starting together exactly one wins;
- a lease of another driver that renewed within ``timeout_s`` (and, on this host, whose process is alive):
  :class:`LeaseHeld`, one line naming the holder;
- a stale lease (not renewed for ``timeout_s``, or its process gone on this host): taken over by a write
  conditional on the version read (S3 ``If-Match: <ETag>``; on local disk under an ``flock``).

The holder renews every quarter of ``timeout_s`` the same way. :meth:`RunLease.check` (called before
every manifest write) raises :class:`LeaseLost` once a renewal found another lease, and also once the last
successful renewal is older than ``timeout_s`` less a safety margin (renewals failing on storage errors:
a successor may take over at ``timeout_s``), so a driver that was, or may have been, taken over never
overwrites the new driver's manifest. Releasing deletes the lease only if it is still this driver's
version (:mod:`.lease_stores`), never a successor's.
Staleness compares the holder's clock with the reader's: keep the clocks in sync (NTP) to well within
the margin. Filesystems other than local disk and S3 get the same protocol without the atomicity.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from segprop_ray.storage.errors import StorageError
from segprop_ray.storage.layout import RunLayout
from segprop_ray.storage.lease_stores import LeaseConflict, store_for

log = logging.getLogger(__name__)

LEASE_NAME = "driver.lease"
PROCESS_TOKEN = uuid.uuid4().hex
"""This process's identity in a lease: a driver process may take over its own lease (a second Driver object)."""
SAFETY_FRACTION = 0.25
"""A holder stops writing once its last successful renewal is older than ``(1 - SAFETY_FRACTION) * timeout_s``: a
margin for clock skew and for a write already under way when a successor takes over at ``timeout_s``."""


class LeaseHeld(StorageError):
    """Another driver holds the run directory (the message names it)."""


class LeaseLost(StorageError):
    """This driver's lease was taken over by another driver: it must not write the run directory again."""


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
        self.store = store_for(layout.fs)
        self.version: str | None = None
        self.lost = False
        self.renewed_at = time.monotonic()
        """When the last successful write of this lease (taking or renewing it) began, on this process's clock."""
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
            holder, version = _parse(current[0]), current[1]
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
        began, self.holder.renewed = time.monotonic(), time.time()
        try:
            self.version = write(_body(self.holder))
        except (FileExistsError, FileNotFoundError, LeaseConflict):  # another driver moved first: read again
            return False
        self.lost, self.renewed_at = False, began
        return True

    def renew(self) -> None:
        """Rewrite the lease with a new renewal time, if it is still ours (else mark it lost)."""
        if self.lost:
            return
        began, self.holder.renewed = time.monotonic(), time.time()
        try:
            self.version = self.store.replace(self.path, _body(self.holder), self.version)
            self.renewed_at = began
        except (LeaseConflict, FileNotFoundError):
            self.lost = True
            log.warning("driver lease on %s was taken over by another driver: this driver stops writing",
                        self.layout.describe())

    def check(self) -> None:
        """Raise :class:`LeaseLost` if another driver took the run directory over, or may have: the last successful
        renewal is older than the timeout less its safety margin (:data:`SAFETY_FRACTION`)."""
        if self.lost:
            raise LeaseLost(f"run directory {self.layout.describe()} was taken over by another driver "
                            "(this one did not renew its lease in time); this driver stops")
        age, limit = time.monotonic() - self.renewed_at, (1 - SAFETY_FRACTION) * self.timeout_s
        if age > limit:
            raise LeaseLost(f"run directory {self.layout.describe()}: this driver's lease was last renewed {age:.0f} s "
                            f"ago (renewals failing), past the {limit:.0f} s it may write for before another driver "
                            "may take over (resources.driver_lease_s); this driver stops")

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
        """Stop renewing and remove the lease if it is still the version this driver wrote last (a successor's
        lease stays); a storage error leaves it to go stale."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.lost or self.version is None:
            return
        self.lost = True
        try:
            self.store.delete(self.path, self.version)
        except (LeaseConflict, FileNotFoundError):  # taken over (or removed) since: not ours to delete
            pass
        except Exception as error:  # noqa: BLE001 - releasing is a courtesy: the lease goes stale after its timeout
            log.warning("releasing the driver lease on %s failed (%s): it goes stale after %.0f s",
                        self.layout.describe(), error, self.timeout_s)

    def read_holder(self) -> Holder | None:
        """The lease's current holder, if any (for messages and tests)."""
        current = self.store.read(self.path)
        return None if current is None else _parse(current[0])


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
