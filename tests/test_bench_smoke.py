"""Smoke test of the GPU check (benchmarks/gpu_check.sh) as a CPU dry run: the script itself, the head-loss
comparison and the training-step benchmark at a tiny shape, one timed step per variant, with Ray made
unimportable in every Python process it starts (the GPU machine it is meant for has no Ray). It checks
the JSON's shape, that the Stage 2 worker really reads SnapCheck shards, and the chunked loss's memory;
it times nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ["e2e", "seg_snap", "seg_recompute", "lw_snap", "snap_write", "read_shards", "seg_snap@p1",
           "seg_recompute@p1"]
REFERENCE = ["e2e", "e2e_ac", "seg_snap", "seg_recompute", "lw_snap", "snap_write_1layer_d2h", "seg_snap@p1",
             "seg_recompute@p1"]

HIDE_RAY = """
import sys
class NoRay:
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("ray is hidden in this test")
sys.meta_path.insert(0, NoRay())
"""


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path: Path) -> None:
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HIDE_RAY)  # imported at start-up by every Python the script runs
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "BENCH_WORK": str(tmp_path / "work"), "PYTHON": sys.executable,
           "DEVICE": "cpu", "HEAD_SHAPE": "cpu_small", "PYTHONPATH": str(hook),
           "BENCH_ARGS": "--seq 32 --batch 2 --steps 1 --warmup 1 --isolate none --threads 1"}
    proc = subprocess.Popen(["bash", "benchmarks/gpu_check.sh", "tiny"], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=400)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the script's timeout/python/tee children too
        stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert "ray is hidden" not in stdout + stderr
    head_loss(json.loads((out / "head_loss.cpu_small.cpu.json").read_text()))
    out = out / "segprop_bench.tiny.cpu.json"
    report = json.loads(out.read_text())
    records = {(r["impl"], r["variant"]): r for r in report["records"]}
    for impl, names in (("project", PROJECT), ("reference", REFERENCE)):
        for name in names:
            assert records[(impl, name)]["tokens_per_s"] > 0, (impl, name)

    seg = records[("project", "seg_snap")]
    assert seg["stage"] == "stage2" and seg["steps_run"] == 3  # warm-up, timed, and the profiled step
    assert len(seg["step_s"]) == 1  # the profiled step is not timed
    assert seg["fed"]["batches"] == seg["fed"]["with_hidden"] == 3  # every micro-batch came with S[p] from shards
    assert seg["fed"]["hidden_bytes"] == 3 * 2 * 32 * 64 * 2  # 3 batches of (2, 32, 64) bf16
    # the CPU tensor peak: fp32 weights + AdamW moments alive at the step's start, then the step's own tensors
    assert seg["live_tensor_bytes"] >= 12 * seg["trainable_params"]
    assert seg["tensor_peak_bytes"] > seg["live_tensor_bytes"] + seg["activation_bytes"] // 2
    assert seg["loop_data_wait_s"] > 0 and "data_wait_s" in seg["manifest_metrics"]
    assert 0 <= seg["data_wait_share"] < 1
    assert records[("project", "e2e")]["fed"]["with_hidden"] == 0  # E2E reads token shards only
    assert records[("project", "read_shards")]["bytes_read"] > 0
    assert records[("project", "snap_write")]["files"] >= 1

    assert {row["variant"] for row in report["rows"]} >= {"e2e", "seg_snap", "seg_recompute", "lw_snap", "snap_write"}
    assert [row["prefix"] for row in report["depth_scaling"]] == [1, 2]
    assert len(report["goals"]) == 4 and len(report["manifest_check"]) == 4
    memory = next(goal for goal in report["goals"] if "budget_bytes" in goal)
    assert memory["peak_bytes"] == seg["tensor_peak_bytes"] and memory["rss_peak_bytes"] > 0


def head_loss(report: dict) -> None:
    """The chunked loss allocates less than the plain one, and computes the same thing."""
    records = {r["variant"]: r for r in report["records"]}
    plain, small = records["plain"], records["chunked 256"]
    logits_bytes = 1024 * 8192 * 4
    assert plain["peak_bytes"] >= 2 * logits_bytes  # fp32 logits and their log-softmax at least
    assert small["peak_bytes"] < plain["peak_bytes"] - logits_bytes
    assert small["loss_abs_diff"] < 1e-4 and max(small["grad_rel_diff"]) < 1e-2


@pytest.mark.slow
def test_gpu_snapcheck_dry_run(tmp_path: Path) -> None:
    """benchmarks/gpu_snapcheck.sh at a tiny shape on CPU, Ray hidden: the snapshot and reader figures of each
    step come out in one JSON per step (8 files at most come back from a device call), S3 through moto included."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HIDE_RAY)
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "BENCH_WORK": str(tmp_path / "work"), "PYTHON": sys.executable,
           "DEVICE": "cpu", "SHAPES": "tiny", "PYTHONPATH": str(hook), "IO_ARGS": "--seq 64 --total-mb 8",
           "BENCH_ARGS": "--seq 32 --batch 2 --steps 1 --warmup 1 --isolate none --threads 1"}
    proc = subprocess.run(["bash", "benchmarks/gpu_snapcheck.sh"], cwd=ROOT, env=env, text=True, capture_output=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ray is hidden" not in proc.stdout + proc.stderr
    names = sorted(path.name for path in out.iterdir())
    assert names == ["gpu_snapcheck.log", "shard_io.h2048.cpu.json", "shard_io.h4096.cpu.json",
                     "snapcheck.tiny.cpu.json", "snapcheck2.tiny.cpu.json"]
    report = json.loads((out / "snapcheck.tiny.cpu.json").read_text())
    snap = report["snapcheck"]
    write = snap["snap_write"]["snap_write"]
    assert len(write["ratio_to_reference_per_repeat"]) == 1 and write["time_vs_raw_copy_per_repeat"][0] > 0
    assert [row["step"] for row in snap["read_shards"]] == ["project lw_snap", "project seg_snap", "reference lw_snap",
                                                           "reference seg_snap"]
    two = {r["variant"]: r for r in json.loads((out / "snapcheck2.tiny.cpu.json").read_text())["records"]}
    assert two["snap_write"]["files_at_once"] == 2
    io = json.loads((out / "shard_io.h4096.cpu.json").read_text())
    assert {(r["target"], r["layout"], r["op"]) for r in io["results"]} >= {("local", "fsb", "write"), ("s3", "fsb", "read")}
