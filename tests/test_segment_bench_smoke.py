"""Smoke test of the segment benchmark and of the GPU moonshot script (benchmarks/gpu_moonshot.sh) as a CPU dry run
at a tiny shape, one timed step per variant: every variant runs the project's worker on what it names (the
iteration's label, what trains), the JSON records them and the Ray Train start-ups per run; it times nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LABELS = {"seg_k1": "layer 2", "seg_k4": "layers 2-3", "sub_attn": "layer 2 attn", "sub_mlp": "layer 2 mlp",
          "lora_seg": "layer 2", "lora_e2e": "E2E (all layers)", "stage1": "Stage 1 (layers 0..1 + LL)"}
"""The tiny shape has 6 layers: with p = 1 and r = 2 the middle layers are 2 and 3 (a 4-layer segment is shorter)."""


@pytest.mark.slow
def test_moonshot_script_dry_run(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "BENCH_WORK": str(tmp_path / "work"), "PYTHON": sys.executable,
           "DEVICE": "cpu", "SHAPE": "tiny", "CAP_GIB": "0", "VARIANTS": ",".join([*LABELS, "stage1_8bit"]),
           "HEAD_LOSS": "chunked",
           "BENCH_ARGS": "--seq 32 --batch 2 --steps 1 --warmup 1"}
    proc = subprocess.Popen(["bash", "benchmarks/gpu_moonshot.sh"], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=500)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    report = json.loads((out / "segment_bench.tiny.cpu.json").read_text())
    records = {record["variant"]: record for record in report["records"]}
    for name, label in LABELS.items():
        assert records[name]["label"] == label and records[name]["tokens_per_s"] > 0, name
        assert records[name]["head_loss"] == "chunked", name
    assert report["meta"]["head_loss"] == "chunked"
    trainable = {name: records[name]["trainable_params"] for name in ("seg_k1", "seg_k4", "sub_attn", "sub_mlp",
                                                                      "lora_seg")}
    assert trainable["seg_k4"] > trainable["seg_k1"] > max(trainable["sub_attn"], trainable["sub_mlp"])
    assert trainable["lora_seg"] < trainable["sub_attn"] and records["lora_seg"]["optimizer_state_bytes"] > 0
    assert "runs on CUDA only" in records["stage1_8bit"]["error"]  # no 8-bit AdamW on CPU: refused, in the record
    assert report["startups"]["mistral7b"] == {"segment_layers 1": 29, "segment_layers 2": 15, "segment_layers 4": 8,
                                               "sublayer": 57, "lora e2e": 1}


def test_head_loss_switch_reaches_the_run_config_of_every_variant(tmp_path: Path, monkeypatch) -> None:
    """``--head-loss`` is what every variant's job config says (the moonshot's 1B fused-vs-chunked rows rest on it),
    and each variant's config validates (p and r only where its mode uses them)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_setup
    import segment_bench

    for choice in ("fused", "chunked"):
        plan = bench_setup.make_plan(segment_bench.parse_args(["--shape", "tiny", "--head-loss", choice]), tmp_path)
        for name, spec in segment_bench.VARIANTS.items():
            if not spec.get("snapshot"):
                assert segment_bench.job(plan, name).cfg.training.head_loss == choice, name
    assert segment_bench.parse_args(["--shape", "tiny"]).head_loss == "auto"  # the config's own default
