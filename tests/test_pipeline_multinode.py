"""The pipeline on a multi-node Ray (a head with no CPUs and three labelled worker nodes, two of them spot, each with
its own temporary directory and node cache; tests/multinode_run.py), with the run directory on the loopback S3
server: every kind of work runs where the config's labels send it, the model is staged once and read through each
node's cache, a local run directory is refused; the spot node running the Stage 2 trainer is drained for preemption
mid-iteration (``ray drain-node`` with a deadline, as the preStop hook does), and the iteration checkpoints at the
notice step and resumes there on the other spot node; the committed weights and the exported model equal an
undisturbed single-node run's bit for bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline_setup import make_inputs, pipeline_config
from segprop_ray.config import validate_config
from segprop_ray.pipeline.driver import Driver
from segprop_ray.storage.layout import RunLayout

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve().parent
DRAIN_DEPTH, DRAIN_STEP = 1, 3
"""The Stage 2 iteration whose node is drained, and the step (the config checkpoints every 2 steps: not one of them)."""

PLACEMENT = {
    "cpu": {"label_selector": {"segprop/pool": "cpu"}},
    "export": {"label_selector": {"segprop/pool": "cpu"}, "memory_gb": 0.25},
    "snapshot": {"label_selector": {"ray.io/market-type": "spot"},
                 "fallback_label_selectors": [{"ray.io/market-type": "on-demand"}]},
    "stage1": {"resources_per_worker": {"CPU": 1}, "label_selector": {"ray.io/market-type": "spot"}},
    "segment": {"resources_per_worker": {"CPU": 1}, "label_selector": {"ray.io/market-type": "spot"}},
}
"""Where the multi-node run sends each kind of work (the single-node run has no labels to select)."""


def run_config(bucket: str, name: str, inputs, **resources) -> dict:
    model, train, evaluation = inputs
    return pipeline_config(f"s3://{bucket}/{name}", str(model), str(train), str(evaluation),
                           evaluation={"nhsic_tokens": 0, "baseline": False}, resources=resources)


def exported(run_dir: str, depth: int) -> dict[str, bytes]:
    layout = RunLayout.open(run_dir)
    directory = layout.export_dir(f"exit-{depth}")
    return {path.rsplit("/", 1)[-1]: layout.fs.cat_file(path) for path in layout.fs.ls(directory, detail=False)
            if path.endswith((".safetensors", ".json")) and not path.endswith("segprop.json")}


def test_a_multi_node_run_places_work_by_label_survives_a_drain_and_equals_the_single_node_run(local_ray, s3_bucket,
                                                                                                tmp_path):
    inputs = make_inputs(tmp_path)
    config = tmp_path / "multinode.json"
    config.write_text(json.dumps(run_config(s3_bucket, "multi", inputs, **PLACEMENT)))
    work = tmp_path / "cluster"
    work.mkdir()
    env = {**os.environ, "SEGPROP_TEST_DRAIN_AT": f"{DRAIN_DEPTH}:{DRAIN_STEP}",
           "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "0.5"}
    done = subprocess.run([sys.executable, str(HERE / "multinode_run.py"), str(config), str(work)],
                          capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads((work / "result.json").read_text())

    assert result["nodes"] == ["cpu", "head", "spot-a", "spot-b"]
    assert result["refusal"].startswith("ConfigError: run_dir ") and "the Ray cluster has 4 nodes" in result["refusal"]
    where = result["placements"]
    assert where["trainer"] == ["spot-a", "spot-b"]  # Stage 1 and the segment trainers: on the spot nodes only
    assert set(where["snapshot"]) <= {"spot-a", "spot-b"}
    assert where["tokenize"] == where["export"] == where["stage"] == ["cpu"]  # CPU work off the trainer nodes
    assert where["board"] == ["head"]
    manifest = result["manifest"]
    assert manifest["state"] == "done"
    assert manifest["steps"]["stage_model"]["outputs"]["uri"] == f"s3://{s3_bucket}/multi/model"
    caches = [result["caches"].get(name, []) for name in ("spot-a", "spot-b")]
    assert any(p.startswith("models/") and p.endswith("model.safetensors") for cache in caches for p in cache)
    assert any(p.startswith("weights/") for cache in caches for p in cache)  # committed layers, fetched per node

    # the drained iteration: checkpointed at the notice step (not the last save step, 2), resumed on the other node
    layout = RunLayout.open(f"s3://{s3_bucket}/multi")
    drained_id = layout.fs.cat_file(layout.join("checkpoints", f".drain-injected-{DRAIN_DEPTH}")).decode().strip()
    drained = result["node_names"][drained_id]
    assert manifest["layers"][str(DRAIN_DEPTH)]["metrics"]["resumed_from_step"] == DRAIN_STEP
    workers = result["trainer_workers"]  # Stage 1, the drained iteration's first worker, then its resumed one
    assert len(workers) == 3 and workers[1] == drained and workers[2] in {"spot-a", "spot-b"} - {drained}
    final = manifest["final_depth"]
    assert manifest["steps"][f"export:{final}"]["outputs"]["peak_rss_bytes"] > 0

    single = Driver(validate_config(run_config(s3_bucket, "single", inputs))).run()

    files = {depth: record["files"] for depth, record in manifest["layers"].items()}  # the drained layer's too
    assert files == {depth: record.files for depth, record in single.layers.items()}  # sha256 of every file
    assert single.final_depth == final
    multi_export, single_export = exported(f"s3://{s3_bucket}/multi", final), exported(f"s3://{s3_bucket}/single", final)
    assert "model.safetensors.index.json" in multi_export and multi_export == single_export
