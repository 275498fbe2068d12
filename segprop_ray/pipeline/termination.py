"""A command stopped by SIGTERM (KubeRay stopping a RayJob, ``kill``) ends as an interrupted one does.

Python's default for SIGTERM ends the process at once: no ``finally`` runs, so a driver's lease stays
until it goes stale (and a RayJob retry within that time is refused) and its manifest still says
``running``. Within :func:`stop_on_sigterm` the signal raises :class:`Terminated` in the main thread
instead: the driver records the run as failed with that cause, releases its lease and exits with
128 + 15. ``ray.init`` installs a handler of its own (``sys.exit(15)``, no cause):
:func:`keep_sigterm_handler` puts ours back after it.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator


class Terminated(SystemExit):
    """The process was asked to stop by a signal; its exit status is 128 + the signal's number."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum

    def __str__(self) -> str:
        return f"stopped by {signal.Signals(self.signum).name}; run the same command again to continue"


def _raise_terminated(signum: int, _frame: Any) -> None:
    signal.signal(signum, signal.SIG_IGN)  # a second signal must not cut the clean-up short (lease, manifest)
    raise Terminated(signum)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` in the main thread; the previous handler is back after.
    Outside the main thread (where Python cannot set handlers) it does nothing."""
    if not _in_main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def keep_sigterm_handler() -> Iterator[None]:
    """If :func:`stop_on_sigterm`'s handler is in force before the block, it is in force after it (``ray.init``
    replaces it); any other handler is left as the block leaves it (a library caller keeps Ray's)."""
    ours = _in_main_thread() and signal.getsignal(signal.SIGTERM) is _raise_terminated
    try:
        yield
    finally:
        if ours:
            signal.signal(signal.SIGTERM, _raise_terminated)
