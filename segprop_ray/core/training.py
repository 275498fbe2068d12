"""The training loop of one segment (Stage 1, a Stage 2 layer, or E2E), resumable at any step.

Semantics follow Hugging Face's ``Trainer``: a step is one optimizer update after
``gradient_accumulation_steps`` micro-batches; each micro-batch's summed token loss is divided by the
label tokens of the whole step (``num_items_in_batch``, over every rank: see :mod:`.step_inputs`);
gradients are clipped to ``max_grad_norm``; the schedule steps once per update. With
``load_best_model_at_end`` the weights of the best evaluation (lowest eval loss, steps > 0) are kept
and put back when the segment stops, as HF's Trainer does. The loop knows nothing of Ray or storage:
it takes batches from a callable, reports through hooks, and its whole state (weights, best weights,
optimizer, schedule, counters, RNG) can be saved and restored.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from segprop_ray.core.best_weights import BestWeights
from segprop_ray.core.exits import IterationExit, StopDecision
from segprop_ray.core.optim import TrainArgs, autocast_context, build_optimizer, build_scheduler, total_steps
from segprop_ray.core.step_inputs import data_parallel_world, model_inputs, step_items

Batch = dict[str, torch.Tensor]
FULL_LOAD = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False, strict=False)
"""Loading a checkpoint: full tensors on every rank; frozen parameters are not in it (see :func:`load_trainable`)."""
BatchSource = Callable[[int, int], Iterator[Batch]]  # (epoch, batches to skip) -> micro-batches


@dataclass
class LoopState:
    """Counters of a segment's training, saved with each checkpoint."""

    step: int = 0
    micro_batches: int = 0
    tokens: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    exit: dict[str, Any] = field(default_factory=dict)
    decision: dict[str, Any] | None = None
    best: dict[str, Any] | None = None
    """``{"step", "eval_loss"}`` of the best evaluation so far (kept weights with ``load_best_model_at_end``)."""
    kept_step: int | None = None
    """The step whose weights the segment ended with (set when it stops)."""

    def kept_eval_loss(self) -> float | None:
        """The eval loss of the weights the segment ended with: the kept best step's, else the last evaluation's."""
        if self.best is not None and self.kept_step == self.best["step"]:
            return self.best["eval_loss"]
        evaluated = [record["eval_loss"] for record in self.history if "eval_loss" in record]
        return evaluated[-1] if evaluated else None


@dataclass
class LoopHooks:
    """What the caller wants to hear about; every hook is optional."""

    evaluate: Callable[[], float] | None = None
    """Mean eval loss of the current weights (must give the same number on every rank)."""
    checkpoint: Callable[["SegmentLoop"], None] | None = None
    """Called every ``save_steps`` steps and at the end, to persist :meth:`SegmentLoop.state_dict`."""
    log: Callable[[dict[str, float]], None] | None = None
    """Called with each history record (step, train_loss, lr, and eval_loss when evaluated)."""
    interrupt: Callable[["SegmentLoop"], bool] | None = None
    """Asked after each step that did not end the segment (every rank, the same number of times); True stops the
    loop there, undecided, for the caller to checkpoint and hand over (a preemption notice)."""


class SegmentLoop:
    """Trains ``model``'s trainable parameters on micro-batches from ``batches``."""

    def __init__(
        self,
        model: nn.Module,
        args: TrainArgs,
        batches: BatchSource,
        batches_per_epoch: int,
        device: torch.device,
        exit_rule: IterationExit,
        hooks: LoopHooks | None = None,
    ):
        self.model, self.args, self.batches, self.device = model, args, batches, device
        self.batches_per_epoch = batches_per_epoch
        self.total_steps = total_steps(args, batches_per_epoch)
        self.optimizer = build_optimizer(model, args)
        self.scheduler = build_scheduler(self.optimizer, args, self.total_steps)
        self.exit_rule = exit_rule
        self.hooks = hooks or LoopHooks()
        self.state = LoopState()
        self.wall_s = 0.0
        self.data_wait_s = 0.0
        self.eval_s = 0.0
        self._pending_loss: list[torch.Tensor | float] = []  # step losses: device scalars, floats after a restore
        self.best = BestWeights(args.keeps_best)
        self.interrupted = False
        """Whether the last :meth:`run` was stopped by the ``interrupt`` hook (the segment is not done)."""

    def run(self) -> LoopState:
        """Train until the step budget or an exit criterion stops the segment (or the ``interrupt`` hook, leaving
        it undecided); returns the state."""
        self.interrupted = False
        if self.state.decision is None:
            self._train()
        if self.state.decision is not None:
            self._keep_chosen_weights()
        return self.state

    def _train(self) -> None:
        start = time.perf_counter()
        if self.state.step == 0 and not self.state.history and self.hooks.evaluate is not None:
            start_loss = self._evaluate()  # where the segment starts from: the exit rule's first point
            self._record({"step": 0, "eval_loss": start_loss})
            self._decide(start_loss)
        self.model.train()
        stream = self._stream()
        try:
            while self.state.decision is None and not self.interrupted:
                self._train_step(self._next_step_batches(stream))
                self.interrupted = self.state.decision is None and self._interrupt_requested()
        finally:
            stream.close()
        self.wall_s += time.perf_counter() - start

    def _interrupt_requested(self) -> bool:
        return self.hooks.interrupt is not None and bool(self.hooks.interrupt(self))

    def _stream(self) -> Iterator[Batch]:
        """Micro-batches from the current position on, epoch after epoch."""
        epoch, offset = divmod(self.state.micro_batches, self.batches_per_epoch)
        while True:
            yield from self.batches(epoch, offset)
            epoch, offset = epoch + 1, 0

    def _next_step_batches(self, stream: Iterator[Batch]) -> list[Batch]:
        """The micro-batches of the next optimizer step, fetched first (as HF's Trainer does) so the step's label
        tokens are known before its first backward."""
        waited = time.perf_counter()
        batches = [next(stream) for _ in range(self.args.gradient_accumulation_steps)]
        self.data_wait_s += time.perf_counter() - waited
        return batches

    def _train_step(self, batches: list[Batch]) -> None:
        num_items = step_items(batches, self.device)
        scale = data_parallel_world(self.model)
        losses = []
        for index, batch in enumerate(batches):
            inputs = model_inputs(batch, self.device)
            with self._no_sync(index < len(batches) - 1), autocast_context(self.device, self.args.bf16):
                loss = self.model(**inputs, num_items=max(num_items, 1))
            (loss * scale).backward()
            self.state.micro_batches += 1
            self.state.tokens += batch["input_ids"].numel()
            losses.append(loss.detach())
        self._pending_loss.append(torch.stack(losses).sum() * scale)  # read back only when logged: no sync per step
        self._optimizer_step()

    def _no_sync(self, skip_sync: bool):
        no_sync = getattr(self.model, "no_sync", None)  # DDP: sync gradients only on the last micro-batch
        return no_sync() if skip_sync and no_sync is not None else contextlib.nullcontext()

    def _optimizer_step(self) -> None:
        if self.args.max_grad_norm > 0:
            self._clip_gradients(self.args.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self._after_step()

    def _clip_gradients(self, max_norm: float) -> None:
        """Clip by the norm of the whole gradient. FSDP (flat parameters) holds a shard per rank and knows how
        to take the global norm; a per-rank norm would clip every rank by a different factor."""
        clip = getattr(self.model, "clip_grad_norm_", None)
        if clip is not None:
            clip(max_norm)
        else:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)

    def _after_step(self) -> None:
        step, args = self.state.step, self.args
        record: dict[str, float] = {}
        if step % args.logging_steps == 0 or step == self.total_steps:
            losses = self._pending_losses()
            record = {"step": step, "train_loss": sum(losses) / len(losses)}
            record["lr"] = self.scheduler.get_last_lr()[0]
            self._pending_loss.clear()
        eval_now = step == self.total_steps or (args.eval_steps > 0 and step % args.eval_steps == 0)
        if eval_now and self.hooks.evaluate is not None:
            record = {**record, "step": step, "eval_loss": self._evaluate()}
            self.state.best = self.best.offer(self.model, self.state.best, step, record["eval_loss"])
            self.model.train()
        if record:
            self._record(record)
        self._decide(record.get("eval_loss"))
        if self.hooks.checkpoint and (step % args.save_steps == 0 or self.state.decision is not None):
            self.hooks.checkpoint(self)

    def _keep_chosen_weights(self) -> None:
        """End with the best evaluation's weights when keeping the best, else with the last step's."""
        kept = self.state.best["step"] if self.best.put_back(self.model) else self.state.step
        self.state.kept_step = kept

    def _pending_losses(self) -> list[float]:
        """The losses not yet logged, as floats in order, read back from the device in one transfer (one sync)."""
        restored = [x for x in self._pending_loss if not isinstance(x, torch.Tensor)]  # restored floats come first
        on_device = [x for x in self._pending_loss if isinstance(x, torch.Tensor)]
        return restored + (torch.stack(on_device).tolist() if on_device else [])

    def _evaluate(self) -> float:
        started = time.perf_counter()
        loss = self.hooks.evaluate()
        self.eval_s += time.perf_counter() - started
        return loss

    def _record(self, record: dict[str, float]) -> None:
        self.state.history.append(record)
        if self.hooks.log:
            self.hooks.log(record)

    def _decide(self, eval_loss: float | None) -> None:
        decision: StopDecision | None = None
        if eval_loss is not None:
            decision = self.exit_rule.observe(self.state.exit, self.state.step, eval_loss)
        if decision is None and self.state.step >= self.total_steps:
            decision = self.exit_rule.budget_spent(self.state.exit, self.state.step, self.total_steps)
        if decision is not None:
            self.state.decision = asdict(decision)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly where the loop is: the trainable weights under local names (frozen
        ones are rebuilt from their sources, so a LoRA segment's checkpoint holds only its adapters), the
        optimizer state, and :meth:`meta_state_dict`.

        Full (unsharded) CPU copies, also under DDP or FSDP: every rank must call it (a collective there). The
        train job's checkpoints are sharded instead (:mod:`.sharded_state`).
        """
        options = full_state_options(self.device)
        return {
            "model": get_model_state_dict(self.model, options=options),
            "optimizer": get_optimizer_state_dict(self.model, self.optimizer, options=options),
            **self.meta_state_dict(),
        }

    def meta_state_dict(self) -> dict[str, Any]:
        """The loop's state beyond the weights and the optimizer: schedule, counters, kept best weights, the losses
        not yet logged, timings and the RNG."""
        return {
            "scheduler": self.scheduler.state_dict(),
            "loop": asdict(self.state),
            "best_model": self.best.state_dict(),
            "pending_loss": self._pending_losses(),
            "timing": {"wall_s": self.wall_s, "data_wait_s": self.data_wait_s, "eval_s": self.eval_s},
            "rng": torch.get_rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict` (every rank loads the same full state)."""
        load_trainable(self.model, state["model"])
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=FULL_LOAD)
        self.load_meta_state_dict(state)

    def load_meta_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`meta_state_dict` gave (the weights and the optimizer are restored apart)."""
        self.scheduler.load_state_dict(state["scheduler"])
        self.state = LoopState(**state["loop"])
        self.best.load_state_dict(state.get("best_model", {}))
        self._pending_loss = list(state["pending_loss"])
        timing = state["timing"]
        self.wall_s, self.data_wait_s, self.eval_s = timing["wall_s"], timing["data_wait_s"], timing.get("eval_s", 0.0)
        torch.set_rng_state(state["rng"])


def perplexity(loss: float | None) -> float | None:
    """exp(loss), capped at exp(50) so that a diverged loss gives a number, not an overflow."""
    return None if loss is None else math.exp(min(loss, 50.0))


def full_state_options(device: torch.device, trainable_only: bool = True) -> StateDictOptions:
    """Options to gather a full (unsharded) state dict: into CPU memory from a GPU; on CPU as it is (FSDP cannot
    offload tensors that are already there); the trainable parameters only unless ``trainable_only`` is False."""
    return StateDictOptions(full_state_dict=True, cpu_offload=device.type == "cuda", ignore_frozen_params=trainable_only)


def load_trainable(model: nn.Module, tensors: dict[str, Any], options: StateDictOptions = FULL_LOAD) -> None:
    """Load the trainable parameters saved by :meth:`SegmentLoop.state_dict` (or kept as best weights; or this rank's
    shards of them, with sharded ``options``) into ``model``; a name that is not one of its trainable parameters, or
    a trainable parameter left out, is an error."""
    result = set_model_state_dict(model, tensors, options=options)
    frozen = {name for name, param in model.named_parameters() if not param.requires_grad}
    missing = [name for name in result.missing_keys if name not in frozen and not _is_buffer(model, name)]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"checkpoint does not fit the segment: missing {missing[:3]}, "
                           f"unexpected {list(result.unexpected_keys)[:3]}")


def _is_buffer(model: nn.Module, name: str) -> bool:
    return name in dict(model.named_buffers())
