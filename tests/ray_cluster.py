"""One local Ray for the test session (starting Ray costs seconds), with the S3 test environment in place
before it starts, so every Ray worker process inherits it, and a dashboard for Jobs API tests."""

from __future__ import annotations

import os
from dataclasses import dataclass

from s3_server import CONFLICTING_VARIABLES, S3TestServer, free_port, s3_environment


@dataclass
class LocalRay:
    """The session's Ray: its dashboard URL (for ``segprop submit``) and the S3 server it can reach."""

    dashboard_url: str
    s3: S3TestServer


def start_local_ray(s3: S3TestServer) -> LocalRay:
    """``ray.init`` with 2 CPUs, the S3 test variables exported first, and a dashboard on loopback."""
    import ray

    for name in CONFLICTING_VARIABLES:
        os.environ.pop(name, None)
    os.environ.update(s3_environment(s3.endpoint))
    # Every ray.train.report() waits for the controller's next poll of the workers (2 s by default):
    # poll faster so tests that checkpoint every few steps do not spend minutes waiting.
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.25"
    port = free_port()
    # Ray's processes find this cluster's State API by this variable, not by searching for GCS processes
    # (which fails while a test's own driver runs a second local Ray); the tests' environment does not keep it.
    before = os.environ.get("RAY_API_SERVER_ADDRESS")
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    try:
        context = ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
                           dashboard_port=port, logging_level="WARNING", log_to_driver=False)
    finally:
        if before is None:
            os.environ.pop("RAY_API_SERVER_ADDRESS", None)
        else:
            os.environ["RAY_API_SERVER_ADDRESS"] = before
    return LocalRay(f"http://{context.dashboard_url}", s3)
