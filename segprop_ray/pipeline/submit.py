"""``segprop submit``: run the pipeline on a Ray cluster through the Jobs API.

The config travels in the job's ``working_dir`` (a temporary directory holding only it), the
entrypoint is ``segprop run config.yaml`` with the same ``--set`` overrides, and the job's id is
derived from the run so a resubmission of the same run is recognisable. Token authentication:
when a token is available (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``) and
``RAY_AUTH_MODE`` is unset, the client turns token mode on, since Ray's clients do not by themselves.
"""

from __future__ import annotations

import os
import shlex
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

from segprop_ray.config import ConfigError, load_config

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
LOCAL_HOSTS = ("localhost", "::1", "0.0.0.0")
RUN_DIR_KEY = "segprop-run-dir"
"""Job metadata key naming the run directory of a submitted run (the Helm chart's RayJob sets it too)."""


def enable_token_auth_if_available() -> None:
    """Set ``RAY_AUTH_MODE=token`` for this client when a token exists and the mode is not chosen."""
    if os.environ.get("RAY_AUTH_MODE"):
        return
    token_path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if os.environ.get("RAY_AUTH_TOKEN") or token_path.is_file():
        os.environ["RAY_AUTH_MODE"] = "token"


def entrypoint(overrides: list[str], python: str | None = None) -> str:
    """The job's command line: ``segprop run config.yaml`` (or ``PYTHON -m segprop_ray.cli run ...``)."""
    command = [python, "-m", "segprop_ray.cli"] if python else ["segprop"]
    command += ["run", "config.yaml"] + [arg for o in overrides for arg in ("--set", o)]
    return shlex.join(command)


def is_local_address(address: str) -> bool:
    """Whether the dashboard ``address`` is on this machine (loopback: ``localhost``, ``127.x.x.x``, ``::1``)."""
    host = urlparse(address if "://" in address else f"http://{address}").hostname or ""
    return host.lower() in LOCAL_HOSTS or host.startswith("127.")


def check_run_dir_reachable(run_dir: str, address: str) -> None:
    """Refuse a local ``run_dir`` for a cluster elsewhere: it would be written to the head node's disk."""
    protocol = run_dir.split("://", 1)[0].lower() if "://" in run_dir else "file"
    if protocol in ("file", "local") and not is_local_address(address):
        raise ConfigError(f"run_dir {run_dir} is a local path, but the cluster at {address} is not on this machine: "
                          "its files would be lost with the cluster; use shared storage (run_dir: s3://...)")


def submit_run(config: str, address: str, overrides: list[str], wait: bool = True, working_dir: str | None = None,
               python: str | None = None, poll_s: float = 2.0) -> int:
    """Submit the run; with ``wait``, stream its logs and return 0 on success, 1 on failure."""
    cfg = load_config(config, overrides)  # bad input fails here, before Ray is imported or anything is sent
    check_run_dir_reachable(cfg.run_dir, address)
    enable_token_auth_if_available()  # before Ray is imported: it reads RAY_AUTH_MODE once, on import
    from ray.job_submission import JobSubmissionClient

    from segprop_ray.pipeline.runtime import FORWARDED_ENV

    client = JobSubmissionClient(address)
    check_no_job_for(client, cfg.run_dir, address)
    with tempfile.TemporaryDirectory() as staging:
        job_dir = Path(staging) / "job"  # a copy: the user's directory is never written to
        if working_dir is not None:
            shutil.copytree(working_dir, job_dir)
        job_dir.mkdir(exist_ok=True)
        shutil.copy(config, job_dir / "config.yaml")
        env = {key: os.environ[key] for key in FORWARDED_ENV if key in os.environ}
        job_id = client.submit_job(
            entrypoint=entrypoint(overrides, python),
            runtime_env={"working_dir": str(job_dir), "env_vars": env},
            metadata={RUN_DIR_KEY: _same_run_dir(cfg.run_dir)},
            submission_id=f"segprop-{Path(cfg.run_dir).name}-{uuid.uuid4().hex[:8]}",
        )
    print(f"submitted job {job_id} to {address} (run_dir {cfg.run_dir})")
    if not wait:
        return 0
    return follow(client, job_id, poll_s)


def check_no_job_for(client, run_dir: str, address: str) -> None:
    """Refuse when the cluster already runs (or queues) a job for ``run_dir``: two drivers on one run directory
    would fight over it (the second would stop at the driver lease, after its job started)."""
    wanted = _same_run_dir(run_dir)
    for job in client.list_jobs():
        status = str(job.status).rsplit(".", 1)[-1]
        if status not in TERMINAL and _same_run_dir((job.metadata or {}).get(RUN_DIR_KEY, "")) == wanted:
            name = job.submission_id or job.job_id
            raise ConfigError(f"the cluster at {address} already runs job {name} ({status}) for run_dir {run_dir}; "
                              f"wait for it to end or stop it (ray job stop {name}) before submitting again")


def _same_run_dir(run_dir: str) -> str:
    return run_dir.strip().rstrip("/")


def follow(client, job_id: str, poll_s: float = 2.0) -> int:
    """Print the job's new log lines until it ends; 0 if it succeeded."""
    shown = 0
    while True:
        status = str(client.get_job_status(job_id)).rsplit(".", 1)[-1]
        logs = client.get_job_logs(job_id)
        print(logs[shown:], end="", flush=True)
        shown = len(logs)
        if status in TERMINAL:
            break
        time.sleep(poll_s)
    if status == "SUCCEEDED":
        return 0
    message = (client.get_job_info(job_id).message or status).strip().splitlines()
    print(f"segprop: failed: job {job_id} {status}: {message[-1] if message else status}")
    return 1
