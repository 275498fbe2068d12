"""The LM-head loss through a fused linear + cross-entropy kernel on CUDA (Liger Kernel), chosen by
``training.head_loss``; the chunked loss (:mod:`segprop_ray.core.head_loss`) stays the CPU path and the reference.

The fused kernel computes ``hidden @ weight.T``, the cross-entropy and the input gradients a chunk of
tokens at a time inside its kernels and accumulates the weight gradient in fp32 without a bf16 copy of
each chunk's piece, which is the workspace the chunked loss still needs. It honours the chunked loss's
contract: the same selected positions (the caller passes only those rows), the same normaliser
(``reduction="sum"`` divided by ``num_items``), and the family's logit math: a multiplier or divisor is
applied to the hidden states (``(s h) W^T = s (h W^T)``, the bias scaled with them), soft-capping by the
kernel's own ``softcap``. A kernel that cannot express the math falls back to the chunked loss (the
:data:`KERNEL` entry says what it supports). Without gradients (evaluation) the chunked loss runs: a fused
kernel would compute gradients nobody reads.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

from segprop_ray.core.head_loss import LogitMath

HEAD_LOSSES = ("auto", "chunked", "fused")
INSTALL_HINT = "pip install 'segprop_ray[cuda]'"


@dataclass(frozen=True)
class FusedKernel:
    """A fused linear + cross-entropy implementation and what it can express."""

    module: str
    function: str
    package: str
    supports_softcap: bool


KERNEL = FusedKernel("liger_kernel.transformers.functional", "liger_fused_linear_cross_entropy", "liger-kernel",
                     supports_softcap=True)
"""Liger Kernel's fused linear cross-entropy (``softcap`` since 0.3)."""


def fused_unavailable(device: torch.device, kernel: FusedKernel = KERNEL) -> str | None:
    """Why the fused kernel cannot run on ``device`` (None: it can)."""
    if device.type != "cuda":
        return f"it runs on CUDA only (device {device.type})"
    try:
        importlib.import_module(kernel.module)
    except ImportError as error:
        return f"{kernel.package} does not import ({error}; {INSTALL_HINT})"
    return None


def expresses(math: LogitMath, kernel: FusedKernel = KERNEL) -> bool:
    """Whether ``kernel`` computes the family's logit math exactly (scaling always; soft-capping if it supports it)."""
    return math.softcap is None or kernel.supports_softcap


def resolve_head_loss(setting: str, device: torch.device, math: LogitMath) -> str:
    """``chunked`` or ``fused`` for ``training.head_loss`` on ``device``: ``auto`` takes the fused kernel where it runs
    and expresses the family's math, else the chunked loss; ``fused`` where the kernel cannot run is refused in one
    line, and falls back to the chunked loss for math the kernel cannot express."""
    if setting not in HEAD_LOSSES:
        raise ValueError(f"training.head_loss {setting!r} is not one of {', '.join(HEAD_LOSSES)}")
    if setting == "chunked":
        return "chunked"
    reason = fused_unavailable(device)
    if reason is not None:
        if setting == "fused":
            raise ValueError(f"training.head_loss: fused cannot be used: {reason}")
        return "chunked"
    return "fused" if expresses(math) else "chunked"


def logit_scale(math: LogitMath) -> float | None:
    """The factor ``multiplier / divisor`` the family multiplies its logits by before soft-capping (None: 1)."""
    scale = (math.multiplier or 1.0) / (math.divisor or 1.0)
    return None if scale == 1.0 else scale


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                               targets: torch.Tensor, normalizer: float, math: LogitMath) -> torch.Tensor:
    """``sum(cross_entropy(math(hidden @ weight.T + bias), targets)) / normalizer`` through the fused kernel.

    ``hidden`` (N, H) holds only the predicted positions, ``weight`` (V, H), ``targets`` (N,).
    """
    kernel = getattr(importlib.import_module(KERNEL.module), KERNEL.function)
    scale = logit_scale(math)
    if scale is not None:
        hidden = hidden * scale  # (N, H): the logits' multiplier, moved before the matmul
        bias = bias * scale if bias is not None else None
    loss = kernel(hidden, weight, targets, bias=bias, reduction="sum", softcap=math.softcap,
                  accum_dtype=torch.float32)
    return loss.float() / normalizer
