"""Smoke test of the training-step benchmark (benchmarks/segprop_bench.py): a tiny shape, one timed step per
variant, everything in one process with Ray made unimportable (the GPU machine it is meant for has no Ray).
It checks the JSON's shape and that the Stage 2 worker really reads SnapCheck shards; it times nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ["e2e", "seg_snap", "seg_recompute", "lw_snap", "snap_write", "read_shards", "seg_snap@p1",
           "seg_recompute@p1"]
REFERENCE = ["e2e", "e2e_ac", "seg_snap", "seg_recompute", "lw_snap", "snap_write_1layer_d2h", "seg_snap@p1",
             "seg_recompute@p1"]

RUN_WITHOUT_RAY = """
import runpy, sys
class NoRay:
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("ray is hidden in this test")
sys.meta_path.insert(0, NoRay())
sys.argv = ["segprop_bench.py", *sys.argv[1:]]
runpy.run_path("benchmarks/segprop_bench.py", run_name="__main__")
assert not any(m == "ray" or m.startswith("ray.") for m in sys.modules)
"""


def test_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    args = ["--shape", "tiny", "--seq", "32", "--batch", "2", "--steps", "1", "--warmup", "1", "--isolate", "none",
            "--threads", "1", "--work-dir", str(tmp_path / "work"), "--out", str(out)]
    proc = subprocess.run([sys.executable, "-c", RUN_WITHOUT_RAY, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
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


def test_head_loss_bench_smoke(tmp_path: Path) -> None:
    """The head-loss comparison runs without Ray and shows the chunked loss allocating less than the plain one."""
    out = tmp_path / "head.json"
    args = ["--repeats", "1", "--chunks", "256,0", "--out", str(out)]
    script = RUN_WITHOUT_RAY.replace("segprop_bench.py", "bench_head_loss.py")
    proc = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    records = {r["variant"]: r for r in json.loads(out.read_text())["records"]}
    plain, small = records["plain"], records["chunked 256"]
    logits_bytes = 1024 * 8192 * 4
    assert plain["peak_bytes"] >= 2 * logits_bytes  # fp32 logits and their log-softmax at least
    assert small["peak_bytes"] < plain["peak_bytes"] - logits_bytes
    assert small["loss_abs_diff"] < 1e-4 and max(small["grad_rel_diff"]) < 1e-2
