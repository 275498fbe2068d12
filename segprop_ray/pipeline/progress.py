"""Live progress of remote training: workers post their step to a small actor, the driver draws a bar.

Ray Train workers run in other processes (often other nodes), and their stdout reaches the driver
line by line, which no progress bar survives. Rank 0 instead sends ``(step, total, loss)`` to a
:class:`ProgressBoard` actor; the driver polls it while the trainer runs and updates a tqdm bar.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

import ray
from tqdm.auto import tqdm


PROGRESS_EVERY_S = 10.0
"""How often a running job's progress is written to the manifest (what ``segprop status`` shows)."""


class Throttle:
    """Says yes at most once every ``every_s`` seconds (the first yes comes a full period after it is made)."""

    def __init__(self, every_s: float = PROGRESS_EVERY_S):
        self.every_s, self._last = every_s, time.monotonic()

    def ready(self) -> bool:
        """Whether a period has passed since the last yes (and if so, start the next period)."""
        now = time.monotonic()
        if now - self._last < self.every_s:
            return False
        self._last = now
        return True


@ray.remote(num_cpus=0, resources={"node:__internal_head__": 0.001})
class ProgressBoard:
    """The latest progress record of each job, by name (on the head node, which lives as long as the job)."""

    def __init__(self) -> None:
        self.records: dict[str, dict[str, Any]] = {}

    def post(self, job: str, record: dict[str, Any]) -> None:
        """Replace ``job``'s record."""
        self.records[job] = record

    def get(self, job: str) -> dict[str, Any] | None:
        """``job``'s latest record."""
        return self.records.get(job)


def poster(board: Any, job: str) -> Callable[[dict[str, Any]], None]:
    """A callback that posts a record to ``board`` without waiting for it."""
    return lambda record: board.post.remote(job, record)


def run_with_bar(work: Callable[[], Any], board: Any, job: str, label: str, poll_s: float = 0.5,
                 on_progress: Callable[[dict[str, Any]], None] | None = None, every_s: float = PROGRESS_EVERY_S) -> Any:
    """Run ``work()`` in a thread while a bar shows ``job``'s posted ``step`` of ``total``; returns its result.

    ``on_progress`` receives the latest record every ``every_s`` seconds (the driver writes it to the
    manifest, so ``segprop status`` shows a running iteration's progress too).
    """
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = work()
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread
            outcome["error"] = error

    thread = threading.Thread(target=target, name=f"segprop-{job}", daemon=True)
    thread.start()
    throttle = Throttle(every_s)
    shown: tuple | None = None
    # Every forward step is drawn (miniters=1, mininterval=0), so tqdm's rate follows the steps.
    with tqdm(desc=label, unit="step", dynamic_ncols=True, leave=True, miniters=1, mininterval=0) as bar:
        while thread.is_alive():
            thread.join(poll_s)
            record = ray.get(board.get.remote(job))
            shown = _draw(bar, record, shown)
            if on_progress is not None and record and throttle.ready():
                on_progress(record)
        _draw(bar, ray.get(board.get.remote(job)), shown)
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def _draw(bar: tqdm, record: dict[str, Any] | None, shown: tuple | None = None) -> tuple | None:
    """Show ``record`` on ``bar`` if its total, step or losses differ from ``shown``; returns what the bar shows.

    An unchanged record is not drawn again, so once the last step is shown the bar keeps its line (and
    its rate) while the trainer saves and shuts down. A step forward goes through ``tqdm.update``, which
    moves tqdm's smoothed rate; a step back (a retry from a checkpoint) or a new loss is drawn as is.
    """
    if not record:
        return shown
    losses = {k: f"{record[k]:.4f}" for k in ("train_loss", "eval_loss") if record.get(k) is not None}
    state = (record.get("total"), int(record.get("step", 0)), tuple(losses.items()))
    if state == shown:
        return shown
    bar.total = state[0]
    bar.set_postfix(losses, refresh=False)
    moved = state[1] - bar.n
    if moved <= 0 or not bar.update(moved):
        bar.n = bar.last_print_n = state[1]
        bar.refresh()
    return state
