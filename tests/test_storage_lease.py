"""The driver lease of a run directory, on file:// and on moto's S3 (conditional writes): one holder at a time,
a refusal naming the holder, takeover of a stale lease, renewal, a taken-over driver that stops writing, a driver
whose renewals fail that stops writing before it could be taken over, and a release that never deletes a
successor's lease."""

from __future__ import annotations

import json
import threading
import time

import pytest

from segprop_ray.storage.layout import RunLayout
from segprop_ray.storage.lease import LEASE_NAME, SAFETY_FRACTION, LeaseHeld, LeaseLost, RunLease, _body
from segprop_ray.storage.manifest import ManifestStore


TIMEOUT_S = 2.5
"""Lease timeout of the renewal tests: renewals every 0.6 s, long enough for a loaded 2-core machine's S3 writes."""

def other_driver(layout: RunLayout, timeout_s: float = 120.0) -> RunLease:
    """A lease as another driver process would take it (another process identity)."""
    return RunLease(layout, timeout_s, process="another-driver-process")


def lease_body(lease: RunLease) -> bytes:
    """The body ``lease`` writes for its holder now."""
    return _body(lease.holder)


def write_lease(layout: RunLayout, **fields) -> None:
    body = {"format": "segprop_ray.driver_lease", "format_version": 1, "host": "elsewhere", "pid": 4242,
            "process": "p", "lease": "l", "started": time.time() - 3600, "renewed": time.time(), "timeout_s": 60.0}
    layout.fs.pipe_file(layout.join(LEASE_NAME), json.dumps({**body, **fields}).encode())


def test_a_second_driver_is_refused_in_one_line_naming_the_holder(run_layout):
    first = RunLease(run_layout)
    first.acquire()
    holder = first.read_holder()
    assert holder.pid == first.holder.pid and holder.lease == first.holder.lease

    with pytest.raises(LeaseHeld) as refused:
        other_driver(run_layout).acquire()

    message = str(refused.value)
    assert "\n" not in message and "in use by another driver" in message
    assert f"host {holder.host}, pid {holder.pid}" in message and "resources.driver_lease_s" in message
    first.release()
    assert not run_layout.fs.exists(run_layout.join(LEASE_NAME))
    other_driver(run_layout).acquire()  # free once released


def test_of_two_drivers_starting_together_exactly_one_wins(run_layout):
    leases = [RunLease(run_layout, process=f"driver-{i}") for i in range(2)]
    barrier, outcomes = threading.Barrier(2), {}

    def start(lease: RunLease) -> None:
        barrier.wait()
        try:
            lease.acquire()
            outcomes[lease.holder.process] = "holds"
        except LeaseHeld:
            outcomes[lease.holder.process] = "refused"

    threads = [threading.Thread(target=start, args=(lease,)) for lease in leases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes.values()) == ["holds", "refused"]
    (winner,) = [lease for lease in leases if outcomes[lease.holder.process] == "holds"]
    assert run_layout.fs.exists(run_layout.join(LEASE_NAME)) and winner.read_holder().lease == winner.holder.lease


def test_a_lease_not_renewed_within_its_timeout_is_taken_over(run_layout):
    write_lease(run_layout, renewed=time.time() - 61)  # a driver elsewhere, silent for longer than its 60 s
    lease = RunLease(run_layout)
    lease.acquire()
    assert lease.read_holder().lease == lease.holder.lease


def test_a_fresh_lease_of_a_driver_elsewhere_is_respected(run_layout):
    write_lease(run_layout, renewed=time.time() - 30)
    with pytest.raises(LeaseHeld, match="host elsewhere, pid 4242"):
        RunLease(run_layout).acquire()


def test_a_lease_whose_process_is_gone_on_this_host_is_taken_over_at_once(run_layout):
    import socket
    import subprocess
    import sys

    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    write_lease(run_layout, host=socket.gethostname(), pid=int(ended.stdout), renewed=time.time())
    lease = RunLease(run_layout)
    lease.acquire()
    assert lease.read_holder().pid == lease.holder.pid


def test_renewal_keeps_the_lease_and_a_silent_holder_loses_it(run_layout):
    holder = RunLease(run_layout, timeout_s=TIMEOUT_S)
    holder.acquire()
    holder.start_renewing()
    store = ManifestStore(run_layout, guard=holder.check)
    time.sleep(1.6 * TIMEOUT_S)  # longer than the timeout: only the renewals keep it
    with pytest.raises(LeaseHeld):
        other_driver(run_layout).acquire()
    renewed = holder.read_holder().renewed
    assert time.time() - renewed < TIMEOUT_S

    holder._stop.set()  # the driver hangs: no more renewals, but it still thinks it holds the run
    holder._thread.join()
    time.sleep(1.2 * TIMEOUT_S)
    successor = other_driver(run_layout, timeout_s=TIMEOUT_S)
    successor.acquire()
    holder.renew()  # its next renewal finds the successor's lease
    assert holder.lost and successor.read_holder().lease == successor.holder.lease
    with pytest.raises(LeaseLost, match="taken over by another driver"):
        store.write(None)  # the guard refuses before anything is written
    holder.release()
    assert successor.read_holder().lease == successor.holder.lease  # not removed by the old holder


def break_renewals(lease: RunLease, monkeypatch) -> None:
    """Make the storage under ``lease`` fail every write from now on (an unreachable or erroring store): on S3 the
    filesystem's writes raise, on local disk the lease file's writes."""
    def unreachable(*_args, **_kwargs):
        raise OSError("storage unreachable")

    if lease.store.fs.protocol == "file" or "file" in lease.store.fs.protocol:
        monkeypatch.setattr(lease.store, "_write_temporary", unreachable)
    else:
        monkeypatch.setattr(lease.store.fs, "pipe_file", unreachable)


def test_a_holder_whose_renewals_fail_stops_writing_before_a_successor_may_take_over(run_layout, monkeypatch):
    holder = RunLease(run_layout, timeout_s=TIMEOUT_S)
    holder.acquire()
    holder.start_renewing()
    store = ManifestStore(run_layout, guard=holder.check)
    time.sleep(TIMEOUT_S / 2)
    holder.check()  # renewing: may write
    break_renewals(holder, monkeypatch)

    time.sleep(TIMEOUT_S * (1 - SAFETY_FRACTION) + 0.2)  # the renewals of this span all failed (logged, swallowed)

    assert not holder.lost  # no renewal saw another holder: the age of the last good renewal is what refuses
    with pytest.raises(LeaseLost) as refused:
        store.write(None)
    message = str(refused.value)
    assert "\n" not in message and run_layout.describe() in message
    assert "last renewed" in message and "renewals failing" in message
    age = float(message.split("last renewed ")[1].split(" s ago")[0])
    assert TIMEOUT_S * (1 - SAFETY_FRACTION) <= age + 0.5 < 2 * TIMEOUT_S
    monkeypatch.undo()  # storage back: the next renewal (still our version) lets it write again
    time.sleep(TIMEOUT_S / 2)
    holder.check()
    holder.release()


def test_the_old_holders_release_leaves_a_successors_lease(run_layout):
    """The successor takes the stale lease over between the old holder's last read and its delete."""
    old = RunLease(run_layout, timeout_s=5)
    old.acquire()
    old.holder.renewed = time.time() - 60  # as if it had hung: stale to anyone reading it
    old.version = old.store.replace(old.path, lease_body(old), old.version)
    successor = other_driver(run_layout, timeout_s=5)
    takeover = threading.Thread(target=successor.acquire)
    read = old.store.read

    def read_then_lose_the_race(path):
        current = read(path)
        if not takeover.is_alive() and successor.version is None:
            takeover.start()
            takeover.join(timeout=2)  # done at once, unless the release holds the lease's lock
        return current

    old.store.read = read_then_lose_the_race
    old.release()
    takeover.join(timeout=30)

    assert successor.version is not None  # the successor holds the run
    assert run_layout.fs.exists(run_layout.join(LEASE_NAME))
    assert successor.read_holder().lease == successor.holder.lease
    successor.check()
    successor.release()
    assert not run_layout.fs.exists(run_layout.join(LEASE_NAME))
