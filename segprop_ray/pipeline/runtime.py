"""Connecting to Ray: an existing cluster (config address or ``RAY_ADDRESS``) or a local one started here.

Also keeps a successful run's console to what the run says itself: Ray Data's INFO lines (execution
plans, logged progress) go to its log files only, and Ray Train's per-report INFO line is dropped in
the workers; warnings and errors still show.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import socket
from typing import TYPE_CHECKING, Any, Iterator

import ray

if TYPE_CHECKING:  # a worker process loads this module for its setup hook: keep it light
    from segprop_ray.config import Config

# Non-secret settings a job on a remote cluster needs to reach the same storage; `segprop submit` ships
# them in the job's runtime env (credentials stay with the cluster's own environment: instance roles,
# mounted secrets). A local Ray started here passes the whole environment to its workers anyway.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
                 "AWS_EC2_METADATA_DISABLED", "HF_HUB_OFFLINE", "SEGPROP_CACHE")

API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"
"""Where Ray's State API client looks first for the dashboard (before ``RAY_ADDRESS``, then a GCS process search)."""
DASHBOARD_PORT = 8265
"""Ray's usual dashboard port, used for a local Ray when it is free (else any free port)."""
SETUP_HOOK = f"{__name__}.quiet_worker_logs"
"""Every worker process of the job runs this at start (the job's ``worker_process_setup_hook``)."""


def ray_address(cfg: Config) -> str | None:
    """The cluster to join, if any: the config's ``resources.address``, else ``RAY_ADDRESS``."""
    return cfg.resources.address or os.environ.get("RAY_ADDRESS") or None


def connect(cfg: Config) -> None:
    """Initialise Ray once per process (a no-op when already connected).

    Inside a submitted job ``RAY_ADDRESS`` names the job's cluster and the job's runtime env applies
    (merged with the setup hook's).
    """
    if ray.is_initialized():
        return
    address = ray_address(cfg)
    kwargs = dict(logging_level=logging.WARNING, log_to_driver=True, configure_logging=True,
                  runtime_env=_job_runtime_env())
    if address:
        ray.init(address=address, **kwargs)
    else:
        start_local(cfg.resources.num_cpus, **kwargs)
    quiet_driver_logs()


def start_local(num_cpus: int | None, **kwargs: Any) -> None:
    """Start a local Ray (with its dashboard on loopback) whose processes all know its State API address.

    Components that call the State API without an address, such as Ray Train's placement-group
    cleaner (a detached actor that polls ``ray.util.state.get_actor``), otherwise find the cluster by
    searching for GCS processes and fail with "Found multiple active Ray instances" whenever another
    Ray runs on the machine. The dashboard's URL is put in ``RAY_API_SERVER_ADDRESS`` (unless already
    set) while ``ray.init`` starts the raylet: Ray's processes, and every worker the raylet starts,
    inherit it. The driver's own environment is restored afterwards, so a later ``ray.init`` or Jobs
    client in this process is not sent to this cluster.
    """
    port = _dashboard_port()
    with _environ(API_SERVER_ENV, f"http://127.0.0.1:{port}"):
        # address="local": a new Ray, even where `ray start` left a cluster's address in /tmp/ray (ray.init() would
        # join that one instead, and refuse num_cpus)
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                 dashboard_port=port, **kwargs)


def quiet_driver_logs() -> None:
    """Show only warnings and errors of Ray Data on this process's console (its log files keep everything).

    Ray Data gives its ``ray.data`` logger its own console handler at INFO (``ray.data._internal.logging``,
    not reached by ``ray.init(logging_level=...)``), which logs each dataset's execution plan and, when
    stdout is not a terminal, its progress every few seconds. Its progress bars on a terminal stay.
    """
    importlib.import_module("ray.data")  # its first import configures the ``ray.data`` logger
    for handler in logging.getLogger("ray.data").handlers:
        if handler.get_name() == "console":
            handler.setLevel(logging.WARNING)


def quiet_worker_logs() -> None:
    """Worker setup hook: drop Ray Train's "Reporting training result N: ..." INFO line, one per report.

    Ray Train logs it through a logger named after its file (``logging.getLogger(__file__)`` in
    ``ray/train/v2/_internal/execution/context.py``), so ``LoggingConfig(log_level="WARNING")``, which
    filters ``ray.train.*`` names only, misses it while the worker's root logger passes INFO.
    """
    context = os.path.join(os.path.dirname(ray.__file__), "train", "v2", "_internal", "execution", "context.py")
    logging.getLogger(context).setLevel(logging.WARNING)


def _job_runtime_env() -> dict[str, Any] | None:
    """The job's runtime env: the setup hook, unless a submitted job brings its own (they would conflict)."""
    try:  # Ray's private names of the submitted job's config: if they move, keep the job's env untouched
        from ray._private.ray_constants import WORKER_PROCESS_SETUP_HOOK_ENV_VAR
        from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR
    except ImportError:
        return None
    submitted = os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR, "")
    if "worker_process_setup_hook" in submitted or WORKER_PROCESS_SETUP_HOOK_ENV_VAR in submitted:
        return None
    return {"worker_process_setup_hook": SETUP_HOOK}


def _dashboard_port() -> int:
    """:data:`DASHBOARD_PORT` if nothing listens on it on loopback, else a free port the system picks."""
    for port in (DASHBOARD_PORT, 0):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return probe.getsockname()[1]
    raise OSError("no free port for the Ray dashboard")


@contextlib.contextmanager
def _environ(name: str, value: str) -> Iterator[None]:
    """Set ``name`` to ``value`` for the duration of the block, unless it is already set."""
    if os.environ.get(name):
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)
