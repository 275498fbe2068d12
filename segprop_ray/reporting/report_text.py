"""The report as text: Markdown (report.md) and CSV (report.csv), from the report mapping."""

from __future__ import annotations

import csv
import io
from typing import Any, Sequence

from segprop_ray.core.plan import iteration_order

TABLE_COLUMNS = [("depth", "depth"), ("stage", "stage"), ("segment", "segment"), ("train_loss", "train loss"), ("eval_loss", "eval loss"),
                 ("perplexity", "perplexity"), ("accuracy", "accuracy"), ("tokens", "tokens"),
                 ("iteration_wall_s", "wall s"), ("wall_s", "train s"), ("peak_memory_bytes", "peak memory"),
                 ("iteration_exit", "iteration exit"), ("global_exit", "global exit")]
"""(row key, heading) of the per-depth table people read; the CSV and JSON have every column.

``iteration_wall_s`` is not a row key: it is :func:`iteration_wall_s` of the row."""


def iteration_wall_s(row: dict[str, Any]) -> float | None:
    """An iteration's wall time as the driver measured it (``driver_wall_s``: Ray Train start-up included).

    Manifests written before the driver recorded it only have the training loop's time (``wall_s``),
    which stands in for it.
    """
    driver = row.get("driver_wall_s")
    return driver if driver is not None else row.get("wall_s")


def depth_cell(row: dict[str, Any], key: str) -> str:
    """A cell of the per-depth table, by :data:`TABLE_COLUMNS` key."""
    return fmt(key, iteration_wall_s(row) if key == "iteration_wall_s" else row.get(key))


def fmt(key: str, value: Any) -> str:
    """A table cell: ``-`` for missing, losses to 4 decimals, memory in GiB/MiB, shares in %."""
    if value is None:
        return "-"
    if isinstance(value, bool) or isinstance(value, str):
        return str(value)
    if key in ("peak_memory_bytes", "bytes_written"):
        return _bytes(value)
    if key in ("data_wait_share", "accuracy", "accuracy_norm"):
        return f"{100 * value:.1f}%"
    if key in ("tokens", "steps", "depth", "items"):
        return f"{int(value):,}"
    if key in ("wall_s", "iteration_wall_s", "driver_wall_s", "tokens_per_s", "tokens_per_wall_s",
               "training_tokens_per_s", "written_mb_per_s"):
        return f"{value:,.1f}"
    return f"{value:.4f}"


def _bytes(value: float) -> str:
    if value >= 1 << 30:
        return f"{value / (1 << 30):.2f} GiB"
    return f"{value / (1 << 20):.1f} MiB"


def markdown_table(headings: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table (``|`` in cells escaped)."""
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"

    return "\n".join([line(headings), line(["---"] * len(headings)), *(line(row) for row in rows)])


def rows_csv(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """The rows as CSV with a header; missing values are empty cells, numbers at full precision."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({key: ("" if row.get(key) is None else row.get(key)) for key in columns} for row in rows)
    return buffer.getvalue()


def _header(data: dict[str, Any]) -> str:
    run = data["run"]
    tokens = ", ".join(f"{split}: {info.get('num_blocks', '?')} blocks" for split, info in run["tokens"].items()) or "-"
    facts = [("model", f"{run['model']} ({run['num_layers']} decoder layers)"),
             ("mode", f"{run['mode']}, base depth p = {run['base_depth']}, last layers r = {run['last_layers']}"
                      + segments_text(run)),
             ("state", f"{run['state']}; final exit: {fmt('depth', run['final_depth'])}"),
             ("run directory", run["run_dir"]), ("token blocks", tokens)]
    if run.get("examples"):
        facts.append(("examples", examples_text(run["examples"])))
    facts += [("compared with", f"{other['run']['label']}: {other['run']['run_dir']}") for other in data["compared"]]
    lines = "\n".join(f"- **{name}**: {value}" for name, value in facts)
    return f"# SegProp report: {run['label']}, run `{run['run_id']}`\n\n{lines}"


def segments_text(run: dict[str, Any]) -> str:
    """``, segments of 2 layers, LoRA r=8 alpha=16 on [q_proj, v_proj]`` for a run summary (empty for plain layers)."""
    notes = []
    if (run.get("segment_layers") or 1) > 1:
        notes.append(f"Stage 2 segments of {run['segment_layers']} layers")
    if run.get("granularity") == "sublayer":
        notes.append("Stage 2 in attention and MLP halves")
    adapter = run.get("adapter")
    if adapter:
        targets = adapter.get("target_modules") or "PEFT's default modules"
        notes.append(f"LoRA r={adapter['r']} alpha={adapter['alpha']:g} dropout={adapter['dropout']:g} on {targets}")
    return "".join(f", {note}" for note in notes)


def examples_text(examples: dict[str, dict[str, int]]) -> str:
    """``train: 120 examples, 3 truncated to seq_len, 0 dropped; eval: 16 examples`` (per input stream)."""
    parts = []
    for stream, counts in sorted(examples.items(), key=lambda item: item[0] != "train"):
        text = f"{stream}: {counts['examples']} examples"
        if counts.get("truncated") or counts.get("dropped"):
            text += f", {counts['truncated']} truncated to seq_len, {counts['dropped']} dropped (no target token left)"
        parts.append(text)
    return "; ".join(parts)


def _depth_section(data: dict[str, Any]) -> str:
    rows = [[depth_cell(row, key) for key, _ in TABLE_COLUMNS] for row in data["layers"]]
    note = ("Exit depth q is the model made of decoder layers 0..q followed by LL (the last r layers, the final "
            "norm and the LM head). wall s is the driver's time for the iteration, Ray Train start-up included "
            "(`driver_wall_s`); train s is the training loop's, its evaluations included (`wall_s`). "
            "report.csv and report.json have every column, nHSIC and throughput included.")
    errors = [f"- exit {row['depth']}: evaluation failed: {row['evaluation_error']}" for row in data["layers"]
              if row.get("evaluation_error")]
    text = "## Results per depth\n\n" + markdown_table([title for _, title in TABLE_COLUMNS], rows) + "\n\n" + note
    return text + ("\n\n" + "\n".join(errors) if errors else "")


STAGE_HEADINGS = {"stage": "stage", "items": "layers / depths", "wall_s": "wall s", "tokens": "tokens",
                  "tokens_per_wall_s": "tokens/s", "training_tokens_per_s": "training tokens/s",
                  "data_wait_share": "read wait", "peak_memory_bytes": "peak memory", "bytes_written": "written",
                  "written_mb_per_s": "write MB/s"}
"""Headings of the per-stage table, by ``stages.STAGE_COLUMNS`` key."""


def _stage_section(data: dict[str, Any]) -> str:
    if not data.get("stages"):
        return ""
    rows = [[fmt(key, row.get(key)) for key in STAGE_HEADINGS] for row in data["stages"]]
    note = ("Training stages sum their layers: wall s is the driver's time per layer, Ray Train start-up "
            "included, and tokens/s is tokens over it; training tokens/s and the read wait are over the training "
            "loops' time alone (evaluation left out). Tokens are the whole worker group's; peak memory is the "
            "highest layer's on one worker.")
    return "## Time per stage\n\n" + markdown_table(list(STAGE_HEADINGS.values()), rows) + "\n\n" + note


def _reference_section(data: dict[str, Any]) -> str:
    if not data["references"]:
        return "## Reference scores\n\nNo original-model score and no compared e2e run."
    rows = [[ref["label"], ref.get("run_id", "-"), fmt("depth", ref.get("depth")), fmt("eval_loss", ref.get("eval_loss")),
             fmt("perplexity", ref.get("perplexity")), fmt("accuracy", ref.get("accuracy"))] for ref in data["references"]]
    return "## Reference scores\n\n" + markdown_table(["model", "run", "depth", "eval loss", "perplexity", "accuracy"], rows)


def _comparison_section(data: dict[str, Any]) -> str:
    series = [(data["run"]["label"], _exits(data["layers"]))]
    series += [(o["run"]["label"], _exits(o["layers"])) for o in data["compared"] if not _end_to_end(o["run"])]
    if len(series) < 2:
        return ""
    by_depth = [{row["depth"]: row for row in rows} for _, rows in series]
    depths = sorted(set().union(*by_depth))
    keys = ["eval_loss"] + (["accuracy"] if any(r.get("accuracy") is not None for _, rows in series for r in rows) else [])
    headings = ["depth"] + [f"{label} {key.replace('_', ' ')}" for key in keys for label, _ in series]
    rows = [[str(d)] + [fmt(key, rows.get(d, {}).get(key)) for key in keys for rows in by_depth] for d in depths]
    return "## Comparison by depth\n\n" + markdown_table(headings, rows)


def _exits(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per exit depth (an attention half is no exit)."""
    return [row for row in rows if row.get("part") != "attn"]


def _end_to_end(run: dict[str, Any]) -> bool:
    """A run of one iteration over every layer (``e2e``, ``lora``); reports written before the flag: ``e2e``."""
    return bool(run.get("end_to_end", run.get("mode") == "e2e"))


def _decision_section(data: dict[str, Any]) -> str:
    rows = [[str(d["depth"]), "continue" if d.get("continue_training") else "stop", d.get("reason", "-"),
             fmt("eval_loss", d.get("eval_loss")), f"{fmt('eval_loss', d.get('best_eval_loss'))} (exit {d.get('best_depth')})",
             d.get("detail", "")] for d in data["decisions"]]
    table = markdown_table(["after depth", "decision", "reason", "exit eval loss", "best so far", "detail"], rows)
    return "## Global exit decisions\n\n" + (table if rows else "No decision recorded yet.")


def _iteration_section(data: dict[str, Any]) -> str:
    rows = [[key, d.get("reason", "-"), fmt("steps", d.get("step")), fmt("eval_loss", d.get("eval_loss")),
             fmt("eval_loss", d.get("best_eval_loss")), d.get("detail", "")]
            for key, d in sorted(data["iteration_decisions"].items(), key=lambda item: iteration_order(item[0]))]
    if not rows:
        return ""
    return "## Iteration exits\n\n" + markdown_table(["iteration", "reason", "step", "eval loss", "best eval loss", "detail"], rows)


def _plot_section(data: dict[str, Any]) -> str:
    images = [f"### {title}\n\n![{title}]({name})" for title, name in data.get("plots", {}).items()]
    return "## Plots\n\n" + "\n\n".join(images) if images else ""


def markdown_report(data: dict[str, Any]) -> str:
    """report.md: run facts, per-depth table, per-stage totals, reference scores, comparison, decision traces,
    plots."""
    sections = [_header(data), _depth_section(data), _stage_section(data), _reference_section(data),
                _comparison_section(data),
                _decision_section(data), _iteration_section(data), _plot_section(data)]
    return "\n\n".join(section for section in sections if section) + "\n"
