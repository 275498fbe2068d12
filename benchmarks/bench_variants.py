"""The timed variants of the training-step benchmark, each run with the project's own code.

- ``e2e``: ``SegmentRun`` of an ``e2e`` run (the whole model), fed from the token shards.
- ``seg_snap``: ``SegmentRun`` of Stage 2 iteration q = p+1, fed from the SnapCheck shards S[p] by the
  streaming reader (exactly the body of the Ray Train worker).
- ``seg_recompute``: the same trainable segment (``build_segment`` of ``training_spec(q)``) behind the frozen
  prefix ``snapshot_spec(p)`` (embedder + layers 0..p) run under no_grad every step, fed from the token
  shards, trained with ``SegmentLoop``: what Stage 2 costs without SnapCheck.
- ``lw_snap``: ``SegmentRun`` of an ``lw`` run (r = 0), from S[p].
- ``snap_write``, ``read_shards``: the snapshot job's per-file work and the streaming reader alone
  (``bench_snapcheck``).

A suffix ``@p<d>`` runs a stage-2 variant at prefix depth d instead of the default p.
Run as ``python benchmarks/bench_variants.py PLAN.json VARIANT[,VARIANT...]`` (one JSON line per variant,
prefixed ``BENCH_RESULT``), or ``... PLAN.json reference -- ARGS`` for the reference script. Never imports Ray.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import bench_setup
from bench_snapcheck import run_read_shards, run_snap_write
from bench_probes import (SavedTensorProbe, StepTimer, TensorPeakProbe, load_average, peak_since_reset,
                          process_max_rss, reset_peak, rss_bytes, sync, threads, variant_flops)
from bench_setup import TOKENS_HASH, BenchPlan, snapshot_hash

import torch
from torch import nn

PREFIX = "BENCH_RESULT "
KINDS = ("e2e", "seg_snap", "seg_recompute", "lw_snap", "snap_write", "read_shards")


def parse_variant(name: str, plan: BenchPlan) -> tuple[str, int]:
    """``seg_snap@p3`` -> (``seg_snap``, 3); no suffix: the plan's default p. ``snap_write@f2``: snap_write with 2
    files at once (see :func:`files_at_once`)."""
    kind, _, depth = name.split("@f")[0].partition("@p")
    if kind not in KINDS:
        raise SystemExit(f"unknown variant {name!r}; kinds: {', '.join(KINDS)}")
    return kind, int(depth) if depth else plan.prefix


def files_at_once(name: str, plan: BenchPlan) -> int:
    """Files snap_write writes at once: the ``@f<N>`` suffix, else ``--snap-files``."""
    return int(name.split("@f")[1]) if "@f" in name else plan.snap_files


def job_context(plan: BenchPlan, mode: str, prefix: int, depth: int, input_hash: str):
    """The ``JobContext`` the driver would hand the job training (or snapshotting) ``depth``."""
    from segprop_ray.pipeline.context import JobContext

    blocks = {"train": plan.train_blocks, "eval": plan.eval_blocks}
    return JobContext(plan.job_config(mode, prefix), depth, plan.group_size, blocks, dict(plan.files), input_hash)


def drop_page_cache(plan: BenchPlan) -> None:
    """Evict the run directory's shard files from the page cache, so reads come from the disk."""
    for path in Path(plan.run_dir).rglob("*.parquet"):
        handle = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(handle, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(handle)


# -- training variants ------------------------------------------------------------------------------
def run_segment_run(plan: BenchPlan, kind: str, prefix: int, device: torch.device) -> dict[str, Any]:
    """e2e, seg_snap and lw_snap: the Ray Train worker's body (``SegmentRun``) without Ray."""
    from segprop_ray.pipeline.segment_run import SegmentRun

    if kind == "e2e":
        ctx = job_context(plan, "e2e", prefix, plan.num_layers - 1, TOKENS_HASH)
    else:
        ctx = job_context(plan, "lw" if kind == "lw_snap" else "segprop", prefix, prefix + 1, snapshot_hash(prefix))
    start = time.perf_counter()
    run = SegmentRun(ctx, device)
    build_s = time.perf_counter() - start
    fed = count_batches(run.loop)
    result = train_timed(plan, run.loop, run.model, device)
    result.update(build_s=round(build_s, 3), manifest_metrics=run.metrics(), stage=run.stage,
                  iteration_s=round(build_s + run.loop.wall_s, 3), fed=fed)
    if kind != "e2e" and device.type == "cuda":
        result["h2d"] = h2d_probe(plan, device)
    return result


def count_batches(loop: Any) -> dict[str, int]:
    """Count the micro-batches the loop takes from its source, and those that carry stored activations."""
    source, fed = loop.batches, {"batches": 0, "with_hidden": 0, "hidden_bytes": 0}

    def counted(epoch: int, skip: int):
        for batch in source(epoch, skip):
            fed["batches"] += 1
            if "hidden" in batch:
                fed["with_hidden"] += 1
                fed["hidden_bytes"] += batch["hidden"].numel() * batch["hidden"].element_size()
            yield batch

    loop.batches = counted
    return fed


class PrefixRecompute(nn.Module):
    """Stage 2 without SnapCheck: the frozen prefix recomputed under no_grad, then the trainable segment."""

    def __init__(self, prefix: nn.Module, segment: nn.Module):
        super().__init__()
        self.prefix, self.segment = prefix, segment

    def forward(self, input_ids: torch.Tensor, hidden: torch.Tensor | None = None, position_ids=None, **loss) -> torch.Tensor:
        with torch.no_grad():
            hidden = self.prefix(input_ids, position_ids=position_ids)  # (B, T, H): S[p] of this batch
        return self.segment(input_ids, hidden=hidden, position_ids=position_ids, **loss)


def run_recompute(plan: BenchPlan, prefix: int, device: torch.device) -> dict[str, Any]:
    """seg_recompute: project pieces and loop, the prefix recomputed each step, fed from the token shards."""
    from segprop_ray.core.data_order import BlockOrder
    from segprop_ray.core.exits import IterationExit
    from segprop_ray.core.iteration import build_segment
    from segprop_ray.core.training import SegmentLoop
    from segprop_ray.storage.reader import epoch_reader
    from segprop_ray.storage.snapcheck import load_committed

    ctx = job_context(plan, "segprop", prefix, prefix + 1, TOKENS_HASH)
    start = time.perf_counter()
    parts = ctx.parts(device)
    run_plan = ctx.plan(parts.num_layers)
    weights = ctx.run_weights(run_plan, committed_layers=[], parts=parts)
    frozen = build_segment(parts, weights.snapshot_spec(prefix), trainable=False)  # embedder + layers 0..p
    model = PrefixRecompute(frozen, build_segment(parts, weights.training_spec(prefix + 1), trainable=True))
    args = ctx.cfg.training_for("stage2")
    marker = load_committed(ctx.layout, "train", None, TOKENS_HASH, plan.train_blocks, plan.spec())
    order = BlockOrder(plan.train_blocks, plan.group_size, plan.batch, args.seed, True)

    def batches(epoch: int, skip: int):
        return iter(epoch_reader(ctx.layout, marker, order, epoch, skip, with_hidden=False))

    loop = SegmentLoop(model, args, batches, order.batches_per_epoch(), device,
                       IterationExit.from_config(ctx.cfg.exit.layer, args))
    build_s = time.perf_counter() - start
    fed = count_batches(loop)
    result = train_timed(plan, loop, model, device)
    result.update(build_s=round(build_s, 3), iteration_s=round(build_s + loop.wall_s, 3), fed=fed,
                  frozen_params_in_forward=sum(p.numel() for p in frozen.parameters()))
    return result


def train_timed(plan: BenchPlan, loop: Any, model: nn.Module, device: torch.device) -> dict[str, Any]:
    """Run ``loop`` to its end with the step timer and the activation probe attached."""
    timer = StepTimer(loop, device)
    probe = SavedTensorProbe(model)
    tensors = TensorPeakProbe(loop, model, plan.profiled_step) if plan.profiled_step else None
    timer.start()
    try:
        loop.run()
    finally:
        if tensors is not None:
            tensors.close()
    sync(device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result = timer.summary(plan.warmup, plan.batch * plan.seq, timed=plan.steps)
    if tensors is not None:
        result.update(tensor_peak_bytes=tensors.peak_bytes, live_tensor_bytes=tensors.live_bytes)
    result.update(trainable_params=trainable, activation_bytes=probe.bytes, loop_wall_s=round(loop.wall_s, 3),
                  loop_data_wait_s=loop.data_wait_s, tokens=loop.state.tokens, steps_run=loop.state.step)
    # what a worker must hold at least: fp32 weights + grads + AdamW's two moments, one micro-batch's
    # saved activations and its input
    input_bytes = plan.batch * plan.seq * (plan.hidden_size * 4 + 8)
    result["budget_bytes"] = 16 * trainable + (probe.bytes or 0) + input_bytes
    return result


def h2d_probe(plan: BenchPlan, device: torch.device, repeats: int = 5) -> dict[str, float]:
    """ms to move one micro-batch of bf16 activations to the GPU as ``model_inputs`` does (pageable memory,
    widened to fp32 there) and from pinned memory: the copy the step pays outside ``data_wait``."""
    from segprop_ray.core.step_inputs import model_inputs

    hidden = torch.empty(plan.batch, plan.seq, plan.hidden_size, dtype=torch.bfloat16)
    batch = {"input_ids": torch.zeros(plan.batch, plan.seq, dtype=torch.int64), "hidden": hidden}
    pinned = {k: v.pin_memory() for k, v in batch.items()}
    out = {}
    for name, source in (("pageable_ms", batch), ("pinned_ms", pinned)):
        times = []
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            model_inputs(source, device)
            sync(device)
            times.append(time.perf_counter() - start)
        out[name] = round(1e3 * sorted(times)[repeats // 2], 3)
    return out


RUNNERS = {"e2e": run_segment_run, "seg_snap": run_segment_run, "lw_snap": run_segment_run}


def import_libraries() -> None:
    """Import what the variants use before the RSS baseline is taken, so it does not count as their memory."""
    import pyarrow.parquet  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import get_scheduler  # noqa: F401

    import segprop_ray.pipeline.segment_run  # noqa: F401
    import segprop_ray.storage.snapcheck  # noqa: F401


def run_variant(plan: BenchPlan, name: str, cold: bool = True) -> dict[str, Any]:
    """One variant, measured from a fresh peak; returns its record."""
    kind, prefix = parse_variant(name, plan)
    device = torch.device(plan.device)
    import_libraries()
    if cold:
        drop_page_cache(plan)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    baseline = rss_bytes()
    allocated = torch.cuda.memory_allocated(device) if device.type == "cuda" else None  # left over: should be 0
    reset_peak(device)
    load_before = load_average()
    with threads(plan.threads):
        used_threads = torch.get_num_threads()
        if kind in RUNNERS:
            result = RUNNERS[kind](plan, kind, prefix, device)
        elif kind == "seg_recompute":
            result = run_recompute(plan, prefix, device)
        elif kind == "snap_write":
            result = run_snap_write(plan, prefix, device, files_at_once(name, plan), cold)
        else:
            result = run_read_shards(plan, prefix, device)
    sync(device)
    shape = bench_setup.shape_dict(plan.shape)
    flops = variant_flops(kind if kind != "read_shards" else "snap_write", shape, plan.seq, prefix, plan.r)
    result.update(variant=name, kind=kind, impl="project", prefix=prefix, peak_bytes=peak_since_reset(device),
                  process_max_rss_bytes=process_max_rss(), baseline_rss_bytes=baseline, device=_device_name(device),
                  flops_per_token=flops if kind != "read_shards" else None, load_avg=[load_before, load_average()],
                  threads=used_threads, cuda_allocated_at_start=allocated)
    return result


def run_variant_safely(plan: BenchPlan, name: str, cold: bool = True) -> dict[str, Any]:
    """:func:`run_variant`, or a record with ``error`` (an out-of-memory E2E must not stop the others)."""
    try:
        return run_variant(plan, name, cold)
    except Exception as error:  # noqa: BLE001 - reported in the record, the next variant runs
        message = f"{type(error).__name__}: {error}"[:2000]
    gc.collect()  # out of the except block: the traceback no longer holds the failed variant's tensors
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"impl": "project", "variant": name, "error": message}


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


# -- reference ------------------------------------------------------------------------------------
def run_reference(plan: BenchPlan, argv: list[str]) -> list[dict[str, Any]]:
    """The reference script's main() with ``argv`` (its JSON lines parsed back), on this process's device."""
    ref = bench_setup.reference_module()
    import_libraries()
    buffer = io.StringIO()
    reset_peak(torch.device("cpu"))
    baseline = rss_bytes()
    old_argv = sys.argv
    sys.argv = ["gpu_reference_loops.py", *argv]
    try:
        with threads(plan.threads), contextlib.redirect_stdout(buffer):
            used_threads = torch.get_num_threads()
            ref.main()
    finally:
        sys.argv = old_argv
    records = [json.loads(line) for line in buffer.getvalue().splitlines() if line.startswith("{")]
    header = records[0] if records and "variant" not in records[0] else {}
    out = []
    for record in records:
        if "variant" in record:
            record.update(impl="reference", header=header, process_peak_rss_bytes=peak_since_reset(torch.device("cpu")),
                          baseline_rss_bytes=baseline, load_avg=load_average(), threads=used_threads)
            out.append(record)
    return out


def main(argv: list[str]) -> None:
    plan = BenchPlan.load(argv[0])
    os.environ.setdefault(bench_setup.ENV_CACHE, plan.cache_dir)
    if argv[1] == "reference":
        for record in run_reference(plan, argv[argv.index("--") + 1:]):
            print(PREFIX + json.dumps(record), flush=True)
        return
    cold = "--warm" not in argv
    for name in argv[1].split(","):
        print(PREFIX + json.dumps(run_variant_safely(plan, name, cold)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
