"""Measuring instruments for the training-step benchmark: step timer, memory, saved activations, FLOPs.

None of them changes what the project's code computes: the timer hangs on ``SegmentLoop``'s public
hooks (``log`` after every optimizer step, ``evaluate``), the activation probe on module hooks.
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- time ----------------------------------------------------------------------------------------
class StepTimer:
    """Per-step wall time and shard-read wait of a ``SegmentLoop``, from its ``log`` hook (logging_steps=1).

    Step k's time runs from the end of step k-1 (the device synchronised) to the end of step k, minus the
    time spent in evaluations in between (the loop evaluates at step 0 and at the last step), so it holds
    the wait for the batch, the copy to the device, forward, backward, clipping and the optimizer step.
    """

    def __init__(self, loop: Any, device: torch.device):
        self.loop, self.device = loop, device
        self.step_s: list[float] = []
        self.wait_s: list[float] = []
        self.eval_s = 0.0
        hooks = loop.hooks
        self._log, self._evaluate = hooks.log, hooks.evaluate
        hooks.log = self._on_log
        if self._evaluate is not None:
            hooks.evaluate = self._timed_evaluate

    def start(self) -> None:
        sync(self.device)
        self._mark = (time.perf_counter(), self.eval_s, self.loop.data_wait_s)

    def _timed_evaluate(self, *args: Any) -> float:
        sync(self.device)
        start = time.perf_counter()
        value = self._evaluate(*args)
        sync(self.device)
        self.eval_s += time.perf_counter() - start
        return value

    def _on_log(self, record: dict[str, float]) -> None:
        if "train_loss" in record:  # a training step (the step-0 record only has the starting eval loss)
            sync(self.device)
            now = time.perf_counter()
            then, evals, waited = self._mark
            self.step_s.append(now - then - (self.eval_s - evals))
            self.wait_s.append(self.loop.data_wait_s - waited)
            self._mark = (now, self.eval_s, self.loop.data_wait_s)
        if self._log is not None:
            self._log(record)

    def summary(self, warmup: int, tokens_per_step: int) -> dict[str, Any]:
        """Median step, tokens/s and wait share over the steps after ``warmup``."""
        steps, waits = self.step_s[warmup:], self.wait_s[warmup:]
        median = statistics.median(steps)
        return {"median_step_s": round(median, 5), "tokens_per_s": round(tokens_per_step / median, 1),
                "step_s": [round(s, 5) for s in steps], "warmup_step_s": [round(s, 5) for s in self.step_s[:warmup]],
                "data_wait_s": round(sum(waits), 5), "data_wait_share": round(sum(waits) / sum(steps), 5),
                "max_step_data_wait_share": round(max(w / s for w, s in zip(waits, steps)), 5),
                "eval_s": round(self.eval_s, 4)}


# -- memory --------------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def rss_bytes() -> int:
    """Current resident set size of this process."""
    return _status_kib("VmRSS") * 1024


def reset_peak(device: torch.device) -> None:
    """Start a new peak: CUDA allocator stats, or the process's RSS high-water mark (Linux >= 4.0)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def peak_since_reset(device: torch.device) -> int:
    """Peak since :func:`reset_peak`: CUDA max allocated, or VmHWM (RSS high-water mark)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return _status_kib("VmHWM") * 1024


def process_max_rss() -> int:
    """``getrusage`` peak RSS of the whole process (never reset)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# -- saved activations ------------------------------------------------------------------------------
class SavedTensorProbe:
    """Bytes autograd keeps for backward during one forward of ``module`` (unique storages, parameters
    excluded): what one micro-batch's activations cost, bf16 weight casts of autocast included."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.bytes: int | None = None
        self._params = {p.untyped_storage().data_ptr() for p in module.parameters()}
        self._handles = [module.register_forward_pre_hook(self._enter), module.register_forward_hook(self._exit)]
        self._seen: dict[int, int] = {}
        self._ctx = None

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self._params:
            self._seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    def _enter(self, *_: Any) -> None:
        if self.bytes is None and self._ctx is None and torch.is_grad_enabled():  # skip no_grad evaluations
            self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
            self._ctx.__enter__()

    def _exit(self, *_: Any) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(None, None, None)
            self._ctx = None
            self.bytes = sum(self._seen.values())
            for handle in self._handles:
                handle.remove()


# -- FLOPs -----------------------------------------------------------------------------------------
def layer_matmul_params(shape: dict[str, int]) -> int:
    """Weights of one Llama decoder layer that take part in matmuls (norm weights left out)."""
    h, inter = shape["hidden_size"], shape["intermediate_size"]
    head_dim = h // shape["num_attention_heads"]
    q = o = h * shape["num_attention_heads"] * head_dim
    kv = 2 * h * shape["num_key_value_heads"] * head_dim
    return q + kv + o + 3 * h * inter


def attention_flops(shape: dict[str, int], seq: int) -> int:
    """Forward FLOPs per token of one layer's attention scores and mixing: 4 * T * d (QK^T and A.V over
    the full T x T square, as in PaLM's MFU appendix; causal kernels skip about half)."""
    return 4 * seq * shape["hidden_size"]


def flops_per_token(shape: dict[str, int], seq: int, trained_layers: int, head_trained: bool,
                    frozen_layers: int = 0) -> int:
    """3 x forward for what trains (forward + backward with weight and input gradients), 1 x forward for
    frozen layers run under no_grad. forward = 2 x matmul params + attention. Embedding lookups count 0."""
    layer = 2 * layer_matmul_params(shape) + attention_flops(shape, seq)
    head = 2 * shape["hidden_size"] * shape["vocab_size"]
    trained = trained_layers * layer + (head if head_trained else 0)
    return 3 * trained + frozen_layers * layer


def variant_flops(kind: str, shape: dict[str, int], seq: int, prefix: int, r: int) -> int:
    """FLOPs per token of each variant (the project's and the reference's use the same formula)."""
    n = shape["num_hidden_layers"]
    table = {
        "e2e": (n, True, 0), "e2e_ac": (n, True, n),  # checkpointing: one more forward of every layer
        "seg_snap": (1 + r, True, 0), "seg_recompute": (1 + r, True, prefix + 1),
        "lw_snap": (1, True, 0), "snap_write": (0, False, 1), "snap_write_1layer_d2h": (0, False, 1),
    }
    trained, head, frozen = table[kind]
    return flops_per_token(shape, seq, trained, head, frozen)


@contextmanager
def threads(count: int):
    """Run with ``count`` intra-op threads (0: leave torch's default)."""
    before = torch.get_num_threads()
    if count > 0:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]
