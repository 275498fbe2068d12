"""Per-stage totals of a run, from its manifest: where the time went and how fast each stage ran.

Stages, in pipeline order: ``tokenize``, ``stage1`` (or ``e2e``), ``snapshot`` (every SnapCheck depth),
``stage2`` (every middle layer) and ``export``. ``wall_s`` is the driver's time: for a training stage the
sum of its layers' ``driver_wall_s`` (Ray Train start-up included), for the others the jobs' time.
``tokens_per_wall_s`` is tokens over that wall time, on every row with tokens. Training stages also sum
their layers' training time (the loops' time less their evaluations) and shard-read waits:
``training_tokens_per_s`` and ``data_wait_share`` are over that training time, as per layer; the peak is
the highest layer's. ``tokens_per_s`` (kept for readers of older reports) is ``training_tokens_per_s`` on
training rows and ``tokens_per_wall_s`` on tokenize and snapshot rows. A layer's metrics are rank 0's, so
its tokens are counted once per data-parallel worker (``world_size``): the stage's tokens and rates are
the whole worker group's, like the snapshot row's. Snapshot jobs report rows, bytes and write
throughput. Only finished work is counted.
"""

from __future__ import annotations

from typing import Any

from segprop_ray.storage.manifest import LayerRecord, Manifest, StepRecord

STAGE_COLUMNS = ["stage", "items", "wall_s", "tokens", "tokens_per_s", "tokens_per_wall_s", "training_tokens_per_s",
                 "data_wait_share", "peak_memory_bytes", "bytes_written", "written_mb_per_s"]
"""Columns of the per-stage table (``stages`` in report.json, the stage table of report.md)."""


def stage_rows(manifest: Manifest) -> list[dict[str, Any]]:
    """One row per stage that has finished work, in pipeline order (missing figures are None)."""
    rows = []
    tokenize = manifest.steps.get("tokenize")
    if tokenize is not None and tokenize.status == "done":
        tokens = _sum(info.get("num_blocks", 0) * info.get("seq_len", 0) for info in manifest.tokens.values())
        rate = _rate(tokens, tokenize.wall_s)
        rows.append(_row("tokenize", 1, tokenize.wall_s, tokens=tokens or None, tokens_per_s=rate, tokens_per_wall_s=rate))
    for stage in ("stage1", "e2e"):
        rows += _training_rows(manifest, stage)
    snapshots = _done_steps(manifest, "snapshot:")
    if snapshots:
        rows.append(_snapshot_row(manifest, snapshots))
    rows += _training_rows(manifest, "stage2")
    exports = _done_steps(manifest, "export:")
    if exports:
        rows.append(_row("export", len(exports), _sum(step.wall_s for step in exports)))
    return rows


def _row(stage: str, items: int, wall_s: float | None, **figures: Any) -> dict[str, Any]:
    row = {column: None for column in STAGE_COLUMNS}
    row.update(stage=stage, items=items, wall_s=None if wall_s is None else round(wall_s, 2), **figures)
    return row


def _done_steps(manifest: Manifest, prefix: str) -> list[StepRecord]:
    return [step for name, step in manifest.steps.items() if name.startswith(prefix) and step.status == "done"]


def _training_rows(manifest: Manifest, stage: str) -> list[dict[str, Any]]:
    records: list[LayerRecord] = [r for r in manifest.layers.values() if r.stage == stage and r.status == "done"]
    if not records:
        return []
    metrics = [r.metrics for r in records]
    tokens = _sum(m["tokens"] * (m.get("world_size") or 1) for m in metrics if m.get("tokens") is not None)
    train_s = _sum((m.get("wall_s") or 0.0) - (m.get("eval_s") or 0.0) for m in metrics)
    waited = _sum(m.get("data_wait_s") for m in metrics)
    wall = _sum(m.get("driver_wall_s", m.get("wall_s")) for m in metrics)
    peaks = [m["peak_memory_bytes"] for m in metrics if m.get("peak_memory_bytes") is not None]
    training_rate = _rate(tokens, train_s)
    return [_row(stage, len(records), wall, tokens=tokens, tokens_per_s=training_rate,
                 tokens_per_wall_s=_rate(tokens, wall), training_tokens_per_s=training_rate,
                 data_wait_share=round(waited / train_s, 4) if waited is not None and train_s else None,
                 peak_memory_bytes=max(peaks) if peaks else None)]


def _snapshot_row(manifest: Manifest, steps: list[StepRecord]) -> dict[str, Any]:
    wall = _sum(step.wall_s for step in steps)
    written = _sum(step.outputs.get("bytes") for step in steps)
    seq = {split: info.get("seq_len") for split, info in manifest.tokens.items()}
    tokens = _sum(rows * (seq.get(split) or 0) for step in steps for split, rows in step.outputs.get("rows", {}).items())
    rate = _rate(tokens, wall)
    return _row("snapshot", len(steps), wall, tokens=tokens or None, tokens_per_s=rate, tokens_per_wall_s=rate,
                bytes_written=written,
                written_mb_per_s=round(written / wall / 1e6, 2) if written and wall else None)


def _rate(tokens: float | None, seconds: float | None) -> float | None:
    """Tokens per second to one decimal; None without tokens or time."""
    return round(tokens / seconds, 1) if tokens and seconds else None


def _sum(values) -> float | None:
    """Sum of the values that are not None; None if all are."""
    present = [value for value in values if value is not None]
    return sum(present) if present else None
