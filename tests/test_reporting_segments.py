"""Reports, status and model cards of runs in segments: each iteration named as trained (``layers 3-4``, ``layer 5
attn``), an attention half shown as a row of its own but never as an exit, and the LoRA baseline as a first-class
mode beside lw and e2e."""

from __future__ import annotations

import io
import json
import math

from rich.console import Console

from segprop_ray.reporting.model_card import model_card
from segprop_ray.reporting.report import build_report, depth_rows, exit_rows, run_label, write_report_files
from segprop_ray.reporting.report_text import markdown_report
from segprop_ray.reporting.status import render_status, status_json
from test_reporting_report import e2e_manifest, layer_record, segprop_manifest


def halves_manifest():
    """A segprop run (p = 2, r = 2 of 8 layers) that trained layer 3 in halves, then stopped."""
    manifest = segprop_manifest().model_copy(update={"granularity": "sublayer"}, deep=True)
    manifest.layers = {key: record for key, record in manifest.layers.items() if int(key) <= 3}
    manifest.layers["3"] = manifest.layers["3"].model_copy(update={"part": "mlp", "first": 3, "label": "layer 3 mlp"})
    attn = layer_record(3, "stage2", 2.4, None, None).model_copy(update={"part": "attn", "first": 3,
                                                                       "label": "layer 3 attn", "files": {}})
    manifest.layers["3-attn"] = attn
    manifest.decisions = [d for d in manifest.decisions if d["depth"] <= 3]
    return manifest


def test_an_attention_half_is_a_row_but_no_exit(tmp_path):
    manifest = halves_manifest()
    rows = depth_rows(manifest)
    assert [(row["depth"], row["segment"], row["part"]) for row in rows] == [
        (2, "Stage 1 (layers 0..2 + LL)", "layer"), (3, "layer 3 attn", "attn"), (3, "layer 3 mlp", "mlp")]
    assert rows[1]["global_exit"] is None and rows[2]["global_exit"] is not None
    assert [row["segment"] for row in exit_rows(rows)] == ["Stage 1 (layers 0..2 + LL)", "layer 3 mlp"]
    assert manifest.committed_depths() == [2, 3]
    data = build_report(manifest, "/runs/halves", [("/runs/e2e", e2e_manifest())])
    assert list(data["histories"]) == ["2", "3-attn", "3"]
    written = write_report_files(tmp_path, data)
    assert {"loss_curves.png", "metric_vs_depth.png"} <= set(written)
    text = markdown_report(data)
    assert "| 3 | stage2 | layer 3 attn |" in text and "| 3 | stage2 | layer 3 mlp |" in text
    assert "last layers r = 2, Stage 2 in attention and MLP halves" in text
    console = Console(file=io.StringIO(), width=200)
    render_status(manifest, console)
    table = [[cell.strip() for cell in line.strip("│").split("│")] for line in console.file.getvalue().splitlines()
             if line.startswith("│")]
    assert [row[:3] for row in table] == [["2", "stage1", "0-2"], ["3", "stage2", "3 attn"], ["3", "stage2", "3 mlp"]]
    assert [row["segment"] for row in json.loads(status_json(manifest))["layers"]][1] == "layer 3 attn"


def lora_manifest():
    manifest = e2e_manifest().model_copy(update={"mode": "lora", "run_id": "lora-run", "adapter": {
        "r": 8, "alpha": 16.0, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}}, deep=True)
    return manifest


def test_the_lora_baseline_is_a_mode_of_its_own():
    lora = lora_manifest()
    assert run_label(lora) == "lora (r=8, alpha=16)"
    segments = segprop_manifest().model_copy(update={"segment_layers": 2, "adapter": lora.adapter})
    assert run_label(segments) == "segprop (p=2, r=2, k=2, LoRA r=8)"
    data = build_report(segprop_manifest(), "/runs/segprop", [("/runs/lora", lora), ("/runs/e2e", e2e_manifest())])
    assert [ref["label"] for ref in data["references"]][1:] == ["lora (r=8, alpha=16)", "e2e"]
    assert "## Comparison by depth" not in markdown_report(data)  # end-to-end runs are references, not series by depth
    card = model_card(lora, 7)
    assert "fine-tuned from `/models/tiny-llama-8` by end-to-end LoRA fine-tuning (every layer kept)" in card
    assert ("LoRA adapters (r = 8, alpha = 16, dropout = 0.05, on q_proj, v_proj) trained instead of full weights and "
            "merged into them") in card
    card = model_card(segments, 4)
    assert "Stage 2 trained segments of 2 consecutive middle layers at a time" in card
    assert math.isclose(lora.plan().adapter.scaling, 2.0) and lora.plan().iterations[0].stage == "e2e"
