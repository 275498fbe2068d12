"""Segments through the Ray pipeline (local Ray, file:// run directory): k-layer segments and attention / MLP halves
fed from SnapCheck shards equal the in-process run; snapshots exist only at segment boundaries; the LoRA baseline
(``mode: lora``) resumes a killed worker from its adapter-only checkpoint and exports a merged HF model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline_setup import inprocess_reference, logits, make_inputs, pipeline_config, reference_model
from segprop_ray.config import validate_config
from segprop_ray.core.adapters import LORA_TAG
from segprop_ray.demo.tiny_model import make_tiny_model
from segprop_ray.pipeline.driver import Driver
from segprop_ray.storage.layout import RunLayout

pytestmark = pytest.mark.slow
QUIET = {"nhsic_tokens": 0, "baseline": False}  # exit evaluations are not what these tests check


def run_and_compare(tmp_path, model, train, evaluation, **sections):
    """Run the driver, then the in-process core on the very token blocks it wrote: the same losses per iteration and
    the same exported model, bit for bit. Returns the manifest and the run layout."""
    run_dir = (tmp_path / "run").as_uri()
    cfg = validate_config(pipeline_config(run_dir, str(model), str(train), str(evaluation), evaluation=QUIET,
                                          **sections))
    manifest = Driver(cfg).run()
    assert manifest.state == "done"
    layout = RunLayout.open(run_dir)
    blocks = {split: info["num_blocks"] for split, info in manifest.tokens.items()}
    result, eval_ids = inprocess_reference(cfg, model, layout, blocks)
    assert [(r.label, r.eval_loss) for r in manifest.records()] == [(it["label"], it["eval_loss"]) for it in result.iterations]
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "export" / f"exit-{manifest.final_depth}").eval()
    reference = reference_model(result, model, manifest.final_depth, tmp_path / "reference")
    torch.testing.assert_close(logits(exported, eval_ids[:4]), logits(reference, eval_ids[:4]), rtol=0, atol=0)
    return manifest, layout


def test_two_layer_segments_from_shards_equal_the_inprocess_run(local_ray, tmp_path):
    _, train, evaluation = make_inputs(tmp_path)
    model = make_tiny_model(tmp_path / "model6", "llama", num_layers=6, hidden=32)  # middle 1-3: segments (1, 2), (3)
    manifest, layout = run_and_compare(tmp_path, model, train, evaluation, segprop={"segment_layers": 2},
                                       snapcheck={"keep_depths": 5}, training={"max_steps": 4})
    assert manifest.committed_depths() == [0, 2, 3] and manifest.final_depth == 3
    assert manifest.layer(2).files.keys() == {"layers/layer-1.safetensors", "layers/layer-2.safetensors",
                                              "exits/exit-2/ll.safetensors"}
    assert manifest.layer(2).label == "layers 1-2" and manifest.layer(2).first == 1
    assert sorted(name for name in manifest.steps if name.startswith("snapshot:")) == ["snapshot:0", "snapshot:2"]
    for split in ("train", "eval"):  # only at segment boundaries, never S[1]
        found = sorted(path.rsplit("=", 1)[-1] for path in layout.fs.ls(layout.join("snapshots", split)))
        assert found == ["0", "2"], found


def test_sublayer_lora_halves_from_shards_equal_the_inprocess_run(local_ray, tmp_path):
    """Layer 1 in two iterations (attention half, then MLP half from the attention half's commit), LoRA adapters on
    every linear module of each half, merged on commit."""
    model, train, evaluation = make_inputs(tmp_path)
    adapter = {"r": 2, "alpha": 4.0, "target_modules": "all-linear"}
    manifest, _ = run_and_compare(tmp_path, model, train, evaluation, training={"max_steps": 4},
                                  segprop={"granularity": "sublayer", "adapter": adapter})
    assert [(r.label, r.part) for r in manifest.records()] == [
        ("Stage 1 (layers 0..0 + LL)", "layer"), ("layer 1 attn", "attn"), ("layer 1 mlp", "mlp")]
    assert manifest.committed_depths() == [0, 1] and manifest.layers["1-attn"].files.keys() == {
        "layers/layer-1-attn.safetensors", "exits/exit-1-attn/ll.safetensors"}
    assert manifest.adapter["r"] == 2 and manifest.granularity == "sublayer"


def checkpoint_tensor_names(directory: Path) -> list[str]:
    """The tensor names of a (sharded) Ray Train checkpoint of the train job: every rank's shard files."""
    from safetensors import safe_open

    names = []
    for path in sorted(directory.glob("*.safetensors")):
        if not path.name.startswith("loop-meta"):
            with safe_open(path, framework="pt") as f:
                names += list(f.keys())
    return names


def test_lora_mode_resumes_a_killed_worker_and_exports_a_merged_model(local_ray, tmp_path, monkeypatch):
    model, train, evaluation = make_inputs(tmp_path)
    checkpoints = {}
    drop = Driver._drop_checkpoints

    def keep_last(driver, name):  # what the iteration's last Ray Train checkpoint held, before it is dropped
        layout = driver.setup.layout
        found = sorted(layout.fs.glob(f"{layout.checkpoints_dir(name)}/step-*"))
        if found:
            local = tmp_path / "checkpoint"
            layout.fs.get(found[-1], str(local), recursive=True)
            checkpoints[name] = checkpoint_tensor_names(local)
        drop(driver, name)

    monkeypatch.setattr(Driver, "_drop_checkpoints", keep_last)
    monkeypatch.setenv("SEGPROP_TEST_KILL_WORKER_AT", "3:5")
    manifest, _ = run_and_compare(tmp_path, model, train, evaluation, segprop={"mode": "lora"},
                                  training={"max_steps": 8, "save_steps": 2, "learning_rate": 1e-2})
    record = manifest.layer(3)
    assert record.stage == "e2e" and record.steps == 8 and record.metrics["resumed_from_step"] == 4
    assert manifest.mode == "lora" and manifest.adapter == {"r": 8, "alpha": 8.0, "dropout": 0.0, "target_modules": None}
    (names,) = checkpoints.values()
    weights = [name.removeprefix("model.") for name in names if name.startswith("model.")]
    assert weights and all(LORA_TAG in name for name in weights)  # adapters only
    assert {name.removeprefix("optimizer.").rsplit(".", 1)[0] for name in names if name.endswith(".exp_avg")} == set(
        weights)  # and their optimizer state only
    exported = tmp_path / "run" / "export" / "exit-3"
    assert "LoRA adapters (r = 8, alpha = 8" in (exported / "README.md").read_text()
    merged = AutoModelForCausalLM.from_pretrained(exported)
    base = AutoModelForCausalLM.from_pretrained(model)
    moved = {n for n, t in merged.state_dict().items() if not torch.equal(t, base.state_dict()[n])}
    assert moved == {f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(4) for p in "qv"}  # PEFT's default
