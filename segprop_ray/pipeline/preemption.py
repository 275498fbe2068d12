"""Preemption-aware training: a spot node's drain notice becomes a checkpoint at once and a hand-over.

When a node hosting a Ray Train worker is drained for preemption (Kubernetes' preStop hook runs
``ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION``; ``ray start`` does the same on SIGTERM), Ray
Train's preemption watcher tells the workers, and ``ray.train.get_preemption_info()`` (a barrier: every
rank asks at the same step) returns the notice. The segment loop then stops after that step, the worker
reports a checkpoint of it and returns :data:`PREEMPTED` with the step; the driver starts the iteration
again under the same Train run name, which resumes from that checkpoint on a node that is not draining
(Ray schedules nothing new on a draining node). No step is lost and the grace period is spent on the
checkpoint upload, not waiting.

With :data:`PREEMPT_DIR_ENV` set (the chart sets it on worker pods), each rank leaves a marker on its node
when it sees the notice (``<pid>-<step>.notice``, holding its process id) and another once the checkpoint
of that step has been reported and uploaded (``<pid>-<step>.saved``); the pod's preStop hook waits until
every notice has its ``saved`` marker (or its worker is gone) instead of guessing from running processes.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import ray
import ray.train

logger = logging.getLogger(__name__)

PREEMPTED = "preempted_at_step"
"""Key of a worker's return value when it stopped at a preemption notice (the value: the checkpointed step)."""
DRAIN_ENV = "SEGPROP_TEST_DRAIN_AT"
"""Testing hook: ``"<depth>:<step>"`` makes the rank-0 worker drain its own node for preemption, once, at that step."""
PREEMPT_DIR_ENV = "SEGPROP_PREEMPT_DIR"
"""Directory on the node for the preemption markers the preStop hook waits on; unset: no markers."""
DRAIN_DEADLINE_S = 120
"""Deadline the testing hook announces with its drain (the notice of a cloud's spot reclaim is about as long)."""


def preemption_watch(every_steps: int) -> Callable[[Any], bool]:
    """The loop's ``interrupt`` hook: every ``every_steps`` steps, ask Ray Train whether a worker's node is being
    preempted; True (stop and checkpoint) on a notice."""

    def interrupt(loop: Any) -> bool:
        if loop.state.step % every_steps:
            return False
        notice = ray.train.get_preemption_info()  # a barrier: every rank reaches it at this step
        if notice is None:
            return False
        logger.warning("preemption notice at step %d (nodes %s, deadline %s ms): checkpointing and handing over",
                       loop.state.step, sorted(notice.preempted_node_to_ranks), notice.deadline_ms)
        mark_preemption("notice", loop.state.step)
        return True

    return interrupt


def checkpoint_at_notice(step: int, save_steps: int, report: Callable[[], None]) -> None:
    """At a notice after ``step``: ``report()`` the checkpoint of that step now (synchronously) unless a save step's
    is already reported, then mark it saved. (A save step's checkpoint uploads in the background and Ray flushes it
    before the worker process ends: the preStop hook waits for that process instead.)"""
    if step % save_steps:
        report()
        mark_preemption("saved", step)


def mark_preemption(stage: str, step: int) -> None:
    """Leave the marker ``<pid>-<step>.<stage>`` (``notice`` or ``saved``) in :data:`PREEMPT_DIR_ENV`'s directory for
    the preStop hook; nothing when unset, and a marker that cannot be written only logs (training goes on)."""
    directory = os.environ.get(PREEMPT_DIR_ENV, "")
    if not directory:
        return
    marker = Path(directory) / f"{os.getpid()}-{step}.{stage}"
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        partial = marker.with_name(f".{marker.name}.tmp")
        partial.write_text(f"{os.getpid()}\n")
        os.replace(partial, marker)  # the hook never sees a marker without its process id
    except OSError as error:
        logger.warning("preemption marker %s could not be written: %s", marker, error)


def handed_over(result: dict[str, Any] | None) -> int | None:
    """The step a trainer's return value says it checkpointed at before handing over to a new node, if it did."""
    return result.get(PREEMPTED) if isinstance(result, dict) else None


def drain_switch(depth: int, layout: Any) -> Callable[[dict[str, float]], None] | None:
    """The testing hook of :data:`DRAIN_ENV` for the iteration of ``depth`` (rank 0's log hook calls it): at the step,
    drain this worker's node as a spot reclaim would, once per run directory (the marker file names the node), then
    give Ray Train's preemption watcher time to pass the notice on (``RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S``)."""
    target = os.environ.get(DRAIN_ENV, "")
    if not target or int(target.split(":")[0]) != depth:
        return None
    at_step = int(target.split(":")[1])
    marker = layout.join("checkpoints", f".drain-injected-{depth}")

    def maybe_drain(record: dict[str, float]) -> None:
        if record.get("step") != at_step or layout.fs.exists(marker):
            return
        context = ray.get_runtime_context()
        layout.fs.pipe_file(marker, f"{context.get_node_id()}\n".encode())
        subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "drain-node", "--address", context.gcs_address,
                        "--node-id", context.get_node_id(), "--reason", "DRAIN_NODE_REASON_PREEMPTION",
                        "--reason-message", "segprop test: spot reclaim",
                        "--deadline-remaining-seconds", str(DRAIN_DEADLINE_S)], check=True, capture_output=True)
        time.sleep(4 * float(os.environ.get("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", 5.0)) + 2.0)

    return maybe_drain
