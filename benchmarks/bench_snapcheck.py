"""SnapCheck in the training-step benchmark: the snapshot job's write and the reader, against what bounds them.

- ``snap_write``: the snapshot job's per-file work, ``transform_file`` S[p] -> S[p+1] with one committed layer
  through ``core.iteration.snapshot_forward`` (what ``SnapshotActor.apply`` calls), with the run's write options,
  ``--snap-files`` files at once (as ``resources.snapshot.files_per_actor``). After it, in the same process, the
  raw copy of the same bytes: every source file read cold and its output's size written as a plain file, fsynced.
- ``read_shards``: the streaming reader alone over S[p]'s train split in a training epoch's order, with the run's
  ``read_threads`` and ``prefetch_groups`` (``ReadStats``).

:func:`build` compares, within one run: ``snap_write`` with the reference's one-layer forward + host copy
(``snap_write_1layer_d2h``) and with the raw copy; the reader's GB/s with what each Stage 2 step of the same run
consumes (activation bytes of one micro-batch per median step, the project's and the reference's).
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from bench_setup import BenchPlan, snapshot_hash

GOAL_SNAP_RATIO = 0.90
STEP_KINDS = ("lw_snap", "seg_snap")


def run_snap_write(plan: BenchPlan, prefix: int, device: torch.device, files: int = 1,
                   cold: bool = True) -> dict[str, Any]:
    """S[p+1] = f_{p+1}(S[p]) for every file (warm-up: the eval split), then the raw copy of the train files; with
    ``cold``, the source files leave the page cache before every pass, as before the raw copy's."""
    from bench_variants import job_context
    from segprop_ray.core.iteration import build_segment, snapshot_forward
    from segprop_ray.storage.snapcheck import commit_depth, transform_file

    depth = prefix + 1
    ctx = job_context(plan, "segprop", prefix, depth, snapshot_hash(prefix))
    start = time.perf_counter()
    parts = ctx.parts(device)
    weights = ctx.run_weights(ctx.plan(parts.num_layers), committed_layers=[depth], parts=parts)
    producer = build_segment(parts, weights.snapshot_spec(depth), trainable=False)  # layer p+1 alone
    build_s, cfg, spent = time.perf_counter() - start, ctx.cfg, {"fn_s": 0.0}

    def apply(rows: dict[str, torch.Tensor]) -> torch.Tensor:  # = SnapshotActor.apply
        begin = time.perf_counter()
        result = snapshot_forward(producer, rows, cfg.snapcheck.dtype, cfg.training.bf16, device)
        spent["fn_s"] += time.perf_counter() - begin
        return result

    spec, options, written = plan.spec(), cfg.snapcheck.write_options(), {}
    passes = {"eval": 1, "train": max(1, -(-plan.snap_tokens // (plan.train_blocks * plan.seq)))}
    for split, count in (("eval", plan.eval_blocks), ("train", plan.train_blocks)):
        spent["fn_s"], wall = 0.0, 0.0
        with ThreadPoolExecutor(files) as pool:
            for _ in range(passes[split]):  # each pass rewrites the split's files, as a job writes further files
                if cold:
                    for i in range(spec.num_files(count)):
                        evict(ctx.layout.shard_file(split, prefix, i))
                begin = time.perf_counter()
                written[split] = list(pool.map(lambda i, split=split: transform_file(
                    ctx.layout, split, i, source_depth=prefix, depth=depth, fn=apply, spec=spec, options=options,
                    pin_memory=device.type == "cuda"), range(spec.num_files(count))))
                wall += time.perf_counter() - begin
    for split, infos in written.items():
        commit_depth(ctx.layout, split, depth, infos, snapshot_hash(depth), spec)
    tokens = passes["train"] * plan.train_blocks * plan.seq
    out_bytes = passes["train"] * sum(info.bytes for info in written["train"])
    raw_s = raw_copy_seconds(plan, prefix, [info.bytes for info in written["train"]], passes["train"])
    return {"tokens": tokens, "wall_s": round(wall, 4), "tokens_per_s": round(tokens / wall, 1),
            "median_step_s": None, "fn_s": round(spent["fn_s"], 4), "fn_share": round(spent["fn_s"] / wall, 4),
            "forward_tokens_per_s": round(tokens / spent["fn_s"], 1),  # snapshot_forward alone, as the job calls it
            "io_s": round(wall - spent["fn_s"], 4), "files": len(written["train"]), "files_at_once": files,
            "passes": passes["train"],
            "written_bytes": out_bytes, "written_mb_per_s": round(out_bytes / wall / 1e6, 1),
            "raw_copy_s": round(raw_s, 4), "time_vs_raw_copy": round(wall / raw_s, 3),
            "upload_part_bytes": options.upload_part_bytes, "build_s": round(build_s, 3), "trainable_params": 0,
            "frozen_params_in_forward": sum(p.numel() for p in producer.parameters())}


def raw_copy_seconds(plan: BenchPlan, prefix: int, sizes: list[int], passes: int = 1) -> float:
    """Seconds to read each train file of S[p] cold and write its output's size as a plain fsynced file, ``passes``
    times (as snap_write's passes)."""
    from segprop_ray.storage.layout import RunLayout

    layout, out = RunLayout.open(plan.run_dir), Path(plan.work_dir) / "raw-copy"
    out.mkdir(exist_ok=True)
    sources = [layout.shard_file("train", prefix, i) for i in range(len(sizes))]
    seconds = 0.0
    for _ in range(passes):
        for source in sources:
            evict(source)
        begin = time.perf_counter()
        for index, (source, size) in enumerate(zip(sources, sizes)):
            data = Path(source).read_bytes()
            data = data[:size] if len(data) >= size else data + bytes(size - len(data))
            with open(out / f"part-{index:05d}.bin", "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
        seconds += time.perf_counter() - begin
    return seconds


def evict(path: str) -> None:
    """Drop a local file from the page cache."""
    handle = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(handle, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(handle)


def run_read_shards(plan: BenchPlan, prefix: int, device: torch.device) -> dict[str, Any]:
    """The streaming reader alone over S[p]'s train split, in a training epoch's order (``ReadStats``)."""
    from bench_variants import job_context
    from segprop_ray.core.data_order import BlockOrder
    from segprop_ray.storage.reader import epoch_reader
    from segprop_ray.storage.snapcheck import load_committed

    ctx = job_context(plan, "segprop", prefix, prefix + 1, snapshot_hash(prefix))
    snap, layout = ctx.cfg.snapcheck, ctx.layout
    marker = load_committed(layout, "train", prefix, snapshot_hash(prefix), plan.train_blocks, plan.spec())
    order = BlockOrder(plan.train_blocks, plan.group_size, plan.batch, 0, True)
    reader = epoch_reader(layout, marker, order, 0, prefetch_groups=snap.prefetch_groups,
                          pin_memory=device.type == "cuda", read_threads=snap.read_threads)
    start = time.perf_counter()
    rows = sum(len(batch["input_ids"]) for batch in reader)
    wall = time.perf_counter() - start
    stats = reader.stats
    return {"tokens": rows * plan.seq, "wall_s": round(wall, 4), "tokens_per_s": round(rows * plan.seq / wall, 1),
            "median_step_s": None, "bytes_read": stats.bytes_read, "groups_read": stats.groups_read,
            "read_seconds": round(stats.read_seconds, 4), "wait_seconds": round(stats.wait_seconds, 4),
            "gb_per_s": round(stats.bytes_read / wall / 1e9, 3), "read_threads": snap.read_threads,
            "prefetch_groups": snap.prefetch_groups, "pinned": reader.pin_memory, "trainable_params": 0}


def build(plan: BenchPlan, records: list[dict[str, Any]]) -> dict[str, Any]:
    """The SnapCheck figures of one run: per repeat and best, each ratio from records of the same run."""
    by_key: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for record in records:
        if "error" not in record:
            by_key.setdefault((record["impl"], record["variant"]), []).append(record)
    ref_speed = {r["repeat"]: r["tokens_per_s"] for r in by_key.get(("reference", "snap_write_1layer_d2h"), [])}
    writes = {name: snap_write_figures(records_of, ref_speed) for (impl, name), records_of in sorted(by_key.items())
              if impl == "project" and name.split("@")[0] == "snap_write"}
    return {"snap_write": writes, "read_shards": reader_vs_steps(plan, by_key)}


def snap_write_figures(mine: list[dict[str, Any]], ref_speed: dict[int, float]) -> dict[str, Any]:
    """One snap_write variant's ratios to the reference forward (job and forward alone) and to the raw copy."""
    per_repeat = [round(r["tokens_per_s"] / ref_speed[r["repeat"]], 3) for r in mine if r["repeat"] in ref_speed]
    return {"files_at_once": mine[0]["files_at_once"], "tokens_per_s_per_repeat": [r["tokens_per_s"] for r in mine],
            "ratio_to_reference_per_repeat": per_repeat,
            "forward_ratio_to_reference_per_repeat": [round(r["forward_tokens_per_s"] / ref_speed[r["repeat"]], 3)
                                                      for r in mine if r["repeat"] in ref_speed],
            "time_vs_raw_copy_per_repeat": [r["time_vs_raw_copy"] for r in mine],
            "fn_share_per_repeat": [r["fn_share"] for r in mine],
            "load_avg_per_repeat": [r["load_avg"][0][0] for r in mine],
            "met": None if not per_repeat else min(per_repeat) >= GOAL_SNAP_RATIO}


def reader_vs_steps(plan: BenchPlan, by_key: dict) -> list[dict[str, Any]]:
    """The reader's GB/s (best repeat) against each Stage 2 step's need: one micro-batch of activations per step."""
    reads = by_key.get(("project", "read_shards"), [])
    if not reads:
        return []
    supply = max(r["gb_per_s"] for r in reads)
    batch_bytes = plan.batch * plan.seq * plan.hidden_size * 2
    rows = []
    for impl in ("project", "reference"):
        for kind in STEP_KINDS:
            steps = by_key.get((impl, kind), [])
            if steps:
                step_s = min(r["median_step_s"] for r in steps)
                need = batch_bytes / step_s / 1e9
                rows.append({"step": f"{impl} {kind}", "median_step_s": step_s, "need_gb_per_s": round(need, 3),
                             "reader_gb_per_s": supply, "supply_over_need": round(supply / need, 2)})
    return rows


def render(report: dict[str, Any]) -> str:
    """The SnapCheck figures as text."""
    lines = ["SnapCheck (issue 17)"]
    for name, write in report["snap_write"].items():
        verdict = {True: "met", False: "MISSED", None: "n/a"}[write["met"]]
        lines += [f"  {name} ({write['files_at_once']} file(s) at once) / reference 1-layer forward, per repeat: "
                  f"{write['ratio_to_reference_per_repeat']} (goal >= {GOAL_SNAP_RATIO} in every repeat: {verdict})",
                  f"    its forward alone / reference: {write['forward_ratio_to_reference_per_repeat']}; forward share "
                  f"{write['fn_share_per_repeat']}; time / raw copy {write['time_vs_raw_copy_per_repeat']}; "
                  f"load {write['load_avg_per_repeat']}"]
    lines += [f"  reader {r['reader_gb_per_s']} GB/s vs {r['step']} ({r['median_step_s']} s/step) needs "
              f"{r['need_gb_per_s']} GB/s: {r['supply_over_need']}x" for r in report["read_shards"]]
    return "\n".join(lines)
