"""The whole SegProp algorithm in one process, snapshots in memory: the reference the Ray pipeline must equal.

Given a model directory and token blocks (:class:`TokenBlocks`), it runs Stage 1, then each Stage 2 iteration fed
from in-memory SnapCheck tensors (rounded to the storage precision exactly as the shards are),
with the same block order, seeds and exit rules as the distributed pipeline.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import torch

from segprop_ray.core.blocks import TokenBlocks
from segprop_ray.core.data_order import BlockOrder, default_group_size, sequential_batches
from segprop_ray.core.exits import IterationExit, RunExit
from segprop_ray.core.iteration import (RunWeights, build_segment, build_training_segment, exit_id, snapshot_forward,
                                        split_trained)
from segprop_ray.core.parts import ModelParts
from segprop_ray.core.plan import Iteration, SegPropPlan, segment_seed
from segprop_ray.core.step_inputs import evaluate_loss
from segprop_ray.core.training import LoopHooks, SegmentLoop
from segprop_ray.core.weights import DictSource


@dataclass
class InProcessResult:
    """Committed weights, exits and the record of every iteration."""

    plan: SegPropPlan
    committed: dict[str, torch.Tensor] = field(default_factory=dict)
    exits: dict[int | str, dict[str, torch.Tensor]] = field(default_factory=dict)
    """LL + head of every iteration, by exit depth (an attention half's under ``<depth>-attn``)."""
    iterations: list[dict[str, Any]] = field(default_factory=list)
    decisions: list[dict[str, Any]] = field(default_factory=list)

    @property
    def final_depth(self) -> int:
        """Deepest committed exit."""
        return max(depth for depth in self.exits if isinstance(depth, int))


def group_size_for(snapcheck: Any, seq_len: int, hidden_size: int) -> int:
    """Blocks per row group (the unit of shuffling): the configured value or ~64 MiB of activations."""
    if snapcheck.rows_per_group:
        return snapcheck.rows_per_group
    return default_group_size(seq_len, hidden_size, 2 if snapcheck.dtype == "bf16" else 4)


class InProcessRun:
    """Runs Algorithm 1 on in-memory blocks; see :func:`run_inprocess`."""

    def __init__(self, model_dir: str, train_ids: TokenBlocks | torch.Tensor, eval_ids: TokenBlocks | torch.Tensor,
                 cfg: Any, device: str = "cpu", observer: Callable[[str, int, Any], None] | None = None):
        from transformers import AutoConfig

        self.cfg, self.device = cfg, torch.device(device)
        self.observe = observer or (lambda event, depth, segment: None)  # ("built" | "trained", depth, segment)
        self.parts = ModelParts(AutoConfig.from_pretrained(model_dir), self.device)
        self.plan = SegPropPlan.from_config(cfg.segprop, self.parts.num_layers)
        self.base = self.parts.base_source(model_dir)
        self.train_ids, self.eval_ids = as_blocks(train_ids), as_blocks(eval_ids)
        hidden = self.parts.config.hidden_size
        self.group_size = group_size_for(cfg.snapcheck, self.train_ids.input_ids.shape[1], hidden)
        self.result = InProcessResult(self.plan)
        self.weights = RunWeights(self.plan, self.base, DictSource({}), lambda d: DictSource(self.result.exits[d]),
                                  cfg.segprop.ll_baseline, self.parts.tied)

    def run(self, log: Callable[[str], None] = lambda _: None) -> InProcessResult:
        """Stage 1, then Stage 2 segment by segment until the global exit stops it."""
        first, *stage2 = self.plan.iterations
        self.train_depth(first, None, None)
        log(f"{first.label} done: exit {first.last} eval loss {self.result.iterations[-1]['eval_loss']:.4f}")
        if not stage2:
            return self.result
        p = self.plan.base_depth
        snap_train, snap_eval = self.snapshot(p, self.train_ids, None), self.snapshot(p, self.eval_ids, None)
        run_exit = RunExit.from_config(self.cfg.exit.run)
        for it in stage2:
            self.train_depth(it, snap_train, snap_eval)
            log(f"{it.label} done: eval loss {self.result.iterations[-1]['eval_loss']:.4f}")
            if not it.commits_depth:
                continue  # an attention half: its MLP half reads the same snapshot
            snap_train, snap_eval = self.snapshot(it.last, self.train_ids, snap_train), self.snapshot(it.last, self.eval_ids, snap_eval)
            losses = {r["depth"]: r["eval_loss"] for r in self.result.iterations if r["part"] != "attn"}
            decision = run_exit.decide(losses, it.last, self.plan.last_depth)
            self.result.decisions.append(asdict(decision))
            if not decision.continue_training:
                break
        return self.result

    def train_depth(self, it: Iteration | int, snap_train: torch.Tensor | None, snap_eval: torch.Tensor | None) -> None:
        """Train iteration ``it`` (a depth: the iteration that commits it) and record committed and exit weights."""
        it = self.plan.iteration(it) if isinstance(it, int) else it
        depth, stage = it.last, it.stage
        args = self.cfg.training_for(stage)
        torch.manual_seed(segment_seed(args.seed, depth))
        segment = build_training_segment(self.parts, self.weights, it, args)
        self.observe("built", exit_id(it), segment)
        order = BlockOrder.for_training(len(self.train_ids), self.group_size, args, self.cfg.data)

        def batches(epoch: int, skip: int) -> Iterator[dict]:
            for ids in order.epoch_batches(epoch)[skip:]:
                yield _blocks(self.train_ids, snap_train, ids)

        def evaluate(limit: int = args.max_eval_blocks) -> float:
            return evaluate_loss(segment, eval_batches(self.eval_ids, snap_eval, args.per_device_eval_batch_size, limit), self.device, args.bf16)

        exit_rule = IterationExit.from_config(self.cfg.exit.layer, args)
        loop = SegmentLoop(segment, args, batches, order.batches_per_epoch(), self.device, exit_rule, LoopHooks(evaluate=evaluate))
        state = loop.run()
        self.observe("trained", exit_id(it), segment)
        committed, exit_weights = split_trained(segment, self.parts, self.plan)
        self.result.committed.update(committed)
        self.result.exits[exit_id(it)] = exit_weights
        self.weights.committed = DictSource(self.result.committed)
        eval_loss = evaluate(0) if args.max_eval_blocks else state.kept_eval_loss()
        self.result.iterations.append({"stage": stage, "depth": depth, "key": it.key, "part": it.part,
                                       "label": it.label, "steps": state.step, "eval_loss": eval_loss,
                                       "history": state.history, "decision": state.decision,
                                       "kept_step": state.kept_step})

    def snapshot(self, depth: int, blocks: TokenBlocks, previous: torch.Tensor | None) -> torch.Tensor:
        """S[depth] for ``blocks``: the prefix on tokens at the base depth, else layer ``depth`` on S[depth-1]."""
        producer = build_segment(self.parts, self.weights.snapshot_spec(depth), trainable=False)
        dtype, bf16 = self.cfg.snapcheck.dtype, self.cfg.training.bf16
        outputs = []
        for start in range(0, len(blocks), self.group_size):  # one row group at a time, as the shards are
            rows = list(range(start, min(start + self.group_size, len(blocks))))
            outputs.append(snapshot_forward(producer, _blocks(blocks, previous, rows), dtype, bf16, self.device))
        return torch.cat(outputs)  # (N, T, H) in the snapshot dtype


def as_blocks(blocks: TokenBlocks | torch.Tensor) -> TokenBlocks:
    """Token blocks; a bare (N, T) tensor of ids is a text stream cut into blocks."""
    return blocks if isinstance(blocks, TokenBlocks) else TokenBlocks.of_text(blocks)


def _blocks(blocks: TokenBlocks, snap: torch.Tensor | None, rows: list[int]) -> dict[str, torch.Tensor]:
    batch = blocks.rows(rows)  # (B, T) each
    if snap is not None:
        batch["hidden"] = snap[torch.tensor(rows)]  # (B, T, H)
    return batch


def eval_batches(ids: TokenBlocks, snap: torch.Tensor | None, batch_size: int, limit: int = 0) -> Iterator[dict]:
    """Evaluation blocks in order, ``batch_size`` at a time (the first ``limit`` blocks if set)."""
    count = min(limit, len(ids)) if limit else len(ids)
    for rows in sequential_batches(count, batch_size):
        yield _blocks(ids, snap, rows)


def run_inprocess(model_dir: str, train_ids: TokenBlocks | torch.Tensor, eval_ids: TokenBlocks | torch.Tensor,
                  cfg: Any, device: str = "cpu",
                  log: Callable[[str], None] = lambda _: None, observer: Callable[[str, int, Any], None] | None = None
                  ) -> InProcessResult:
    """Run SegProp (or ``lw`` / ``e2e``) on token blocks (or (N, T) token ids of a text stream), in this process."""
    return InProcessRun(model_dir, train_ids, eval_ids, cfg, device, observer).run(log)
