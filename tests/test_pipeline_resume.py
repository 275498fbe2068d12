"""A driver killed with SIGKILL in the middle of a Stage 2 iteration: the same command continues the run,
retrains nothing committed, and ends with the weights an uninterrupted run gives."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pipeline_setup import BASE_DEPTH, inprocess_reference, load_config_of, make_inputs, pipeline_config, write_config
from segprop_ray.core.weights import load_tensors
from segprop_ray.storage.layout import RunLayout
from segprop_ray.storage.manifest import ManifestStore

pytestmark = pytest.mark.slow
MIDDLE = BASE_DEPTH + 1


def segprop(log, *args: str) -> subprocess.Popen:
    """``segprop ARGS`` as a separate driver process (its own local Ray), in its own process group."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-m", "segprop_ray.cli", *args], env=env, start_new_session=True,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, text=True)


def registered_checkpoint_step(layout: RunLayout, run_name: str) -> int | None:
    """The step of the latest checkpoint Ray Train's controller has registered for ``run_name``."""
    path = f"{layout.checkpoints_dir(run_name)}/checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(layout.fs.cat_file(path)).get("latest_checkpoint_result") or {}
    except (FileNotFoundError, json.JSONDecodeError):  # not yet written, or being rewritten
        return None
    return (latest.get("metrics") or {}).get("step")


def wait_for_checkpoint(layout: RunLayout, proc: subprocess.Popen, min_step: int, timeout_s: float = 240) -> int:
    """Block until layer ``MIDDLE``'s iteration has a registered checkpoint at ``min_step`` or later; returns its step."""
    deadline = time.time() + timeout_s
    store = ManifestStore(layout)
    while time.time() < deadline:
        assert proc.poll() is None, "the driver ended before Stage 2 (see its log)"
        manifest = store.read() if store.exists() else None
        record = manifest.layer(MIDDLE) if manifest else None
        if record is not None and record.status == "running":
            step = registered_checkpoint_step(layout, f"{manifest.run_id}-depth{MIDDLE}")
            if step is not None and step >= min_step:
                return step
        time.sleep(0.05)
    raise AssertionError("no Stage 2 checkpoint appeared in time")


def committed_weights(run_dir) -> dict:
    tensors = {}
    for path in sorted(run_dir.glob("layers/*.safetensors")) + sorted(run_dir.glob("exits/*/*.safetensors")):
        tensors.update({f"{path.parent.name}/{k}": v for k, v in load_tensors(path).items()})
    return tensors


def test_sigkilled_driver_resumes_without_redoing_committed_work(tmp_path):
    model, train, evaluation = make_inputs(tmp_path)
    run_dir = tmp_path / "run"
    raw = pipeline_config(str(run_dir), str(model), str(train), str(evaluation),
                          training={"max_steps": 120, "save_steps": 5, "logging_steps": 50, "max_eval_blocks": 4},
                          stage1={"max_steps": 6}, resources={"num_cpus": 2})
    config = write_config(tmp_path / "config.yaml", raw)
    layout = RunLayout.open(str(run_dir))

    first = segprop(tmp_path / "first.log", "run", str(config))
    killed_after = wait_for_checkpoint(layout, first, min_step=10)
    os.kill(first.pid, signal.SIGKILL)  # the driver dies; its local Ray (fate-shared) goes with it
    first.wait(timeout=60)
    time.sleep(2)
    try:
        os.killpg(first.pid, signal.SIGKILL)  # and anything of that session still alive
    except ProcessLookupError:
        pass
    before = ManifestStore(layout).read()
    assert before.layer(MIDDLE).status == "running" and before.layer(BASE_DEPTH).status == "done"

    second = segprop(tmp_path / "second.log", "run", str(config))
    second.wait(timeout=600)
    assert second.returncode == 0, (tmp_path / "second.log").read_text()[-3000:]

    after = ManifestStore(layout).read()
    assert after.state == "done"
    stage1_before, stage1_after = before.layer(BASE_DEPTH), after.layer(BASE_DEPTH)
    assert stage1_after.finished == stage1_before.finished and stage1_after.files == stage1_before.files
    assert after.steps["tokenize"].attempts == 1 and after.steps[f"snapshot:{BASE_DEPTH}"].attempts == 1
    resumed = after.layer(MIDDLE).metrics["resumed_from_step"]
    assert resumed is not None and resumed >= killed_after, (resumed, killed_after)

    cfg = load_config_of(str(run_dir))
    blocks = {split: info["num_blocks"] for split, info in after.tokens.items()}
    result, _ = inprocess_reference(cfg, model, layout, blocks)
    weights = committed_weights(run_dir)
    for name, tensor in result.committed.items():
        if name.startswith("model.layers."):
            index = int(name.split(".")[2])
            assert (weights[f"layers/{name}"] == tensor).all(), name
            assert index <= MIDDLE
    for name, tensor in result.exits[MIDDLE].items():
        assert (weights[f"exit-{MIDDLE}/{name}"] == tensor).all(), name
