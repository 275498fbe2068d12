"""Settings and checks of the cluster a run is on, applied by the driver once connected.

- Ray Train's worker-group start timeout (``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S``, 60 s in Ray) is
  raised for GPU pools that scale up from zero and pull a large image: set in the driver's environment,
  Ray Train propagates it to its controller (``get_env_vars_to_propagate``).
- A local ``run_dir`` is refused on a cluster of more than one node (each node would write to its own
  disk), and on a head that offers no CPU (its workers are still to come: a KubeRay head with
  ``num-cpus: 0``); checked at start and again before every Ray job the driver launches, since nodes
  join an autoscaling cluster later (one ``ray.nodes()`` call; nothing for a remote ``run_dir``).
- The CPU work of Ray Data jobs (the tokenize job's reads and tokenizer actors) is sent to the CPU group
  by Ray Data's per-dataset label selector.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import ray

from segprop_ray.config import Config, ConfigError
from segprop_ray.storage.fs import split_protocol

START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
DEFAULT_START_TIMEOUT_S = 900.0
"""Long enough for a GPU node to be provisioned and a multi-GB image pulled."""
HEAD_RESOURCE = "node:__internal_head__"
"""The resource only Ray's head node has (Ray Train pins its own state actor with it)."""


def apply_train_settings(cfg: Config) -> str:
    """Set the worker-group start timeout in this process for Ray Train to pass on; returns the value in force.

    ``resources.worker_group_start_timeout_s`` wins; without it an operator's own environment variable stays,
    else :data:`DEFAULT_START_TIMEOUT_S`.
    """
    chosen = cfg.resources.worker_group_start_timeout_s
    if chosen is None and os.environ.get(START_TIMEOUT_ENV):
        return os.environ[START_TIMEOUT_ENV]
    os.environ[START_TIMEOUT_ENV] = f"{chosen or DEFAULT_START_TIMEOUT_S:g}"
    return os.environ[START_TIMEOUT_ENV]


def check_cluster(cfg: Config, when: str = "") -> None:
    """Refuse, in one line, a local ``run_dir`` that the cluster's nodes cannot share (``when``: the moment checked,
    e.g. ``before the tokenize job``, for the message)."""
    if split_protocol(cfg.run_dir)[0] != "file":
        return
    alive = [node for node in ray.nodes() if node.get("Alive")]
    if len(alive) > 1:
        joined = f" {when}" if when else ""
        raise ConfigError(f"run_dir {cfg.run_dir} is a local path, but the Ray cluster has {len(alive)} nodes{joined}: "
                          "each would write its own disk; use shared storage (run_dir: s3://...)")
    if alive and not alive[0].get("Resources", {}).get("CPU"):
        raise ConfigError(f"run_dir {cfg.run_dir} is a local path, but the Ray cluster's only node offers no CPU "
                          "(its workers are still to join); use shared storage (run_dir: s3://...)")


@contextlib.contextmanager
def data_label_selector(selector: dict[str, str]) -> Iterator[None]:
    """Within the block, every Ray Data task and actor also needs the node labels ``selector`` (operator-level
    selectors win on a shared key); the DataContext's own selector is restored after."""
    options = ray.data.DataContext.get_current().execution_options
    before = options.label_selector
    if selector:
        options.label_selector = {**(before or {}), **selector}
    try:
        yield
    finally:
        options.label_selector = before
