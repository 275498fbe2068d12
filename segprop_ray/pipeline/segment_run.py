"""One iteration on one worker, fed from the run directory: the body of a Ray Train worker, without Ray.

It needs no Ray, so the GPU benchmark runs exactly this code where Ray is not installed; the
Ray Train worker function wraps it with checkpoint reporting and DDP.
"""

from __future__ import annotations

import resource
from typing import Any, Callable

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from segprop_ray.core.data_order import BlockOrder, sequential_batches
from segprop_ray.core.exits import IterationExit
from segprop_ray.core.iteration import build_training_segment, split_trained
from segprop_ray.core.plan import segment_seed
from segprop_ray.core.step_inputs import evaluate_loss
from segprop_ray.core.training import LoopHooks, SegmentLoop, full_state_options, perplexity
from segprop_ray.pipeline.context import JobContext
from segprop_ray.storage.errors import StorageError
from segprop_ray.storage.reader import ShardBatchReader, epoch_reader
from segprop_ray.storage.snapcheck import CommitMarker, load_committed
from segprop_ray.storage.weights_store import WeightStore, exit_file, group_committed


class SegmentRun:
    """Builds, trains and commits the segment of ``ctx.depth`` on this rank."""

    def __init__(self, ctx: JobContext, device: torch.device, rank: int = 0, world: int = 1,
                 wrap: Callable[[nn.Module, str], nn.Module] | None = None):
        self.ctx, self.device, self.rank, self.world = ctx, device, rank, world
        cfg = ctx.cfg
        self.parts = ctx.parts(device)
        self.plan = ctx.plan(self.parts.num_layers)
        self.it = self.plan.iteration(ctx.key)
        self.stage = self.it.stage
        self.args = cfg.training_for(self.stage)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        torch.manual_seed(segment_seed(self.args.seed, ctx.depth))
        halves_before = [f"{ctx.depth}-attn"] if self.it.part == "mlp" else []  # the MLP half starts from them
        weights = ctx.run_weights(self.plan, committed_layers=halves_before, parts=self.parts, tied=self.parts.tied)
        self.segment = build_training_segment(self.parts, weights, self.it, self.args)
        # counted before FSDP shards the parameters
        self.trainable_params = sum(p.numel() for p in self.segment.parameters() if p.requires_grad)
        strategy = (cfg.resources.stage1 if self.stage != "stage2" else cfg.resources.segment).strategy
        self.model = wrap(self.segment, strategy) if wrap is not None and world > 1 else self.segment
        self.source_depth = self.plan.source_depth(self.it)
        self.train_marker, self.eval_marker = (self._marker(split) for split in ("train", "eval"))
        order = BlockOrder.for_training(ctx.num_blocks["train"], ctx.group_size, self.args, cfg.data, world, rank)
        self.loop = SegmentLoop(self.model, self.args, self._batches(order), order.batches_per_epoch(), device,
                                IterationExit.from_config(cfg.exit.layer, self.args), LoopHooks(evaluate=self.evaluate))

    def _marker(self, split: str) -> CommitMarker:
        spec = self.ctx.spec(self.parts.config.hidden_size)
        marker = load_committed(self.ctx.layout, split, self.source_depth, self.ctx.input_hash,
                                self.ctx.num_blocks[split], spec)
        if marker is None:
            where = "tokens" if self.source_depth is None else f"snapshot depth {self.source_depth}"
            raise StorageError(f"{split} {where} of {self.ctx.layout.describe()} is not committed; rerun the driver")
        return marker

    def _batches(self, order: BlockOrder):
        with_hidden, snap = self.source_depth is not None, self.ctx.cfg.snapcheck

        def batches(epoch: int, skip: int):
            return iter(epoch_reader(self.ctx.layout, self.train_marker, order, epoch, skip, snap.prefetch_groups,
                                     with_hidden, self.device.type == "cuda", snap.read_threads))

        return batches

    def evaluate(self, limit: int | None = None) -> float:
        """Mean eval loss over the first ``limit`` eval blocks (``max_eval_blocks`` by default; 0: all)."""
        limit = self.args.max_eval_blocks if limit is None else limit
        count = min(limit, self.eval_marker.total_rows) if limit else self.eval_marker.total_rows
        batches = sequential_batches(count, self.args.per_device_eval_batch_size)
        reader = ShardBatchReader(self.ctx.layout, self.eval_marker, batches, with_hidden=self.source_depth is not None,
                                  read_threads=self.ctx.cfg.snapcheck.read_threads)
        return evaluate_loss(self.model, iter(reader), self.device, self.args.bf16)

    def train(self) -> None:
        """Run the loop to its exit decision."""
        self.loop.run()

    def commit(self, write: bool = True) -> dict[str, Any] | None:
        """Write the committed layer(s) and the exit's LL + head; return the iteration's record.

        Every rank must call it (gathering sharded weights is a collective); only ``write`` ranks write.
        """
        state = get_model_state_dict(self.model, options=full_state_options(self.device, trainable_only=False))
        eval_loss = self.evaluate(0) if self.args.max_eval_blocks else self.loop.state.kept_eval_loss()
        if not write:
            return None
        committed, exit_weights = split_trained(self.segment, self.parts, self.plan, state)
        store = WeightStore(self.ctx.layout)
        layers = {"stage1": self.plan.prefix_layers, "e2e": list(range(self.plan.num_layers))}.get(self.stage, self.it.layers)
        suffix = "" if self.it.commits_depth else "-attn"  # an attention half's layer is kept apart from the layer's
        groups = group_committed(committed, self.parts.layout, layers, suffix)
        files = {path: store.put(path, tensors) for path, tensors in groups.items()}
        exit_path = exit_file(self.ctx.key)
        files[exit_path] = store.put(exit_path, exit_weights)
        state = self.loop.state
        train_losses = [r["train_loss"] for r in state.history if "train_loss" in r]
        return {
            "depth": self.ctx.depth, "stage": self.stage, "part": self.it.part, "first": self.it.first,
            "label": self.it.label, "steps": state.step, "history": state.history,
            "decision": state.decision, "eval_loss": eval_loss, "perplexity": perplexity(eval_loss),
            "train_loss": train_losses[-1] if train_losses else None, "files": files, "exit_file": exit_path,
            "kept_step": state.kept_step, "metrics": self.metrics(),
        }

    def metrics(self) -> dict[str, Any]:
        """Throughput, memory and time spent waiting on shard reads for this rank (evaluation time excluded)."""
        loop = self.loop
        train_s = max(loop.wall_s - loop.eval_s, 1e-9)
        return {
            "tokens": loop.state.tokens, "wall_s": round(loop.wall_s, 3), "eval_s": round(loop.eval_s, 3),
            "tokens_per_s": round(loop.state.tokens / train_s, 1),
            "data_wait_s": round(loop.data_wait_s, 3), "data_wait_share": round(loop.data_wait_s / train_s, 4),
            "peak_memory_bytes": peak_memory_bytes(self.device), "device": str(self.device),
            "trainable_params": self.trainable_params,
            "world_size": self.world,
            "data_parallel": type(self.model).__name__ if self.model is not self.segment else None,
        }


def peak_memory_bytes(device: torch.device) -> int:
    """Peak GPU memory allocated on a CUDA device since this iteration began (reset when the segment is
    built), else this process's peak resident memory (libraries included)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB
