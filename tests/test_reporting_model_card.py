"""The model card of an exported exit, and an export that carries it (from a hand-built run directory)."""

from __future__ import annotations

import math

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from helpers import tiny_model_dir
from segprop_ray.core.parts import ModelParts
from segprop_ray.core.plan import SegPropPlan, split_exit_weights
from segprop_ray.core.weights import SafetensorsSource
from segprop_ray.reporting.model_card import export_with_card, kept_layers, model_card
from segprop_ray.storage.layout import RunLayout
from segprop_ray.storage.manifest import LayerRecord, Manifest, ManifestStore, ModelInfo
from segprop_ray.storage.weights_store import WeightStore, exit_file, group_committed
from test_reporting_report import BASELINE, e2e_manifest, lw_manifest, segprop_manifest


def test_card_names_depth_base_model_method_metrics_and_decision():
    manifest = segprop_manifest()
    card = model_card(manifest, 4)

    assert card.startswith("---\nlibrary_name: transformers\n")
    assert "base_model:" not in card  # a local path is no hub id
    assert "# tiny-llama-8, exit 4 (segprop)" in card
    assert "`/models/tiny-llama-8` (LlamaForCausalLM, 8 decoder layers)" in card
    assert "Segmented Propagation (SegProp), base depth p = 2, last layers r = 2" in card
    assert "**decoder layers kept**: 7 of 8: original layers 0-4, 6-7" in card
    assert "**exit depth**: 4 (the run's final model is exit 5)" in card
    assert "| held-out loss | 1.9700 | 3.9100 |" in card  # exit 4 beside the original model
    assert "| multiple-choice accuracy | 61.0% | 25.0% |" in card
    assert "| nHSIC(Y; Z) after the exit layer | 0.5200 | - |" in card
    assert "After depth 4 the run kept adding depth (continue): exit 4 eval loss 1.9700; best 1.9700 at exit 4." in card
    final = model_card(manifest, 5)
    assert "stopped adding depth (last_layer): layer 5 is the last middle layer." in final


def test_card_metrics_override_and_other_modes():
    manifest = lw_manifest()
    card = model_card(manifest, 3, metrics={"accuracy": 0.5, "eval_loss": 2.5})
    assert "| multiple-choice accuracy | 50.0% |" in card and "| held-out loss | 2.5000 |" in card
    assert "layer-wise training (lw: r = 0, no last layers), base depth p = 2" in card
    assert kept_layers(manifest, 3) == [0, 1, 2, 3]
    hub = e2e_manifest().model_copy(update={"model": e2e_manifest().model.model_copy(update={"uri": "meta-llama/Llama-3.2-1B"})})
    e2e_card = model_card(hub, 7)
    assert "base_model: meta-llama/Llama-3.2-1B" in e2e_card
    assert "**decoder layers kept**: 8 of 8: original layers 0-7" in e2e_card


def fake_run(tmp_path) -> str:
    """A run directory whose Stage 1 (depth 0 of a 4-layer model, r = 2) committed the input model's weights."""
    model_dir = tiny_model_dir(tmp_path, num_layers=4)
    config = AutoConfig.from_pretrained(model_dir)
    arch, plan = ModelParts(config).layout, SegPropPlan(4, 0, 2)
    source = SafetensorsSource.from_model_dir(model_dir)
    committed, exit_weights = split_exit_weights({name: source.get(name) for name in source.keys()}, arch, plan)
    layout = RunLayout.open(str(tmp_path / "run"))
    store = WeightStore(layout, tmp_path / "cache")
    files = {path: store.put(path, tensors) for path, tensors in group_committed(committed, arch, [0]).items()}
    files[exit_file(0)] = store.put(exit_file(0), exit_weights)
    info = ModelInfo(uri=str(model_dir), architecture="LlamaForCausalLM", family="llama", num_layers=4,
                     hidden_size=config.hidden_size, vocab_size=config.vocab_size, tied_embeddings=False)
    record = LayerRecord(depth=0, stage="stage1", status="done", steps=0, eval_loss=4.2, perplexity=math.exp(4.2),
                         files=files, exit_file=exit_file(0), metrics={"accuracy": 0.3})
    manifest = Manifest(run_id="fake", config_hash="0" * 64, mode="segprop", base_depth=0, last_layers=2, model=info,
                        group_size=4, layers={"0": record}, final_depth=0, state="done", baseline=BASELINE)
    ManifestStore(layout).write(manifest)
    return str(tmp_path / "run")


def test_export_with_card_writes_the_readme_beside_a_loadable_model(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGPROP_CACHE", str(tmp_path / "cache"))
    run_dir = fake_run(tmp_path)

    depth, out = export_with_card(run_dir, str(tmp_path / "exported"), "final")

    assert depth == 0
    readme = (tmp_path / "exported" / "README.md").read_text()
    assert "exit 0 (segprop)" in readme and "**decoder layers kept**: 3 of 4: original layers 0, 2-3" in readme
    assert "| multiple-choice accuracy | 30.0% | 25.0% |" in readme
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 3
    with torch.no_grad():
        assert model(torch.tensor([[3, 4, 5]])).logits.shape == (1, 3, model.config.vocab_size)
