"""The pipeline on a multi-node Ray (a head with no CPUs and two labelled worker nodes, each with its own temporary
directory and node cache; tests/multinode_run.py), with the run directory on the loopback S3 server: every kind of
work runs where the config's labels send it, the model is staged once and read through each node's cache, a local
run directory is refused, and the committed weights and the exported model equal a single-node run's bit for bit."""

from __future__ import annotations

import json
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


def test_a_multi_node_run_places_work_by_label_and_equals_the_single_node_run(local_ray, s3_bucket, tmp_path):
    inputs = make_inputs(tmp_path)
    config = tmp_path / "multinode.json"
    config.write_text(json.dumps(run_config(s3_bucket, "multi", inputs, **PLACEMENT)))
    work = tmp_path / "cluster"
    work.mkdir()
    done = subprocess.run([sys.executable, str(HERE / "multinode_run.py"), str(config), str(work)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads((work / "result.json").read_text())

    assert result["nodes"] == ["cpu", "head", "trainer"]
    assert result["refusal"].startswith("ConfigError: run_dir ") and "the Ray cluster has 3 nodes" in result["refusal"]
    where = result["placements"]
    assert where["trainer"] == ["trainer"]  # Stage 1 and the segment trainers: on the spot node only
    assert where["snapshot"] == ["trainer"]
    assert where["tokenize"] == where["export"] == where["stage"] == ["cpu"]  # CPU work off the trainer node
    assert where["board"] == ["head"]
    manifest = result["manifest"]
    assert manifest["state"] == "done"
    assert manifest["steps"]["stage_model"]["outputs"]["uri"] == f"s3://{s3_bucket}/multi/model"
    caches = result["caches"]
    assert any(p.startswith("models/") and p.endswith("model.safetensors") for p in caches["trainer"])
    assert any(p.startswith("weights/") for p in caches["trainer"])  # committed layers, fetched once per node
    final = manifest["final_depth"]
    assert manifest["steps"][f"export:{final}"]["outputs"]["peak_rss_bytes"] > 0

    single = Driver(validate_config(run_config(s3_bucket, "single", inputs))).run()

    files = {depth: record["files"] for depth, record in manifest["layers"].items()}
    assert files == {depth: record.files for depth, record in single.layers.items()}  # sha256 of every file
    assert single.final_depth == final
    multi_export, single_export = exported(f"s3://{s3_bucket}/multi", final), exported(f"s3://{s3_bucket}/single", final)
    assert "model.safetensors.index.json" in multi_export and multi_export == single_export
