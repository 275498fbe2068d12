"""``segprop report``: a run's per-depth table, reference scores, exit-decision trace and plots, from manifests only.

:func:`build_report` gathers everything into one JSON-able mapping (what ``report.json`` holds);
the Markdown, CSV and PNG files are all drawn from that mapping, so they agree with each other.
Compared runs (``--compare``: an ``lw`` and/or an ``e2e`` run on the same model and data) are
drawn beside the run, an ``e2e`` run as a reference at its final score (the paper's Figure 2).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from segprop_ray.core.plan import MODES, iteration_order
from segprop_ray.reporting.export import open_run
from segprop_ray.reporting.plots import write_plots
from segprop_ray.reporting.report_text import markdown_report, rows_csv
from segprop_ray.reporting.stages import stage_rows
from segprop_ray.storage.fs import publish_dir, redact_uri
from segprop_ray.storage.manifest import LayerRecord, Manifest

ROW_COLUMNS = ["depth", "stage", "segment", "part", "status", "steps", "kept_step", "train_loss", "eval_loss", "perplexity", "accuracy",
               "accuracy_norm", "nhsic_input", "nhsic_label", "tokens", "tokens_per_s", "wall_s", "driver_wall_s",
               "peak_memory_bytes", "data_wait_share", "iteration_exit", "global_exit", "evaluation_error"]
"""Columns of the per-depth table (report.csv, the ``layers`` of report.json, report.md).

``wall_s`` is the training loop's time on rank 0 (its evaluations included; "train s" in the tables),
``driver_wall_s`` the driver's time for the whole iteration, Ray Train start-up included ("wall s"; None
in manifests from before it was recorded, where the tables show ``wall_s`` instead). ``tokens_per_s`` and
``data_wait_share`` are over training time: the loop's time less its evaluations. ``segment`` names what the
iteration trained (``layers 3-4``, ``layer 5 attn``), ``part`` whether whole layers or a half (an ``attn`` row is
no exit: its layer's exit is the ``mlp`` row at the same depth)."""
METRIC_COLUMNS = ["accuracy", "accuracy_norm", "nhsic_input", "nhsic_label", "tokens", "tokens_per_s", "wall_s",
                  "driver_wall_s", "peak_memory_bytes", "data_wait_share", "evaluation_error"]
"""Columns read from ``LayerRecord.metrics`` (None where the metric was not recorded)."""
SCORE_KEYS = ("eval_loss", "perplexity", "accuracy")


def depth_row(record: LayerRecord, global_decision: dict[str, Any] | None) -> dict[str, Any]:
    """One row of the per-depth table: the record's losses, its metrics and both exit decisions."""
    row = {"depth": record.depth, "stage": record.stage, "segment": record.label or _fallback_label(record),
           "part": record.part, "status": record.status, "steps": record.steps,
           "kept_step": record.kept_step, "train_loss": record.train_loss, "eval_loss": record.eval_loss, "perplexity": record.perplexity}
    row.update({key: record.metrics.get(key) for key in METRIC_COLUMNS})
    row["iteration_exit"] = (record.decision or {}).get("reason")
    row["global_exit"] = (global_decision or {}).get("reason")
    return row


def _fallback_label(record: LayerRecord) -> str:
    """The label of a record written before iterations carried one (whole single layers)."""
    return {"stage1": f"Stage 1 (layers 0..{record.depth} + LL)", "e2e": "E2E (all layers)"}.get(
        record.stage, f"layer {record.depth}")


def depth_rows(manifest: Manifest) -> list[dict[str, Any]]:
    """One row per iteration record, in the order the iterations ran, with :data:`ROW_COLUMNS` (the global exit
    decision on the row that completed its depth)."""
    decisions = {decision["depth"]: decision for decision in manifest.decisions}
    return [depth_row(record, decisions.get(record.depth) if record.part != "attn" else None)
            for record in manifest.records()]


def exit_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of exits (one per depth): an attention half's row is left out (its layer's exit is the MLP half's)."""
    return [row for row in rows if row.get("part") != "attn"]


def run_label(manifest: Manifest) -> str:
    """A short name for plots and tables: ``segprop (p=2, r=2)``, ``segprop (p=2, r=2, k=2)``, ``lw (p=2, sublayer)``,
    ``e2e``, ``lora (r=8, alpha=8)``; ``LoRA r=8`` among the settings of a run whose segments train adapters."""
    adapter = manifest.adapter
    if MODES[manifest.mode].end_to_end:
        return manifest.mode if adapter is None else f"{manifest.mode} (r={adapter['r']}, alpha={adapter['alpha']:g})"
    settings = [f"p={manifest.base_depth}"] + ([] if manifest.mode == "lw" else [f"r={manifest.last_layers}"])
    settings += [f"k={manifest.segment_layers}"] if manifest.segment_layers > 1 else []
    settings += ["sublayer"] if manifest.granularity == "sublayer" else []
    settings += [f"LoRA r={adapter['r']}"] if adapter is not None else []
    return f"{manifest.mode} ({', '.join(settings)})"


def run_summary(manifest: Manifest, run_dir: str) -> dict[str, Any]:
    """The run's facts: where, what model, which mode, how far it got."""
    return {"run_dir": redact_uri(run_dir), "run_id": manifest.run_id, "label": run_label(manifest),
            "mode": manifest.mode, "end_to_end": MODES[manifest.mode].end_to_end, "model": manifest.model.uri,
            "num_layers": manifest.model.num_layers, "base_depth": manifest.base_depth,
            "last_layers": manifest.last_layers, "segment_layers": manifest.segment_layers,
            "granularity": manifest.granularity, "adapter": manifest.adapter, "state": manifest.state,
            "final_depth": manifest.final_depth, "tokens": manifest.tokens, "examples": manifest.examples,
            "error": manifest.error}


def final_score(manifest: Manifest) -> dict[str, Any] | None:
    """The row of the run's final model (its final depth, else its deepest committed one), or None."""
    committed = manifest.committed_depths()
    if not committed:
        return None
    depth = manifest.final_depth if manifest.final_depth in committed else committed[-1]
    decisions = {decision["depth"]: decision for decision in manifest.decisions}
    return depth_row(manifest.layer(depth), decisions.get(depth))


def baseline_score(manifests: Sequence[Manifest]) -> dict[str, Any] | None:
    """The input model's own score (manifest ``baseline``) of the first run that has one."""
    for manifest in manifests:
        baseline = manifest.baseline
        if baseline:
            return {"label": "original model", "run_id": manifest.run_id,
                    **{key: baseline.get(key) for key in SCORE_KEYS}}
    return None


def reference_rows(manifest: Manifest, compared: Sequence[Manifest]) -> list[dict[str, Any]]:
    """Reference scores: the original model, then each compared end-to-end (``e2e``, ``lora``) run's final model."""
    references = []
    original = baseline_score([manifest, *compared])
    if original:
        references.append(original)
    for other in compared:
        score = final_score(other) if MODES[other.mode].end_to_end else None
        if score:
            references.append({"label": run_label(other), "run_id": other.run_id, **score})
    return references


def build_report(manifest: Manifest, run_dir: str, compared: Sequence[tuple[str, Manifest]] = ()) -> dict[str, Any]:
    """Everything the report shows, as one JSON-able mapping (the content of report.json)."""
    others = [other for _, other in compared]
    return {
        "run": run_summary(manifest, run_dir),
        "columns": ROW_COLUMNS,
        "layers": depth_rows(manifest),
        "stages": stage_rows(manifest),
        "references": reference_rows(manifest, others),
        "decisions": list(manifest.decisions),
        "iteration_decisions": {key: rec.decision for key, rec in _records(manifest) if rec.decision},
        "histories": {key: rec.history for key, rec in _records(manifest) if rec.history},
        "compared": [{"run": run_summary(other, uri), "layers": depth_rows(other)} for uri, other in compared],
    }


def _records(manifest: Manifest) -> list[tuple[str, LayerRecord]]:
    """(key, record) in the order the iterations ran: keys are depths, ``<depth>-attn`` for an attention half."""
    return [(key, manifest.layers[key]) for key in sorted(manifest.layers, key=iteration_order)]


def write_report_files(local_dir: Path, data: dict[str, Any]) -> list[str]:
    """Write report.json, report.csv, the PNG plots and report.md into ``local_dir``; returns the file names."""
    local_dir.mkdir(parents=True, exist_ok=True)
    plots = write_plots(local_dir, data)
    data = {**data, "plots": plots}
    (local_dir / "report.json").write_text(json.dumps(data, indent=2))
    (local_dir / "report.csv").write_text(rows_csv(data["layers"], ROW_COLUMNS))
    (local_dir / "report.md").write_text(markdown_report(data))
    return ["report.md", "report.json", "report.csv", *plots.values()]


def write_report(run_dir: str, out: str | None = None, compare: Sequence[str] = (),
                 storage_options: dict[str, Any] | None = None) -> dict[str, str]:
    """Write the report of ``run_dir`` (compared with the runs in ``compare``) to ``out``.

    ``out`` defaults to the run's ``report/`` directory; any local path or fsspec URI (built
    locally, then copied). Returns file name -> written path (or URI).
    """
    layout, manifest = open_run(run_dir, storage_options)
    compared = [(uri, open_run(uri, storage_options)[1]) for uri in compare]
    data = build_report(manifest, run_dir, compared)
    target = out or layout.uri(layout.report_dir)
    return publish_dir(target, storage_options, lambda local: write_report_files(local, data))
