"""Connecting to Ray: an existing cluster (config address or ``RAY_ADDRESS``) or a local one started here."""

from __future__ import annotations

import logging
import os

import ray

from segprop_ray.config import Config

# Non-secret settings a job on a remote cluster needs to reach the same storage; `segprop submit` ships
# them in the job's runtime env (credentials stay with the cluster's own environment: instance roles,
# mounted secrets). A local Ray started here passes the whole environment to its workers anyway.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
                 "AWS_EC2_METADATA_DISABLED", "HF_HUB_OFFLINE", "SEGPROP_CACHE")


def ray_address(cfg: Config) -> str | None:
    """The cluster to join, if any: the config's ``resources.address``, else ``RAY_ADDRESS``."""
    return cfg.resources.address or os.environ.get("RAY_ADDRESS") or None


def connect(cfg: Config) -> None:
    """Initialise Ray once per process (a no-op when already connected).

    Inside a submitted job ``RAY_ADDRESS`` names the job's cluster and the job's runtime env applies.
    """
    if ray.is_initialized():
        return
    address = ray_address(cfg)
    kwargs = dict(logging_level=logging.WARNING, log_to_driver=True, configure_logging=True)
    if address:
        ray.init(address=address, **kwargs)
    else:
        # The dashboard serves the State API, which Ray Train's placement-group cleaner polls.
        ray.init(num_cpus=cfg.resources.num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", **kwargs)
