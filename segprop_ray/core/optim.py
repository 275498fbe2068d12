"""AdamW and its learning-rate schedule, with Hugging Face ``TrainingArguments`` semantics.

``optim`` takes HF's names: ``adamw_torch`` (torch's AdamW, fused on CUDA) or ``adamw_8bit``
(bitsandbytes' 8-bit AdamW: its two moments in 8 bits, 2 bytes per parameter instead of 8; CUDA only).
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import nn


class TrainArgs(Protocol):
    """The training fields the core reads (satisfied by ``segprop_ray.config.TrainingConfig``)."""

    learning_rate: float
    num_train_epochs: float
    max_steps: int
    per_device_train_batch_size: int
    per_device_eval_batch_size: int
    gradient_accumulation_steps: int
    max_grad_norm: float
    lr_scheduler_type: str
    warmup_ratio: float
    warmup_steps: int
    weight_decay: float
    adam_beta1: float
    adam_beta2: float
    adam_epsilon: float
    bf16: bool
    seed: int
    eval_steps: int
    logging_steps: int
    save_steps: int
    max_eval_blocks: int
    loss_chunk_tokens: int
    keeps_best: bool
    """Whether a segment ends with the weights of its best evaluation (``load_best_model_at_end``)."""
    head_loss: str
    """``auto``, ``chunked`` or ``fused`` (see :mod:`segprop_ray.core.fused_head_loss`)."""
    optim: str
    """``adamw_torch`` or ``adamw_8bit`` (HF's names, see :data:`OPTIMIZERS`)."""


def total_steps(args: TrainArgs, batches_per_epoch: int) -> int:
    """Optimizer steps of a segment: ``max_steps``, else ``num_train_epochs`` worth of micro-batches."""
    if args.max_steps > 0:
        return args.max_steps
    micro = math.ceil(args.num_train_epochs * batches_per_epoch)
    return max(1, math.ceil(micro / args.gradient_accumulation_steps))


def warmup_steps(args: TrainArgs, steps: int) -> int:
    """Warmup steps: ``warmup_steps`` if set, else ``ceil(warmup_ratio * steps)``, as HF does."""
    return args.warmup_steps if args.warmup_steps > 0 else math.ceil(args.warmup_ratio * steps)


def decay_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Parameter groups as HF's Trainer makes them: weight decay on every trainable weight except biases and the
    weights of normalisation layers.

    Decided by parameter name and module type, not by shape: FSDP presents its shards as 1-D views.
    """
    decay, no_decay, seen = [], [], set()
    for _, sub in module.named_modules():
        is_norm = "norm" in type(sub).__name__.lower()  # LayerNorm, LlamaRMSNorm, Qwen2RMSNorm, ...
        for name, param in sub.named_parameters(recurse=False):
            if param.requires_grad and id(param) not in seen:  # a tied weight is listed once
                seen.add(id(param))
                (no_decay if is_norm or "bias" in name else decay).append(param)  # HF's rule: any *bias*
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass(frozen=True)
class OptimizerKind:
    """An optimizer ``optim`` names: where its class lives and what it needs."""

    module: str
    cls: str
    package: str
    cuda_only: bool
    extra: Callable[[bool], dict]
    """Extra keyword arguments, given whether the parameters are on CUDA."""


OPTIMIZERS: dict[str, OptimizerKind] = {
    "adamw_torch": OptimizerKind("torch.optim", "AdamW", "torch", False, lambda cuda: {"fused": cuda or None}),
    "adamw_8bit": OptimizerKind("bitsandbytes.optim", "AdamW8bit", "bitsandbytes", True, lambda cuda: {}),
}


def optimizer_unavailable(name: str, on_cuda: bool) -> str | None:
    """Why optimizer ``name`` cannot run (None: it can): unknown, CUDA-only on CPU, or its package missing."""
    kind = OPTIMIZERS.get(name)
    if kind is None:
        return f"training.optim {name!r} is not one of {', '.join(OPTIMIZERS)}"
    if kind.cuda_only and not on_cuda:
        return f"training.optim {name} runs on CUDA only (its {kind.package} kernels): use adamw_torch on CPU"
    try:
        importlib.import_module(kind.module)
    except ImportError as error:
        return f"training.optim {name} needs {kind.package} ({error}; pip install 'segprop_ray[cuda]')"
    return None


def build_optimizer(module: nn.Module, args: TrainArgs) -> torch.optim.Optimizer:
    """The optimizer ``args.optim`` names (AdamW, fused on CUDA, by default) over the trainable parameters of
    ``module``; a one-line ValueError where it cannot run."""
    groups = decay_groups(module, args.weight_decay)
    on_cuda = any(p.is_cuda for g in groups for p in g["params"])
    name = getattr(args, "optim", "adamw_torch")
    reason = optimizer_unavailable(name, on_cuda)
    if reason is not None:
        raise ValueError(reason)
    kind = OPTIMIZERS[name]
    cls = getattr(importlib.import_module(kind.module), kind.cls)
    return cls(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
               **kind.extra(on_cuda))


def build_scheduler(optimizer: torch.optim.Optimizer, args: TrainArgs, steps: int):
    """The learning-rate schedule named by ``lr_scheduler_type``, with warmup."""
    from transformers import get_scheduler

    return get_scheduler(
        args.lr_scheduler_type,
        optimizer,
        num_warmup_steps=warmup_steps(args, steps),
        num_training_steps=steps,
    )


def autocast_context(device: torch.device, bf16: bool):
    """bf16 autocast on ``device`` when asked for and supported, else a no-op context."""
    enabled = bf16 and (device.type != "cuda" or torch.cuda.is_bf16_supported())
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)
