"""The comparison's report as text: report.md (Table 1, score and compute per run, Figure 2), table1.csv, runs.csv.

Drawn from the mapping of :func:`segprop_ray.reporting.compare_report.build_compare_report` only.
"""

from __future__ import annotations

from typing import Any, Sequence

from segprop_ray.reporting.report_text import fmt, markdown_table, rows_csv

METRIC_TITLES = {"eval_loss": "held-out loss (eval loss) by exit depth",
                 "accuracy": "multiple-choice accuracy by exit depth"}
"""Table 1's title per score."""
RUN_TABLE = [("run", "run", "text"), ("mode", "mode", "text"), ("base_depth", "p", "depth"),
             ("last_layers", "r", "depth"), ("state", "state", "text"), ("exits", "exits", "depth"),
             ("best_depth", "best exit", "depth"), ("best_eval_loss", "best eval loss", "eval_loss"),
             ("final_depth", "final exit", "depth"), ("final_eval_loss", "final eval loss", "eval_loss"),
             ("final_accuracy", "final accuracy", "accuracy"), ("training_tokens", "training tokens", "tokens"),
             ("wall_s", "wall s", "wall_s"), ("peak_memory_bytes", "peak memory", "peak_memory_bytes")]
"""(key of :func:`run_row`, heading, :func:`~.report_text.fmt` key) of the score-and-compute table."""
RUN_CSV_COLUMNS = [key for key, _, _ in RUN_TABLE] + ["iterations", "run_dir"]


def run_row(entry: dict[str, Any]) -> dict[str, Any]:
    """A run's line of the score-and-compute table: its facts, best and final score, and what it spent."""
    run = entry["run"]
    return {"run": entry["name"], "mode": run["mode"], "base_depth": run["base_depth"],
            "last_layers": run["last_layers"], "state": run["state"], "exits": len(entry["layers"]),
            **entry["score"], **entry["compute"], "run_dir": run["run_dir"]}


def runs_csv_rows(entries: Sequence[dict[str, Any]]) -> str:
    """runs.csv: one line per run (:data:`RUN_CSV_COLUMNS`)."""
    return rows_csv([run_row(entry) for entry in entries], RUN_CSV_COLUMNS)


def table1_csv(table: dict[str, Any]) -> str:
    """table1.csv: one line per depth, a ``<column> <score>`` value per column and score (empty: no exit there)."""
    by_depth: dict[int, dict[str, Any]] = {}
    for metric, rows in table["metrics"].items():
        for row in rows:
            line = by_depth.setdefault(row["depth"], {"depth": row["depth"]})
            line.update({f"{column} {metric}": row[column] for column in table["columns"]})
    headers = ["depth"] + [f"{column} {metric}" for metric in table["metrics"] for column in table["columns"]]
    return rows_csv([by_depth[depth] for depth in sorted(by_depth)], headers)


def _header(report: dict[str, Any]) -> str:
    model = report["model"]
    written = report.get("spec", {}).get("runs") or {}
    runs = [f"`{entry['name']}` (`{written.get(entry['name'], entry['run']['mode'])}`): {entry['run']['state']}, "
            f"{entry['run']['run_dir']}" for entry in report["runs"]]
    original = report["input_model"]
    scored = (f"eval loss {fmt('eval_loss', original.get('eval_loss'))}, accuracy {fmt('accuracy', original.get('accuracy'))} "
              f"(scored by run `{original['run']}`)" if original else "not scored (no run has evaluation.baseline on)")
    facts = [("model", f"{model['uri']} ({model['architecture']}, {model['num_layers']} decoder layers)"),
             ("compare directory", report.get("out") or "-"), ("input model", scored)]
    lines = [f"- **{name}**: {value}" for name, value in facts] + ["- **runs**:"] + [f"  - {run}" for run in runs]
    return f"# SegProp comparison: {len(runs)} runs on {model['uri']}\n\n" + "\n".join(lines)


def _table1_sections(report: dict[str, Any]) -> str:
    table = report["table1"]
    note = (f"Exit depth q: decoder layers 0..q followed by the run's LL (its last r layers, the final norm and the "
            f"LM head). The input model and an e2e run are whole models: their score is on the row of the last "
            f"layer ({table['full_depth']}). `-`: no committed exit of that run at that depth. All numbers are each "
            "run's own evaluation on the same held-out data.")
    sections = []
    for metric, rows in table["metrics"].items():
        cells = [[fmt("depth", row["depth"])] + [fmt(metric, row[column]) for column in table["columns"]] for row in rows]
        sections.append(f"## Table 1: {METRIC_TITLES.get(metric, metric)}\n\n"
                        + markdown_table(["depth", *table["columns"]], cells))
    return "\n\n".join(sections) + "\n\n" + note


def _runs_section(report: dict[str, Any]) -> str:
    rows = [[fmt(kind, row.get(key)) if kind != "text" else str(row.get(key)) for key, _, kind in RUN_TABLE]
            for row in map(run_row, report["runs"])]
    note = ("Training tokens are every worker's, over all of the run's iterations; wall s is the pipeline's time "
            "(tokenize, every training iteration with its Ray Train start-up, snapshots, export; evaluations run "
            "beside training); peak memory is the highest of one training worker. runs.csv has the same lines.")
    return ("## Score and compute per run\n\n" + markdown_table([heading for _, heading, _ in RUN_TABLE], rows)
            + "\n\n" + note)


def _plot_section(report: dict[str, Any]) -> str:
    plots = report.get("plots", {})
    parts = []
    if "Score by depth" in plots:
        parts.append("## Figure 2: score by exit depth\n\nOne line per run; e2e (solid) and the input model (dashed) "
                     f"as horizontal references.\n\n![score by depth]({plots['Score by depth']})")
    others = [f"### {title}\n\n![{title}]({name})" for title, name in plots.items() if title != "Score by depth"]
    if others:
        parts.append("## More plots\n\n" + "\n\n".join(others))
    return "\n\n".join(parts)


def compare_markdown(report: dict[str, Any]) -> str:
    """report.md of a comparison: the set, Table 1 per score, score and compute per run, Figure 2 and the rest."""
    files = ("Every run's own report (per-iteration curves, stage times, exit decisions): `segprop report RUN_DIR`. "
             "report.json holds everything here; report.csv every committed exit of every run (all columns); "
             "table1.csv Table 1; runs.csv the per-run table.")
    sections = [_header(report), _table1_sections(report), _runs_section(report), _plot_section(report), files]
    return "\n\n".join(section for section in sections if section) + "\n"
