"""``segprop status``: the run's state and a per-layer table, read from the manifest alone."""

from __future__ import annotations

import datetime
import json
from typing import Any

from rich.console import Console
from rich.table import Table

from segprop_ray.reporting.report import depth_rows
from segprop_ray.reporting.report_text import examples_text, iteration_wall_s, segments_text
from segprop_ray.reporting.stages import stage_rows
from segprop_ray.storage.manifest import Manifest


def layer_rows(manifest: Manifest) -> list[dict[str, Any]]:
    """One row per iteration (depth), in order: the report's per-depth row plus a running iteration's step budget.

    As in report.json, ``wall_s`` is the training loop's time and ``driver_wall_s`` the driver's time for
    the iteration (Ray Train start-up included); ``tokens_per_s`` is over training time.
    """
    return [{**row, "total_steps": record.metrics.get("total_steps")}
            for row, record in zip(depth_rows(manifest), manifest.records())]


def summary_of(manifest: Manifest) -> dict[str, Any]:
    """The segment settings of a run, as :func:`~segprop_ray.reporting.report_text.segments_text` reads them."""
    return {"segment_layers": manifest.segment_layers, "granularity": manifest.granularity, "adapter": manifest.adapter}


def running_steps(manifest: Manifest) -> list[str]:
    """One line per running job that is not a layer's training (tokenize, snapshot, export), with its progress."""
    lines = []
    for name, step in manifest.steps.items():
        if step.status != "running":
            continue
        outputs = step.outputs or {}
        done, total = outputs.get("files_done"), outputs.get("files_total")
        unit = "input files" if name == "tokenize" else "files"
        progress = "" if not (done and total) else ": " + ", ".join(
            f"{split} {done.get(split, 0)}/{count} {unit}" for split, count in total.items())
        lines.append(f"{name} since {step.started or '?'}{progress}")
    return lines


def status_json(manifest: Manifest) -> str:
    """The status as JSON: run facts plus the per-layer rows."""
    return json.dumps({"run_id": manifest.run_id, "state": manifest.state, "updated": manifest.updated,
                       "mode": manifest.mode, "model": manifest.model.uri, "final_depth": manifest.final_depth,
                       "error": manifest.error,
                       "tokens": manifest.tokens, "examples": manifest.examples, "layers": layer_rows(manifest), "stages": stage_rows(manifest),
                       "decisions": manifest.decisions,
                       "steps": {k: v.model_dump() for k, v in manifest.steps.items()}}, indent=2)


def render_status(manifest: Manifest, console: Console | None = None) -> None:
    """Print the run header and the per-layer table."""
    console = console or Console(width=None if Console().is_terminal else 150)
    blocks = ", ".join(f"{split} {info.get('num_blocks')}" for split, info in manifest.tokens.items()) or "not yet"
    console.print(f"[bold]{manifest.run_id}[/bold]  state: {manifest.state}  mode: {manifest.mode}  "
                  f"model: {manifest.model.uri} ({manifest.model.num_layers} layers)  p={manifest.base_depth} "
                  f"r={manifest.last_layers}{segments_text(summary_of(manifest))}  blocks: {blocks}")
    if manifest.examples:
        console.print(f"data: {examples_text(manifest.examples)}")
    quiet = _staleness(manifest)
    if quiet:
        console.print(f"[yellow]{quiet}[/yellow]")
    table = Table(show_lines=False)
    segmented = manifest.segment_layers > 1 or manifest.granularity != "layer"  # else every row is one layer
    titles = ("depth", "stage", *(("layers",) if segmented else ()), "status", "steps", "train loss", "eval loss", "ppl",
              "acc", "exit (iter / global)", "wall s", "train s", "train tok/s", "read wait")
    for title in titles:
        table.add_column(title, justify="right" if title not in ("stage", "layers", "status", "exit (iter / global)") else "left")
    for row, record in zip(layer_rows(manifest), manifest.records()):
        steps = _steps_cell(row)
        table.add_row(str(row["depth"]), row["stage"], *((_layers_cell(record),) if segmented else ()), row["status"], steps, _num(row["train_loss"]),
                      _num(row["eval_loss"]), _num(row["perplexity"], 2), _pct(row["accuracy"]),
                      f"{row['iteration_exit'] or '-'} / {row['global_exit'] or '-'}",
                      _num(iteration_wall_s(row), 1), _num(row["wall_s"], 1), _num(row["tokens_per_s"], 0),
                      _pct(row["data_wait_share"]))
    console.print(table)
    for line in running_steps(manifest):
        console.print(f"running: {line}")
    stages = [f"{row['stage']} {_seconds(row['wall_s'])}" + (f" ({row['items']})" if row["items"] > 1 else "")
              for row in stage_rows(manifest) if row.get("wall_s") is not None]
    if stages:
        console.print("time per stage: " + ", ".join(stages))
    if manifest.baseline:
        console.print(f"input model: eval loss {_num(manifest.baseline.get('eval_loss'))}, "
                      f"accuracy {_pct(manifest.baseline.get('accuracy'))}")
    if manifest.final_depth is not None:
        console.print(f"final model: exit {manifest.final_depth}")
    if manifest.error:
        console.print(f"[red]last error:[/red] {manifest.error}")


QUIET_AFTER_S = 600.0
"""A running manifest not written for this long gets a hint that its driver may be gone."""


def _staleness(manifest: Manifest) -> str:
    """For a running run whose manifest has been quiet for a while: how long, and what to do if no driver runs."""
    if manifest.state != "running" or not manifest.updated:
        return ""
    quiet = datetime.datetime.now(datetime.timezone.utc) - datetime.datetime.fromisoformat(manifest.updated)
    if quiet.total_seconds() < QUIET_AFTER_S:
        return ""
    return (f"no update for {quiet.total_seconds() / 60:,.0f} min: if no driver is running any more, "
            "run the same command again to continue")


def _layers_cell(record: Any) -> str:
    """What an iteration trained, short: ``0-2`` (Stage 1's prefix), ``all`` (E2E), ``3-4``, ``5 attn``."""
    if record.stage == "e2e":
        return "all"
    first = 0 if record.stage == "stage1" else (record.first if record.first is not None else record.depth)
    span = str(first) if first == record.depth else f"{first}-{record.depth}"
    return span if record.part == "layer" else f"{span} {record.part}"


def _steps_cell(row: dict[str, Any]) -> str:
    """``12/40`` while running, ``40`` when done, ``40 (kept 30)`` when an earlier step's weights were committed."""
    if row["status"] == "running" and row["total_steps"]:
        return f"{row['steps']}/{row['total_steps']}"
    kept = row.get("kept_step")
    return f"{row['steps']} (kept {kept})" if kept is not None and kept != row["steps"] else str(row["steps"])


def _seconds(value: float) -> str:
    return f"{value:,.1f} s" if value < 10 else f"{value:,.0f} s"


def _num(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"
