"""One local Ray for the test session (starting Ray costs seconds), with the S3 test environment in place
before it starts, so every Ray worker process inherits it; and, for tests that need a cluster with settings of
its own (token authentication on or off), a Ray head started by ``ray start`` in a child process."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

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
    # ray.init turns token authentication on for a new local cluster (Ray 2.59+) and takes the token from
    # RAY_AUTH_TOKEN before ~/.ray/auth_token, which it would otherwise create: with a token of the session's own,
    # the host's ~/.ray is neither read nor written. Drivers that tests start from here inherit it.
    os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
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


# --- a cluster of its own: `ray start --head --block` in a child process --------------------------

RAY_CLIENT_VARIABLES = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
                        "RAY_AUTH_TOKEN_PATH")
"""Variables that choose a Ray cluster or its authentication: a child process gets only the ones a test gives it."""
HEAD_PORT_OPTIONS = ("--port", "--ray-client-server-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                     "--runtime-env-agent-port", "--metrics-export-port", "--node-manager-port", "--object-manager-port")
"""``ray start`` ports given a free port each (several default to fixed numbers another Ray may hold)."""


def child_environment(home: Path, **variables: str) -> dict[str, str]:
    """This process's environment for a child: no Ray address or auth variable, ``HOME`` (where Ray looks for
    ``~/.ray/auth_token``) set to ``home``, then ``variables``. The host's own ``~/.ray`` is never read or written."""
    env = {key: value for key, value in os.environ.items() if key not in RAY_CLIENT_VARIABLES}
    return {**env, "HOME": str(home), "PYTHONUNBUFFERED": "1", **variables}


def end_session(proc: subprocess.Popen, grace_s: float = 30) -> None:
    """End ``proc`` (started with ``start_new_session=True``) and every process left in its group: SIGTERM to
    ``proc`` (a Ray head or driver then shuts its processes down), up to ``grace_s`` for it to exit, then SIGKILL
    to the whole group."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # the group is gone
        pass
    proc.wait()


@contextlib.contextmanager
def cluster_process(env: dict[str, str], log: Path, start_timeout_s: float = 120) -> Iterator[str]:
    """A Ray head (2 CPUs, dashboard on loopback) run by ``ray start --block`` with ``env``, as a cluster is
    deployed; yields the dashboard URL, and on exit ends every process of the child's session.

    Its own temporary directory holds the address file that ``ray start`` writes and Ray's job supervisor
    reads: without one, a submitted job's driver joins whichever Ray of the machine it finds first. Every
    port is chosen here, as other Rays may hold the default ones.
    """
    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="segprop-ray-")  # short: Ray's socket paths live under it
    # The State API address keeps this cluster's processes (Ray Train's placement-group cleaner) off any other Ray;
    # no drain on SIGTERM (30 s by default): the test ends the cluster when its jobs are done.
    env = {**env, "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    ports = {option: str(free_port()) for option in HEAD_PORT_OPTIONS}
    command = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--num-cpus=2",
               "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={port}",
               f"--temp-dir={temp_dir}", "--disable-usage-stats", *(f"{k}={v}" for k, v in ports.items())]
    with log.open("w") as output:
        proc = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for_dashboard(url, proc, log, start_timeout_s)
        yield url
    finally:
        end_session(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_dashboard(url: str, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    """Block until the dashboard answers HTTP (any status: it may refuse a request without a token)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"ray start ended: {log.read_text()[-3000:]}"
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=5).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"the dashboard at {url} did not answer within {timeout_s} s: {log.read_text()[-3000:]}")
