"""A driver killed with SIGKILL in the middle of a Stage 2 iteration: the same command continues the run,
retrains nothing committed, and ends with the weights an uninterrupted run gives: every committed tensor, every
exit's and the exported model's, bit for bit.

Both drivers run as separate processes (each with its own local Ray) in sessions of their own; whatever
happens, the test ends every process of both sessions. Its waits share one budget that fits in the test timeout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoConfig

from pipeline_setup import BASE_DEPTH, inprocess_reference, load_config_of, make_inputs, pipeline_config, write_config
from ray_cluster import child_environment, end_session
from segprop_ray.core.assemble import exit_state_dict
from segprop_ray.core.parts import ModelParts
from segprop_ray.core.weights import load_tensors
from segprop_ray.storage.layout import RunLayout
from segprop_ray.storage.manifest import ManifestStore

pytestmark = pytest.mark.slow
MIDDLE = BASE_DEPTH + 1
RUN_BUDGET_S = 700
"""Seconds for both drivers together (checkpoint wait included); the in-process reference and the checks that
follow need well under a minute, and the test's timeout is 900 s."""


def segprop(tmp_path, log_name: str, *args: str) -> subprocess.Popen:
    """``segprop ARGS`` as a separate driver process (its own local Ray) in a session of its own. ``HOME`` is the
    test's: the token ``ray.init`` creates for a new local cluster goes there, not to the host's ``~/.ray``."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = child_environment(home, RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.25")
    return subprocess.Popen([sys.executable, "-m", "segprop_ray.cli", *args], env=env, start_new_session=True,
                            stdout=(tmp_path / log_name).open("w"), stderr=subprocess.STDOUT, text=True)


def registered_checkpoint_step(layout: RunLayout, run_name: str) -> int | None:
    """The step of the latest checkpoint Ray Train's controller has registered for ``run_name``."""
    path = f"{layout.checkpoints_dir(run_name)}/checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(layout.fs.cat_file(path)).get("latest_checkpoint_result") or {}
    except (FileNotFoundError, json.JSONDecodeError):  # not yet written, or being rewritten
        return None
    return (latest.get("metrics") or {}).get("step")


def wait_for_checkpoint(layout: RunLayout, proc: subprocess.Popen, min_step: int, deadline: float) -> int:
    """Block until layer ``MIDDLE``'s iteration has a registered checkpoint at ``min_step`` or later; returns its step."""
    store = ManifestStore(layout)
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the driver ended before Stage 2 (see its log)"
        manifest = store.read() if store.exists() else None
        record = manifest.layer(MIDDLE) if manifest else None
        if record is not None and record.status == "running":
            step = registered_checkpoint_step(layout, f"{manifest.run_id}-depth{MIDDLE}")
            if step is not None and step >= min_step:
                return step
        time.sleep(0.05)
    raise AssertionError("no Stage 2 checkpoint appeared in time")


def left(deadline: float) -> float:
    """Seconds left before ``deadline`` (at least one, so an overrun fails in a wait, not before it)."""
    return max(deadline - time.monotonic(), 1.0)


def files_under(run_dir, pattern: str) -> dict[str, dict[str, torch.Tensor]]:
    """{directory name: every tensor of its safetensors files} for the directories matching ``pattern``."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for path in sorted(run_dir.glob(f"{pattern}/*.safetensors")):
        found.setdefault(path.parent.name, {}).update(load_tensors(path))
    return found


def assert_identical(stored: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], where: str) -> None:
    """The same tensor names, and every tensor of the same dtype and bits."""
    assert sorted(stored) == sorted(expected), where
    for name, tensor in expected.items():
        assert stored[name].dtype == tensor.dtype and torch.equal(stored[name], tensor), f"{where}: {name}"


def test_sigkilled_driver_resumes_without_redoing_committed_work(tmp_path):
    model, train, evaluation = make_inputs(tmp_path)
    run_dir = tmp_path / "run"
    raw = pipeline_config(str(run_dir), str(model), str(train), str(evaluation),
                          training={"max_steps": 60, "save_steps": 5, "logging_steps": 50, "max_eval_blocks": 4},
                          stage1={"max_steps": 6}, resources={"num_cpus": 2})
    config = write_config(tmp_path / "config.yaml", raw)
    layout = RunLayout.open(str(run_dir))
    deadline, drivers = time.monotonic() + RUN_BUDGET_S, []
    try:
        drivers.append(segprop(tmp_path, "first.log", "run", str(config)))
        killed_after = wait_for_checkpoint(layout, drivers[0], min_step=10, deadline=deadline)
        os.kill(drivers[0].pid, signal.SIGKILL)  # the driver dies; its local Ray (fate-shared) goes with it
        end_session(drivers[0], grace_s=0)  # and anything of its session still alive
        before = ManifestStore(layout).read()
        assert before.layer(MIDDLE).status == "running" and before.layer(BASE_DEPTH).status == "done"

        drivers.append(segprop(tmp_path, "second.log", "run", str(config)))
        drivers[1].wait(timeout=left(deadline))
        assert drivers[1].returncode == 0, (tmp_path / "second.log").read_text()[-3000:]
    finally:
        for driver in drivers:
            end_session(driver)

    after = ManifestStore(layout).read()
    assert after.state == "done" and after.final_depth == MIDDLE
    stage1_before, stage1_after = before.layer(BASE_DEPTH), after.layer(BASE_DEPTH)
    assert stage1_after.finished == stage1_before.finished and stage1_after.files == stage1_before.files
    assert after.steps["tokenize"].attempts == 1 and after.steps[f"snapshot:{BASE_DEPTH}"].attempts == 1
    resumed = after.layer(MIDDLE).metrics["resumed_from_step"]
    assert resumed is not None and resumed >= killed_after, (resumed, killed_after)

    cfg = load_config_of(str(run_dir))
    blocks = {split: info["num_blocks"] for split, info in after.tokens.items()}
    result, _ = inprocess_reference(cfg, model, layout, blocks)
    parts = ModelParts(AutoConfig.from_pretrained(model))
    head = tuple(path + "." for path in parts.layout.head_paths())  # committed with each exit, in exits/
    layers = {name: tensor for name, tensor in result.committed.items() if not name.startswith(head)}
    assert_identical(files_under(run_dir, "layers")["layers"], layers, "layers/")
    exits = files_under(run_dir, "exits/exit-*")
    assert sorted(exits) == [f"exit-{depth}" for depth in sorted(result.exits)]
    for depth, tensors in result.exits.items():
        assert_identical(exits[f"exit-{depth}"], tensors, f"exits/exit-{depth}/")
    exported = exit_state_dict(result.plan, parts.layout, MIDDLE, result.committed, result.exits[MIDDLE])
    assert_identical(files_under(run_dir, "export/exit-*")[f"exit-{MIDDLE}"], exported, f"export/exit-{MIDDLE}/")
