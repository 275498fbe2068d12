"""Shared fixtures: a moto S3 server per session, a fresh bucket per test, ``run_uri`` over file:// and s3://; and the
check that a run meant for another transformers (``make test-compat``) imported it."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from s3_server import CONFLICTING_VARIABLES, S3TestServer, s3_environment

EXPECT_TRANSFORMERS = "SEGPROP_EXPECT_TRANSFORMERS"
"""Set by ``make test-compat``: the transformers version the run must import (else it stops before any test)."""


def pytest_sessionstart(session: pytest.Session) -> None:
    """Stop the run if it imported another transformers than ``SEGPROP_EXPECT_TRANSFORMERS`` names."""
    expected = os.environ.get(EXPECT_TRANSFORMERS)
    if not expected:
        return
    import transformers

    if transformers.__version__ != expected:
        pytest.exit(f"{EXPECT_TRANSFORMERS}={expected}, but this run imported transformers {transformers.__version__} "
                    f"from {os.path.dirname(transformers.__file__)} (is PYTHONPATH shadowing the venv's?)", returncode=1)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3TestServer]:
    """moto's standalone S3 server on 127.0.0.1, started once per session."""
    server = S3TestServer.start()
    yield server
    server.stop()


def _clear_s3fs_cache() -> None:
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3_env(s3_server: S3TestServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The standard AWS environment pointing at the test server (returns its endpoint URL)."""
    for name in CONFLICTING_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_environment(s3_server.endpoint).items():
        monkeypatch.setenv(name, value)
    _clear_s3fs_cache()
    yield s3_server.endpoint
    _clear_s3fs_cache()


@pytest.fixture
def s3_bucket(s3_env: str, s3_server: S3TestServer) -> str:
    """A fresh, empty bucket on the test server."""
    name = f"segprop-test-{uuid.uuid4().hex[:12]}"
    s3_server.create_bucket(name)
    return name


@pytest.fixture(params=["file", "s3"])
def run_uri(request: pytest.FixtureRequest, tmp_path) -> str:
    """A run directory URI: ``file://<tmp>/run`` or ``s3://<fresh bucket>/run`` on the test server."""
    if request.param == "file":
        return (tmp_path / "run").as_uri()
    return f"s3://{request.getfixturevalue('s3_bucket')}/run"


@pytest.fixture
def run_layout(run_uri: str):
    """The :class:`RunLayout` of ``run_uri`` (file:// or s3://)."""
    from segprop_ray.storage.layout import RunLayout

    return RunLayout.open(run_uri)


@pytest.fixture(scope="session")
def local_ray(s3_server: S3TestServer):
    """A local Ray for the session (2 CPUs, dashboard on loopback) that can reach the S3 test server."""
    import ray

    from ray_cluster import start_local_ray

    cluster = start_local_ray(s3_server)
    yield cluster
    ray.shutdown()
