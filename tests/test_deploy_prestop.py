"""The workers' preStop hook, rendered from the chart and run with bash: it drains the node, then ends when every
preemption notice's checkpoint is saved (or its worker is gone), at once when nothing trains there, and always
within its budget. ``ray`` is a stub on PATH; the node's processes a fake proc directory."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

import deploy_checks as dc
from segprop_ray.pipeline.preemption import PREEMPT_DIR_ENV, checkpoint_at_notice, preemption_watch


@pytest.fixture(scope="module")
def trainer():
    """The trainer group's container as the default values render it."""
    job = dc.the_job(dc.manifests(dc.render_chart()))
    return dc.worker_group(job, "trainer")["template"]["spec"]["containers"][0]


@pytest.fixture
def node(tmp_path, trainer):
    """Runs the hook against a stub ``ray``, marker and proc directories under ``tmp_path``; returns (seconds, calls)."""
    stub = tmp_path / "bin" / "ray"
    stub.parent.mkdir()
    stub.write_text(f'#!/bin/bash\necho "$@" >> {tmp_path}/ray-calls\n')
    stub.chmod(0o755)
    (tmp_path / "proc").mkdir()
    env_of = {e["name"]: e.get("value") for e in trainer["env"]}
    script = trainer["lifecycle"]["preStop"]["exec"]["command"][-1]

    def run_hook() -> tuple[float, str]:
        env = {**os.environ, "PATH": f"{stub.parent}:{os.environ['PATH']}", "SEGPROP_PROC_ROOT": str(tmp_path / "proc"),
               "SEGPROP_PREEMPT_DIR": str(tmp_path / "marks")}
        started = time.monotonic()
        subprocess.run(["bash", "-c", script], env=env, check=True, timeout=120)
        return time.monotonic() - started, (tmp_path / "ray-calls").read_text()

    assert env_of[PREEMPT_DIR_ENV] and int(script.split("budget=")[1].split()[0]) >= 30
    return run_hook


def worker(tmp_path: Path, pid: int, cmdline: str = "ray::RayTrainWorker.run_train_fn") -> None:
    (tmp_path / "proc" / str(pid)).mkdir()
    (tmp_path / "proc" / str(pid) / "cmdline").write_bytes(cmdline.encode() + b"\0")


def notice(tmp_path: Path, pid: int, step: int) -> Path:
    (tmp_path / "marks").mkdir(exist_ok=True)
    marker = tmp_path / "marks" / f"{pid}-{step}.notice"
    marker.write_text(f"{pid}\n")
    return marker.with_suffix(".saved")


def test_the_hook_ends_soon_after_the_checkpoint_is_saved(tmp_path, node):
    worker(tmp_path, 4242)
    saved = notice(tmp_path, 4242, 7)
    threading.Timer(4.0, saved.write_text, args=("4242\n",)).start()

    seconds, calls = node()

    assert 4.0 <= seconds < 7.0  # waited for the saved marker, not for the busy worker or the budget
    assert "drain-node" in calls and "DRAIN_NODE_REASON_PREEMPTION" in calls


def test_the_hook_ends_at_once_without_notice_and_workers(tmp_path, node):
    worker(tmp_path, 11, "ray::IDLE")
    seconds, _ = node()
    assert seconds < 2.0


def test_a_notice_whose_worker_is_gone_does_not_hold_the_hook(tmp_path, node):
    notice(tmp_path, 999, 3)  # no process 999 on the node any more
    seconds, _ = node()
    assert seconds < 2.0


class Notice:
    preempted_node_to_ranks = {"node-a": [0]}
    deadline_ms = 120_000


def test_a_training_worker_marks_the_notice_and_then_the_saved_checkpoint(tmp_path, monkeypatch):
    import ray.train

    monkeypatch.setenv(PREEMPT_DIR_ENV, str(tmp_path / "marks"))
    monkeypatch.setattr(ray.train, "get_preemption_info", lambda: Notice())
    loop = type("Loop", (), {"state": type("State", (), {"step": 5})()})()
    base = tmp_path / "marks" / f"{os.getpid()}-5"

    assert preemption_watch(every_steps=5)(loop) is True
    assert base.with_suffix(".notice").read_text() == f"{os.getpid()}\n"
    reported = []
    checkpoint_at_notice(5, 4, lambda: reported.append(base.with_suffix(".saved").exists()))
    assert reported == [False] and base.with_suffix(".saved").exists()  # saved only once the report returned

    checkpoint_at_notice(8, 4, lambda: reported.append("again"))  # a save step's checkpoint is already reported
    assert reported == [False] and not (tmp_path / "marks" / f"{os.getpid()}-8.saved").exists()


def test_no_markers_without_the_directory(tmp_path, monkeypatch):
    monkeypatch.delenv(PREEMPT_DIR_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    checkpoint_at_notice(5, 4, lambda: None)
    assert list(tmp_path.iterdir()) == []


def test_markers_left_by_an_earlier_notice_do_not_end_the_hook_before_todays_checkpoint(tmp_path, node):
    """Every rank sees every notice, so a node keeps saved markers of workers long gone: the hook must wait for the
    worker training now, through its notice, to its own saved marker."""
    notice(tmp_path, 501, 4).write_text("501\n")  # an earlier notice, saved, its worker gone
    worker(tmp_path, 4343)
    saved = None

    def todays_notice() -> None:
        nonlocal saved
        saved = notice(tmp_path, 4343, 9)
        threading.Timer(2.0, lambda: saved.write_text("4343\n")).start()

    threading.Timer(2.0, todays_notice).start()

    seconds, _ = node()

    assert 4.0 <= seconds < 7.5  # the notice after 2 s, its checkpoint saved 2 s later
