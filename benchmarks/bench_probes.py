"""Measuring instruments for the training-step benchmark: step timer, memory, saved activations, FLOPs.

None of them changes what the project's code computes: the timer hangs on ``SegmentLoop``'s public
hooks (``log`` after every optimizer step, ``evaluate``), the activation probe on module hooks.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import tempfile
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

    def summary(self, warmup: int, tokens_per_step: int, timed: int | None = None) -> dict[str, Any]:
        """Median step, tokens/s and wait share over the ``timed`` steps after ``warmup`` (default: all)."""
        end = None if timed is None else warmup + timed
        steps, waits = self.step_s[warmup:end], self.wait_s[warmup:end]
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


class TensorPeakProbe:
    """CPU stand-in for CUDA's ``max_memory_allocated`` over one training step of a ``SegmentLoop``.

    RSS counts what the C allocator keeps after ``free`` and is no measure of what a step needs. This probe
    takes the bytes of every tensor alive when step ``step`` starts (weights, gradients, optimizer state and
    buffers, by unique storage) and adds the highest net allocation of the step itself, from the memory
    events of torch's profiler (``profile_memory``; allocations of the main thread, so not the reader's
    prefetch thread: on a GPU those host buffers are not device memory either). It hangs on the loop's
    ``log`` hook, after a :class:`StepTimer` if there is one, so the profiled step can be left out of timing.
    """

    def __init__(self, loop: Any, model: nn.Module, step: int):
        self.loop, self.model, self.step = loop, model, step
        self.live_bytes: int | None = None
        self.step_peak_bytes: int | None = None
        self._log = loop.hooks.log
        loop.hooks.log = self._on_log
        self._profiler: Any = None

    def close(self) -> None:
        """Stop the profiler if the loop ended before the profiled step did (an exit rule stopped it early)."""
        if self._profiler is not None:
            self._profiler.__exit__(None, None, None)
            self._profiler = None

    @property
    def peak_bytes(self) -> int | None:
        """Live bytes at the step's start plus the step's highest net allocation (None if not reached)."""
        if self.live_bytes is None or self.step_peak_bytes is None:
            return None
        return self.live_bytes + self.step_peak_bytes

    def _on_log(self, record: dict[str, float]) -> None:
        if self._log is not None:
            self._log(record)
        if "train_loss" not in record:
            return
        if record["step"] == self.step - 1:
            self.live_bytes = live_tensor_bytes(self.model, self.loop.optimizer)
            self._profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                    profile_memory=True)
            self._profiler.__enter__()
        elif record["step"] == self.step and self._profiler is not None:
            self._profiler.__exit__(None, None, None)
            self.step_peak_bytes = max(0, max_net_allocated(self._profiler))
            self._profiler = None


def live_tensor_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the distinct storages of ``model``'s parameters, gradients and buffers and the optimizer's state."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def max_net_allocated(profiler: Any) -> int:
    """Highest net allocation (bytes allocated minus freed) during a profile, from its CPU memory events.

    The profiler's running 'Total Allocated' is not reset between profiles of one process, so it is taken
    relative to its value before the profile's first event.
    """
    with tempfile.TemporaryDirectory() as tmp:
        trace = os.path.join(tmp, "trace.json")
        profiler.export_chrome_trace(trace)
        with open(trace) as file:
            events = json.load(file)["traceEvents"]
    memory = sorted((e for e in events if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0),
                    key=lambda e: e["ts"])
    if not memory:
        return 0
    start = memory[0]["args"]["Total Allocated"] - memory[0]["args"]["Bytes"]
    return max(e["args"]["Total Allocated"] for e in memory) - start


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
