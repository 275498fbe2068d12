"""One driver per run directory, with real driver processes, on file:// and on moto's S3: a second ``segprop run``
on a held run directory refuses in one line naming the holder and writes nothing; a SIGKILLed driver's lease is
taken over by the next driver. No Ray is started: the lease is taken while the run is prepared."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

from pipeline_setup import make_inputs, pipeline_config, write_config
from segprop_ray.config import load_config
from segprop_ray.pipeline.driver import Driver
from segprop_ray.storage.layout import RunLayout
from segprop_ray.storage.lease import LEASE_NAME
from segprop_ray.storage.manifest import ManifestStore

HOLD = textwrap.dedent("""
    import sys, time
    from segprop_ray.config import load_config
    from segprop_ray.pipeline.driver import Driver
    Driver(load_config(sys.argv[1])).prepare()
    print("holding", flush=True)
    time.sleep(600)
""")


def config_for(tmp_path, run_uri: str):
    model, train, evaluation = make_inputs(tmp_path)
    return write_config(tmp_path / "config.yaml", pipeline_config(run_uri, str(model), str(train), str(evaluation)))


def test_a_second_driver_refuses_in_one_line_naming_the_holder(tmp_path, run_uri):
    config = config_for(tmp_path, run_uri)
    first = Driver(load_config(str(config)))
    first.prepare()
    layout = RunLayout.open(run_uri)
    before = layout.fs.cat_file(layout.manifest)

    second = subprocess.run([sys.executable, "-m", "segprop_ray.cli", "run", str(config)], capture_output=True,
                            text=True, timeout=300)

    lines = [line for line in second.stderr.splitlines() if line.strip()]
    assert second.returncode == 2 and len(lines) == 1, second.stderr
    assert lines[0].startswith("segprop: error: run directory") and "in use by another driver" in lines[0]
    assert f"pid {os.getpid()}," in lines[0]
    assert layout.fs.cat_file(layout.manifest) == before  # nothing written by the refused driver
    first.setup.lease.release()


def test_a_killed_drivers_lease_is_taken_over_by_the_next(tmp_path, run_uri):
    config = config_for(tmp_path, run_uri)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(config)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        layout = RunLayout.open(run_uri)
        assert f'"pid": {holder.pid}' in layout.fs.cat_file(layout.join(LEASE_NAME)).decode()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    run_id = ManifestStore(layout).read().run_id

    successor = Driver(load_config(str(config)))
    successor.prepare()  # the holder's process is gone: its lease is stale at once

    assert successor.setup.lease.read_holder().pid == os.getpid()
    assert successor.manifest.run_id == run_id  # the same run, continued
    successor.setup.lease.release()
