"""The report of a comparison (``segprop compare``): the paper's Table 1 and Figure 2 over a set of runs.

Table 1 has a row per exit depth and a column per run, plus the input model: each cell is the score of
the run's committed exit at that depth (``-`` where the run has none). An ``e2e`` run and the input model
are whole models, so their one score sits on the row of the last layer (n - 1). Figure 2 draws each run's
score over depth, ``e2e`` and the input model as horizontal references. Next to every run's score: the
compute it spent (training tokens, pipeline wall time, peak memory), from its per-stage totals. Everything
is read from the runs' manifests, through the single-run report's pieces (:mod:`.report`, :mod:`.stages`,
:mod:`.plots`), and gathered into one mapping (report.json) that every other file is drawn from.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from segprop_ray.reporting.compare_text import compare_markdown, runs_csv_rows, table1_csv
from segprop_ray.reporting.plots import write_plots
from segprop_ray.reporting.report import ROW_COLUMNS, baseline_score, depth_rows, final_score, run_summary
from segprop_ray.reporting.report_text import rows_csv
from segprop_ray.reporting.stages import stage_rows
from segprop_ray.storage.fs import publish_dir, redact_uri
from segprop_ray.storage.manifest import Manifest

INPUT_MODEL = "input model"
"""Table 1's column of the input model's own score (the paper's "Original")."""
TABLE_METRICS = ("eval_loss", "accuracy")
"""Scores Table 1 is drawn for: held-out loss always, multiple-choice accuracy when any run has it."""
TRAINING_STAGES = ("stage1", "stage2", "e2e")
REPORT_FORMAT = "segprop_ray.compare_report"


def committed_rows(manifest: Manifest) -> list[dict[str, Any]]:
    """The per-depth rows (:func:`~.report.depth_rows`) of the run's committed exits only."""
    return [row for row in depth_rows(manifest) if row["status"] == "done"]


def run_compute(manifest: Manifest) -> dict[str, Any]:
    """What the run spent: training tokens (every worker's), the pipeline's wall time (every finished step: tokenize,
    training, snapshots, export) and the highest peak memory of one training worker."""
    stages = stage_rows(manifest)
    training = [row for row in stages if row["stage"] in TRAINING_STAGES]
    peaks = [row["peak_memory_bytes"] for row in training if row.get("peak_memory_bytes") is not None]
    walls = [row["wall_s"] for row in stages if row.get("wall_s") is not None]
    tokens = [row["tokens"] for row in training if row.get("tokens") is not None]
    return {"training_tokens": sum(tokens) if tokens else None,
            "wall_s": round(sum(walls), 2) if walls else None,
            "peak_memory_bytes": max(peaks) if peaks else None,
            "iterations": sum(row["items"] for row in training)}


def run_score(manifest: Manifest, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The run's best exit (lowest eval loss, the shallower on ties) and its final model's score."""
    scored = [row for row in rows if row.get("eval_loss") is not None]
    best = min(scored, key=lambda row: (row["eval_loss"], row["depth"])) if scored else None
    final = final_score(manifest)
    return {"best_depth": best and best["depth"], "best_eval_loss": best and best["eval_loss"],
            "final_depth": final and final["depth"], "final_eval_loss": final and final["eval_loss"],
            "final_accuracy": final and final["accuracy"]}


def run_entry(name: str, run_dir: str, manifest: Manifest) -> dict[str, Any]:
    """One run of the comparison: its facts (labelled by its name), committed rows, score and compute."""
    rows = committed_rows(manifest)
    return {"name": name, "run": {**run_summary(manifest, run_dir), "label": name}, "layers": rows,
            "score": run_score(manifest, rows), "compute": run_compute(manifest)}


def table1(entries: Sequence[dict[str, Any]], original: dict[str, Any] | None, num_layers: int) -> dict[str, Any]:
    """Table 1: per score, one row per depth (``depth``, then a cell per column: the runs, then the input model)."""
    full_depth = num_layers - 1
    depths = sorted({row["depth"] for entry in entries for row in entry["layers"]} | ({full_depth} if original else set()))
    columns = [entry["name"] for entry in entries] + ([INPUT_MODEL] if original else [])
    by_depth = {entry["name"]: {row["depth"]: row for row in entry["layers"]} for entry in entries}
    tables = {}
    for metric in TABLE_METRICS:
        cells = [[_cell(by_depth, name, depth, metric, original, full_depth) for name in columns] for depth in depths]
        if metric == "eval_loss" or any(value is not None for row in cells for value in row):
            tables[metric] = [{"depth": depth, **dict(zip(columns, row))} for depth, row in zip(depths, cells)]
    return {"columns": columns, "full_depth": full_depth, "metrics": tables}


def _cell(by_depth: dict[str, dict[int, dict[str, Any]]], name: str, depth: int, metric: str,
          original: dict[str, Any] | None, full_depth: int) -> float | None:
    if name == INPUT_MODEL:
        return original.get(metric) if original and depth == full_depth else None
    return by_depth[name].get(depth, {}).get(metric)


def build_compare_report(runs: Sequence[tuple[str, str, Manifest]], spec: dict[str, Any] | None = None,
                         out: str | None = None) -> dict[str, Any]:
    """Everything the comparison's report shows, as one JSON-able mapping (report.json), from (name, run
    directory, manifest) per run, in the set's order."""
    entries = [run_entry(name, uri, manifest) for name, uri, manifest in runs]
    manifests = [manifest for _, _, manifest in runs]
    first = manifests[0].model
    original = baseline_score(manifests)
    if original:  # which run of the set scored it, by its name
        original["run"] = next(name for name, _, manifest in runs if manifest.run_id == original["run_id"])
    return {"format": REPORT_FORMAT, "out": out and redact_uri(out), "spec": spec or {},
            "model": {"uri": first.uri, "architecture": first.architecture, "num_layers": first.num_layers},
            "runs": entries, "input_model": original, "table1": table1(entries, original, first.num_layers)}


def model_name(uri: str) -> str:
    """The model's short name for titles: the last part of its path or URI (a file's or a hub id's name)."""
    return uri.rstrip("/").rsplit("/", 1)[-1] or uri


def plot_data(report: dict[str, Any]) -> dict[str, Any]:
    """The comparison in the single-run report's plot mapping: the first run, the others compared, the input
    model as the reference (no per-iteration curves or stage bars: those are each run's own report)."""
    first, *others = report["runs"]
    return {"title": f"{len(report['runs'])} runs on {model_name(report['model']['uri'])}", "run": first["run"],
            "layers": first["layers"], "compared": [{"run": e["run"], "layers": e["layers"]} for e in others],
            "references": [report["input_model"]] if report["input_model"] else [], "histories": {}, "stages": []}


def write_compare_files(local_dir: Path, report: dict[str, Any]) -> list[str]:
    """Write report.json, report.md, the CSVs and the PNG plots into ``local_dir``; returns the file names."""
    local_dir.mkdir(parents=True, exist_ok=True)
    plots = write_plots(local_dir, plot_data(report))
    report = {**report, "plots": plots}
    long_rows = [{"run": entry["name"], **row} for entry in report["runs"] for row in entry["layers"]]
    files = {"report.json": json.dumps(report, indent=2), "report.md": compare_markdown(report),
             "report.csv": rows_csv(long_rows, ["run", *ROW_COLUMNS]), "table1.csv": table1_csv(report["table1"]),
             "runs.csv": runs_csv_rows(report["runs"])}
    for name, text in files.items():
        (local_dir / name).write_text(text)
    return [*files, *plots.values()]


def write_compare_report(out: str, runs: Sequence[tuple[str, str, Manifest]], spec: dict[str, Any] | None = None,
                         storage_options: dict[str, Any] | None = None) -> dict[str, str]:
    """Write the comparison's report to ``<out>/report`` (any fsspec URI); returns file name -> written path."""
    report = build_compare_report(runs, spec, out)
    target = f"{out.rstrip('/')}/report"
    return publish_dir(target, storage_options, lambda local: write_compare_files(local, report))
