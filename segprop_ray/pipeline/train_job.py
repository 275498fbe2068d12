"""Stage 1, each Stage 2 iteration and E2E as Ray Train ``TorchTrainer`` jobs, resumable at any checkpoint.

The per-worker function builds only the segment it trains (its layer, LL and the head; the prefix
for Stage 1), feeds it from the run directory's shards with the deterministic block order, and
reports a checkpoint every ``save_steps`` steps. A worker group restarted by Ray Train (worker
failure, preemption) or a new trainer with the same run name (driver restart) continues from the
latest checkpoint, skipping the micro-batches already consumed. A preemption notice stops the loop at
once with a checkpoint of that step, and the iteration continues elsewhere (:mod:`.preemption`).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import uuid
from typing import Any, Callable

import ray.train
import torch
from ray.train import (Checkpoint, CheckpointConfig, CheckpointUploadMode, FailureConfig, LoggingConfig, RunConfig,
                       ScalingConfig)
from ray.train.torch import TorchTrainer

from segprop_ray.core.sharded_state import load_sharded, save_sharded
from segprop_ray.pipeline.context import JobContext, forwarded_env
from segprop_ray.pipeline.preemption import (DRAIN_ENV, PREEMPTED, checkpoint_at_notice, drain_switch, handed_over,
                                             preemption_watch)
from segprop_ray.pipeline.progress import poster, run_with_bar
from segprop_ray.pipeline.segment_run import SegmentRun

logger = logging.getLogger(__name__)

FAULT_ENV = "SEGPROP_TEST_KILL_WORKER_AT"
"""Testing hook: ``"<depth>:<step>"`` kills the rank-0 worker process once at that step (see tests)."""


def train_worker(config: dict[str, Any]) -> dict[str, Any] | None:
    """Ray Train per-worker function: train the segment of the job's depth, commit it (rank 0).

    ``config``: ``{"job": JobContext as dict, "name": run name, "board": ProgressBoard handle or None}``.
    """
    ctx = JobContext(**config["job"])
    train_ctx = ray.train.get_context()
    rank, world = train_ctx.get_world_rank(), train_ctx.get_world_size()
    run = SegmentRun(ctx, ray.train.torch.get_device(), rank, world, wrap=_wrap_model)
    resumed_from = _restore(run)
    run.loop.hooks.checkpoint = lambda loop: _report_checkpoint(run, rank)
    run.loop.hooks.log = _log_hook(run, rank, config)
    run.loop.hooks.interrupt = preemption_watch(ctx.cfg.resources.preemption_check_steps)
    run.train()
    if run.loop.interrupted:  # a node is being preempted: checkpoint this step now, continue on another node
        checkpoint_at_notice(run.loop.state.step, run.args.save_steps,  # (a save step's is already reported)
                             lambda: _report_checkpoint(run, rank, upload="SYNC"))
        return {PREEMPTED: run.loop.state.step} if rank == 0 else None
    result = run.commit(write=rank == 0)
    _report_checkpoint(run, rank, final=True)
    if result is not None:
        result["metrics"]["resumed_from_step"] = resumed_from
    return result


FSDP_OPTIONS = {"use_orig_params": True}
"""FullyShardedDataParallel options: the optimizer sees the segment's own parameters (names, per-parameter
weight-decay groups) rather than one flat parameter."""


def _wrap_model(segment: torch.nn.Module, strategy: str) -> torch.nn.Module:
    """DDP through Ray Train's ``prepare_model``. FSDP as ``prepare_model`` applies it (model moved to the
    worker's device, then one FullyShardedDataParallel unit on it), wrapped here because ``prepare_model`` refuses
    FSDP when CUDA is absent, where FSDP over gloo works (the CPU tests run it)."""
    if strategy != "fsdp":
        return ray.train.torch.prepare_model(segment, parallel_strategy=strategy)
    segment = ray.train.torch.prepare_model(segment, parallel_strategy=None)
    if ray.train.get_context().get_world_size() == 1:
        return segment
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel(segment, device_id=ray.train.torch.get_device(), **FSDP_OPTIONS)


def _restore(run: SegmentRun) -> int | None:
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        load_sharded(run.loop, directory)
    return run.loop.state.step


def _report_checkpoint(run: SegmentRun, rank: int, final: bool = False, upload: str = "ASYNC") -> None:
    """Every rank reports (a barrier) its own shards of the loop state (:mod:`~segprop_ray.core.sharded_state`);
    Ray Train merges the ranks' directories. Periodic checkpoints upload in the background while training goes
    on (``upload="ASYNC"``); the last one of a segment and one taken at a preemption notice upload before the
    worker returns. Ray deletes the local copy once uploaded."""
    state = run.loop.state
    metrics = {"step": state.step, "done": final or state.decision is not None}
    directory = tempfile.mkdtemp(prefix="segprop-ckpt-")
    save_sharded(run.loop, directory, rank)
    # A name of its own per save (Ray Train takes rank 0's for every rank): a retried attempt's files never land in
    # a directory that an earlier, lost attempt left half uploaded.
    name = f"step-{state.step:07d}" + ("-final" if final else "") + f"-{uuid.uuid4().hex[:8]}"
    mode = CheckpointUploadMode.SYNC if final else CheckpointUploadMode[upload]
    ray.train.report(metrics, checkpoint=Checkpoint.from_directory(directory), checkpoint_dir_name=name,
                     checkpoint_upload_mode=mode, delete_local_checkpoint_after_upload=True)


def _log_hook(run: SegmentRun, rank: int, config: dict[str, Any]):
    """Rank 0 posts each history record to the driver's progress board (and obeys the testing hooks)."""
    if rank != 0:
        return None
    post = poster(config["board"], config["name"]) if config.get("board") is not None else None
    faults = [hook for hook in (_kill_switch(run.ctx), drain_switch(run.ctx.depth, run.ctx.layout)) if hook]

    def log(record: dict[str, float]) -> None:
        if post is not None:
            post({**record, "total": run.loop.total_steps})
        for fault in faults:
            fault(record)

    return log


def _kill_switch(ctx: JobContext):
    """The testing hook of :data:`FAULT_ENV`: die once, abruptly, as a preempted worker would."""
    target = os.environ.get(FAULT_ENV, "")
    if not target or int(target.split(":")[0]) != ctx.depth:
        return None
    at_step = int(target.split(":")[1])
    marker = ctx.layout.join("checkpoints", f".fault-injected-{ctx.depth}")

    def maybe_die(record: dict[str, float]) -> None:
        if record.get("step") == at_step and not ctx.layout.fs.exists(marker):
            ctx.layout.fs.pipe_file(marker, b"killed once\n")
            # Ray Train's controller learns of reported checkpoints when it polls the workers (every 2 s):
            # die after that, as a worker lost some time after its last checkpoint would.
            time.sleep(3 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", 2.0)))
            os._exit(137)

    return maybe_die


def run_trainer(ctx: JobContext, name: str, stage: str, board: Any = None, label: str = "",
                on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run one iteration as a TorchTrainer named ``name`` (the same name resumes it); returns rank 0's result.

    With a progress ``board``, a bar labelled ``label`` follows the workers' steps. A worker group that handed
    over at a preemption notice is followed by a new trainer of the same name, which resumes at that step, at most
    ``resources.max_preemption_handovers`` times (then :class:`TooManyPreemptions`).
    """
    limit = ctx.cfg.resources.max_preemption_handovers
    for handovers in range(limit + 1):
        value = _fit(_trainer(ctx, name, stage, board), board, name, label, on_progress)
        step = handed_over(value)
        if step is None:
            return value
        logger.warning("%s: a node was preempted; checkpointed at step %d, resuming on another node (hand-over %d "
                       "of at most %d)", name, step, handovers + 1, limit)
    raise TooManyPreemptions(f"{label or name}: preempted {limit + 1} times, more than "
                             f"resources.max_preemption_handovers ({limit}); last checkpoint at step {step}: the same "
                             "command continues from it (raise the limit, or use on-demand capacity)")


class TooManyPreemptions(RuntimeError):
    """An iteration was handed over after preemption notices more often than ``resources.max_preemption_handovers``."""


def _trainer(ctx: JobContext, name: str, stage: str, board: Any) -> TorchTrainer:
    cfg = ctx.cfg
    resources = cfg.resources.stage1 if stage in ("stage1", "e2e") else cfg.resources.segment
    fs, root = ctx.layout.pyarrow_filesystem()
    return TorchTrainer(
        train_worker,
        train_loop_config={"job": ctx.to_dict(), "name": name, "board": board},
        scaling_config=ScalingConfig(
            num_workers=resources.num_workers,
            use_gpu=resources.use_gpu,
            resources_per_worker=resources.resources_per_worker or None,
            label_selector=resources.label_selector or None,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=f"{root.rstrip('/')}/checkpoints",
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=cfg.resources.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            logging_config=LoggingConfig(log_level="WARNING"),
            worker_runtime_env=forwarded_env(FAULT_ENV, DRAIN_ENV),
        ),
    )


def _fit(trainer: TorchTrainer, board: Any, name: str, label: str,
         on_progress: Callable[[dict[str, Any]], None] | None) -> dict[str, Any] | None:
    result = run_with_bar(trainer.fit, board, name, label, on_progress=on_progress) if board is not None else trainer.fit()
    if result.error is not None:
        raise result.error
    return result.return_value
