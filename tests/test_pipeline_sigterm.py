"""A driver stopped by SIGTERM (KubeRay stopping a RayJob, ``kill``), before it has connected to Ray or in the middle
of a job: it exits with 128 + 15 and one line, releases its run directory's lease (the file is gone) and records why
it stopped in the manifest, so the next driver starts at once, with no LeaseHeld, and continues the same run.

The drivers run as separate processes in sessions of their own; the tests end every process of those sessions
whatever happens."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import pytest

from pipeline_setup import make_inputs, pipeline_config, write_config
from ray_cluster import child_environment, end_session
from segprop_ray.config import load_config
from segprop_ray.pipeline.driver import Driver
from segprop_ray.storage.layout import RunLayout
from segprop_ray.storage.lease import LEASE_NAME
from segprop_ray.storage.manifest import ManifestStore

pytestmark = pytest.mark.slow
START_BUDGET_S = 300
"""Seconds for the driver to start its local Ray and its first job on a loaded 2-core machine."""


CONNECTING = textwrap.dedent("""
    import sys, time
    from segprop_ray import cli
    from segprop_ray.pipeline import driver

    def connect(cfg):  # a Ray cluster slow to answer: the run directory is held, Ray not connected yet
        print("connecting", flush=True)
        time.sleep(600)

    driver.connect = connect
    sys.exit(cli.main(["run", sys.argv[1]]))
""")


def start_driver(tmp_path, config, log, *command: str) -> subprocess.Popen:
    """A driver process (``python COMMAND CONFIG``) in a session of its own, its output in ``log``."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return subprocess.Popen([sys.executable, *command, str(config)], env=child_environment(home),
                            start_new_session=True, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True)


def assert_stopped_and_free(proc: subprocess.Popen, log, layout: RunLayout, config) -> None:
    """The driver exited with 128 + 15 and one line, released its lease and recorded the stop; the next driver
    starts at once on the same run."""
    output = log.read_text()
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert output.rstrip().splitlines()[-1] == "segprop: stopped by SIGTERM; run the same command again to continue"
    assert not layout.fs.exists(layout.join(LEASE_NAME))  # released, not left to go stale
    stopped = ManifestStore(layout).read()
    assert stopped.state == "failed" and "stopped by SIGTERM" in stopped.error, stopped.error

    started = time.monotonic()
    successor = Driver(load_config(str(config)))
    successor.prepare()  # no LeaseHeld: the run directory is free
    try:
        assert time.monotonic() - started < 60
        assert successor.manifest.run_id == stopped.run_id  # the same run, continued
        assert successor.setup.lease.read_holder().lease == successor.setup.lease.holder.lease
    finally:
        successor.setup.lease.release()


def config_for(tmp_path):
    model, train, evaluation = make_inputs(tmp_path)
    raw = pipeline_config(str(tmp_path / "run"), str(model), str(train), str(evaluation), resources={"num_cpus": 2})
    return write_config(tmp_path / "config.yaml", raw), RunLayout.open(str(tmp_path / "run"))


def terminate_when_ready(tmp_path, driver_args: tuple[str, ...], wait_ready, stop_timeout_s: float) -> None:
    """Start a driver (``driver_args``), wait with ``wait_ready(layout, driver, log, deadline)``, check it holds the
    lease, SIGTERM it, end whatever it started, and check it stopped cleanly and freed the run directory."""
    config, layout = config_for(tmp_path)
    log = tmp_path / "driver.log"
    driver = start_driver(tmp_path, config, log, *driver_args)
    try:
        wait_ready(layout, driver, log, time.monotonic() + START_BUDGET_S)
        assert layout.fs.exists(layout.join(LEASE_NAME))
        driver.send_signal(signal.SIGTERM)
        driver.wait(timeout=stop_timeout_s)
    finally:
        end_session(driver)
    assert_stopped_and_free(driver, log, layout, config)


def wait_until_connecting(_layout: RunLayout, proc: subprocess.Popen, log, deadline: float) -> None:
    """Block until the driver says it is connecting to Ray."""
    while "connecting" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)


def test_a_sigterm_before_ray_is_connected_releases_the_lease(tmp_path):
    terminate_when_ready(tmp_path, ("-c", CONNECTING), wait_until_connecting, stop_timeout_s=60)


def wait_until_a_job_runs(layout: RunLayout, proc: subprocess.Popen, log, deadline: float) -> str:
    """Block until the driver has started a step or an iteration (its Ray is up); returns its name."""
    store = ManifestStore(layout)
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the driver ended before its first job: {log.read_text()[-3000:]}"
        manifest = store.read() if store.exists() else None
        running = [name for name, step in (manifest.steps if manifest else {}).items() if step.status == "running"]
        running += [f"layer {key}" for key, layer in (manifest.layers if manifest else {}).items()
                    if layer.status == "running"]
        if running:
            return running[0]
        time.sleep(0.05)
    raise AssertionError("the driver started no job in time")


def test_a_sigterm_in_the_middle_of_a_job_releases_the_lease_and_records_the_stop(tmp_path):
    terminate_when_ready(tmp_path, ("-m", "segprop_ray.cli", "run"), wait_until_a_job_runs, stop_timeout_s=120)


def test_ray_init_keeps_our_handler_and_a_library_caller_keeps_rays():
    from segprop_ray.pipeline.termination import Terminated, keep_sigterm_handler, stop_on_sigterm

    def ray_init() -> None:  # what ray.init does to the driver's SIGTERM handler
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))

    before = signal.getsignal(signal.SIGTERM)
    with keep_sigterm_handler():
        ray_init()
    assert signal.getsignal(signal.SIGTERM) is not before  # not ours to restore: Ray's stays
    signal.signal(signal.SIGTERM, before)
    with pytest.raises(Terminated, match="stopped by SIGTERM"), stop_on_sigterm():
        with keep_sigterm_handler():
            ray_init()
        signal.raise_signal(signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is before
