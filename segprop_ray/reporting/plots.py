"""PNG plots of a report mapping (see :func:`segprop_ray.reporting.report.build_report`).

Figures are built with matplotlib's object API on the Agg renderer (no pyplot, no global backend
switch, safe in any thread). Runs with depths are drawn as lines over the exit depth; a run in
``e2e`` mode has one final model, so it is drawn as a horizontal line at its score (as in the
paper's Figure 2), and the original model's score as a dashed grey line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from segprop_ray.core.plan import iteration_order
from segprop_ray.reporting.report_text import iteration_wall_s

DPI = 110
GIB = float(1 << 30)
PLOT_FILES = {
    "Score by depth": "metric_vs_depth.png",
    "Loss curves per iteration": "loss_curves.png",
    "nHSIC by depth": "nhsic.png",
    "Efficiency by depth": "efficiency.png",
    "Time per stage": "time_per_stage.png",
}
"""Plot title -> file name; a plot without data is not written."""


def run_series(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The runs to draw: the report's run first, then the compared ones, each with a colour."""
    runs = [_series(data["run"], data["layers"])] + [_series(o["run"], o["layers"]) for o in data["compared"]]
    for index, run in enumerate(runs):
        run["color"] = "black" if run["mode"] == "e2e" else f"C{index}"
    return runs


def subject(data: dict[str, Any]) -> str:
    """What the figures are titled after: the report's ``title`` when it has one (a comparison), else its run."""
    return data.get("title") or data["run"]["label"]


def _series(run: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """A run to draw; ``final_only`` for a run of one iteration over every layer (``e2e``, ``lora``), drawn at its
    final score (reports written before the flag: ``e2e``)."""
    final_only = bool(run.get("end_to_end", run["mode"] == "e2e"))
    return {"label": run["label"], "mode": run["mode"], "final_only": final_only, "rows": rows}


def points(rows: list[dict[str, Any]], key: str, scale: float = 1.0) -> tuple[list[int], list[float]]:
    """(depths, values) of the exit rows that have ``key`` (an attention half's row is no exit)."""
    kept = [row for row in rows if row.get(key) is not None and row.get("part") != "attn"]
    return [row["depth"] for row in kept], [row[key] / scale for row in kept]


def draw_metric(ax, runs: list[dict[str, Any]], key: str, scale: float = 1.0, original: float | None = None) -> bool:
    """Draw ``key`` over depth for each run (e2e: horizontal line at its last value); whether anything was drawn.

    The original model's score is a dashed line; when it lies far outside the runs' range (a loss
    before fine-tuning), the axis keeps the runs' range and the legend gives the value instead.
    """
    drawn: list[float] = []
    for run in runs:
        depths, values = points(run["rows"], key, scale)
        if not values:
            continue
        drawn += values
        if run["final_only"]:
            ax.axhline(values[-1], color=run["color"], linestyle="-", linewidth=1.5, label=f"{run['label']} (final)")
        else:
            ax.plot(depths, values, marker="o", color=run["color"], label=run["label"])
    if original is not None:
        _draw_original(ax, original / scale, drawn)
    return bool(drawn)


def _draw_original(ax, value: float, drawn: list[float]) -> None:
    low, high = (min(drawn), max(drawn)) if drawn else (value, value)
    margin = max(high - low, 1e-9)
    off_scale = drawn and not (low - 2 * margin <= value <= high + 2 * margin)
    label = f"original model: {value:.4g} (off the scale)" if off_scale else "original model"
    ax.axhline(value, color="grey", linestyle="--", linewidth=1.2, label=label)
    if off_scale:
        ax.set_ylim(low - 0.15 * margin, high + 0.15 * margin)


def _original(data: dict[str, Any], key: str) -> float | None:
    for ref in data["references"]:
        if ref["label"] == "original model" and ref.get(key) is not None:
            return ref[key]
    return None


DEPTH_LABEL = "exit depth q (layers 0..q + LL)"


def _finish(ax, title: str, ylabel: str, xlabel: str = DEPTH_LABEL) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    if xlabel == DEPTH_LABEL:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # depths are layer indices
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def _has(runs: list[dict[str, Any]], key: str) -> bool:
    return any(row.get(key) is not None for run in runs for row in run["rows"])


def plot_metric_vs_depth(data: dict[str, Any], path: Path) -> bool:
    """Eval loss (and accuracy when recorded) by exit depth, the run beside the compared runs."""
    runs = run_series(data)
    keys = [("eval_loss", "held-out loss"), ("accuracy", "multiple-choice accuracy")]
    keys = [(key, title) for key, title in keys if _has(runs, key) or _original(data, key) is not None]
    if not keys:
        return False
    figure = Figure(figsize=(6.5 * len(keys), 4.8), dpi=DPI)
    for ax, (key, title) in zip(figure.subplots(1, len(keys), squeeze=False)[0], keys):
        draw_metric(ax, runs, key, original=_original(data, key))
        _finish(ax, title, key.replace("_", " "))
    figure.suptitle(f"{subject(data)}: score of each exit")
    return _save(figure, path)


def plot_loss_curves(data: dict[str, Any], path: Path) -> bool:
    """Train and eval loss against the step, one line per iteration (depth), and the learning rate."""
    histories = {key: records for key, records in data["histories"].items() if records}
    keys = [key for key in ("train_loss", "eval_loss", "lr") if any(key in r for rs in histories.values() for r in rs)]
    if not keys:
        return False
    colours = colormaps["viridis"]
    figure = Figure(figsize=(5.5 * len(keys), 4.6), dpi=DPI)
    axes = figure.subplots(1, len(keys), squeeze=False)[0]
    for order, name in enumerate(sorted(histories, key=iteration_order)):
        colour = colours(order / max(len(histories) - 1, 1))
        label = f"depth {name}".replace("-attn", " attn")
        for ax, key in zip(axes, keys):
            kept = [r for r in histories[name] if key in r]
            marker = "o" if key == "eval_loss" else None
            ax.plot([r["step"] for r in kept], [r[key] for r in kept], color=colour, marker=marker, label=label)
    for ax, key in zip(axes, keys):
        _finish(ax, key.replace("_", " "), key.replace("_", " "), xlabel="step within the iteration")
    figure.suptitle(f"{subject(data)}: loss curves of each iteration")
    return _save(figure, path)


def plot_nhsic(data: dict[str, Any], path: Path) -> bool:
    """nHSIC(X; Z) and nHSIC(Y; Z) by depth per run, and the information plane (X vs Y dependence)."""
    runs = [run for run in run_series(data) if _has([run], "nhsic_input") or _has([run], "nhsic_label")]
    if not runs:
        return False
    figure = Figure(figsize=(17, 4.8), dpi=DPI)
    axes = figure.subplots(1, 3)
    for ax, key, title in ((axes[0], "nhsic_input", "nHSIC(X; Z): input kept"),
                           (axes[1], "nhsic_label", "nHSIC(Y; Z): next token")):
        draw_metric(ax, runs, key)
        ax.set_ylim(-0.02, 1.02)
        _finish(ax, title, "nHSIC")
    _information_plane(axes[2], runs)
    figure.suptitle(f"{subject(data)}: dependence of each exit's representation on input and label")
    return _save(figure, path)


def _information_plane(ax, runs: list[dict[str, Any]]) -> None:
    for run in runs:
        kept = [r for r in run["rows"] if r.get("nhsic_input") is not None and r.get("nhsic_label") is not None]
        ax.plot([r["nhsic_input"] for r in kept], [r["nhsic_label"] for r in kept], marker="o", color=run["color"],
                label=run["label"])
        for row in kept:
            ax.annotate(str(row["depth"]), (row["nhsic_input"], row["nhsic_label"]), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    _finish(ax, "information plane (numbers: depth)", "nHSIC(Y; Z)", xlabel="nHSIC(X; Z)")


def _cumulative_wall(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    total, result = 0.0, []
    for row in rows:
        if row.get("wall_s") is not None:
            total += row["wall_s"]
            result.append({"depth": row["depth"], "cumulative_wall_s": total})
    return result


def plot_efficiency(data: dict[str, Any], path: Path) -> bool:
    """Score next to throughput, time and memory per depth (and time spent so far), for each run.

    The iteration's wall time is the driver's (Ray Train start-up included, see
    :func:`~segprop_ray.reporting.report_text.iteration_wall_s`); tokens/s, the read-wait share and the
    cumulative time are over the training loop's time.
    """
    runs = run_series(data)
    if not any(_has(runs, key) for key in ("tokens_per_s", "wall_s", "peak_memory_bytes")):
        return False
    score = "accuracy" if _has(runs, "accuracy") else "eval_loss"
    for run in runs:
        run["rows"] = [{**row, **cum, "iteration_wall_s": iteration_wall_s(row)}
                       for row, cum in _join_cumulative(run["rows"])]
    panels = [(score, 1.0, score.replace("_", " ")), ("tokens_per_s", 1.0, "training tokens / s"),
              ("iteration_wall_s", 1.0, "wall time of the iteration, driver (s)"),
              ("peak_memory_bytes", GIB, "peak memory (GiB)"),
              ("data_wait_share", 1.0, "share of training time waiting for data"),
              ("cumulative_wall_s", 1.0, "training-loop time up to this depth (s)")]
    figure = Figure(figsize=(16, 8.5), dpi=DPI)
    for ax, (key, scale, title) in zip(figure.subplots(2, 3).flat, panels):
        if not draw_metric(ax, runs, key, scale, _original(data, key) if key == score else None):
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes, color="grey")
        _finish(ax, title, title)
    figure.suptitle(f"{subject(data)}: efficiency of each exit (e2e: its single run)")
    return _save(figure, path)


def plot_time_per_stage(data: dict[str, Any], path: Path) -> bool:
    """Where the run's time went: wall time per stage (bars), with its throughput written beside each bar.

    Beside a bar: tokens over the wall time, and for a training stage its training tokens/s (over the
    training loops' time, see :mod:`segprop_ray.reporting.stages`).
    """
    stages = [row for row in data.get("stages", []) if row.get("wall_s")]
    if not stages:
        return False
    figure = Figure(figsize=(9, 0.6 * len(stages) + 1.6), dpi=DPI)
    ax = figure.subplots()
    names = [f"{row['stage']} ({row['items']})" for row in stages][::-1]
    walls = [row["wall_s"] for row in stages][::-1]
    bars = ax.barh(names, walls, color=[f"C{i}" for i in range(len(stages))][::-1])
    for bar, row in zip(bars, stages[::-1]):
        ax.annotate(f"{row['wall_s']:,.1f} s{_stage_speed(row)}", (bar.get_width(), bar.get_y() + bar.get_height() / 2),
                    xytext=(4, 0), textcoords="offset points", va="center", fontsize=9)
    ax.set_xlim(0, max(walls) * 1.9)
    total = sum(walls)
    _finish(ax, f"{subject(data)}: wall time per stage (total {total:,.0f} s; in brackets: layers, depths or jobs)",
            "stage", xlabel="wall time (s)")
    return _save(figure, path)


def _stage_speed(row: dict[str, Any]) -> str:
    """The rates written beside a stage's bar: tokens over its wall time, and its training tokens/s."""
    speeds = [f"  {row[key]:,.0f} {unit}" for key, unit in (("tokens_per_wall_s", "tokens/s"),
                                                             ("training_tokens_per_s", "training tokens/s"))
              if row.get(key)]
    return "".join(speeds)


def _join_cumulative(rows: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    cumulative = {entry["depth"]: entry for entry in _cumulative_wall(rows)}
    return [(row, {"cumulative_wall_s": cumulative.get(row["depth"], {}).get("cumulative_wall_s")}) for row in rows]


def _save(figure: Figure, path: Path) -> bool:
    figure.tight_layout()
    figure.savefig(path, format="png")
    return True


PLOTTERS: dict[str, Callable[[dict[str, Any], Path], bool]] = {
    "Score by depth": plot_metric_vs_depth,
    "Loss curves per iteration": plot_loss_curves,
    "nHSIC by depth": plot_nhsic,
    "Efficiency by depth": plot_efficiency,
    "Time per stage": plot_time_per_stage,
}


def write_plots(out_dir: Path, data: dict[str, Any]) -> dict[str, str]:
    """Write every plot that has data into ``out_dir``; returns title -> file name of those written."""
    written = {}
    for title, plot in PLOTTERS.items():
        if plot(data, out_dir / PLOT_FILES[title]):
            written[title] = PLOT_FILES[title]
    return written
