"""Next-token cross-entropy through the LM head, computed a chunk of tokens at a time.

The plain loss, ``cross_entropy(proj(h).float(), targets)``, keeps the fp32 log-softmax of every
token's logits alive from forward to backward, and backward adds the gradient of the logits and
its low-precision copy on top: three or four tensors of B x T x V. With a 128k vocabulary and
8k tokens per micro-batch each is 4.2 GB, more than a decoder layer's whole activation memory.

Here the projection, the loss and the gradients of the projection's inputs are computed in
forward, one chunk of tokens at a time, so only one chunk's logits ever exist and nothing of size
V is saved for backward. The arithmetic is the plain loss's, chunk by chunk: logits in the compute
dtype (bf16 under autocast), softmax in fp32, gradients cast back to the compute dtype for the two
matmuls. The only difference is that the weight gradient is summed over chunks in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOGITS_CHUNK_BYTES = 1 << 30
"""Size of one chunk's fp32 logits when the chunk size is not given (1 GiB: 2,092 tokens at V=128,256)."""


@dataclass
class _Wanted:
    """Which input gradients the caller needs."""

    hidden: bool
    weight: bool
    bias: bool

    @property
    def any(self) -> bool:
        return self.hidden or self.weight or self.bias


def chunk_tokens_for(vocab: int, chunk_bytes: int = LOGITS_CHUNK_BYTES) -> int:
    """Tokens per chunk such that one chunk's fp32 logits take at most ``chunk_bytes`` (at least 1)."""
    return max(1, chunk_bytes // (4 * vocab))


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    chunk_tokens: int | None = None,
    normalizer: float | None = None,
    logit_math: LogitMath | None = None,
) -> torch.Tensor:
    """``sum(cross_entropy(hidden @ weight.T + bias, targets)) / normalizer`` without materialising all logits
    (``normalizer`` defaults to N: the mean). HF's Trainer divides by the label tokens of the whole optimizer step
    (``num_items_in_batch``), which a caller passes as ``normalizer``. ``logit_math``: the family's scaling and
    soft-capping of the logits (:class:`LogitMath`), applied before the cross-entropy and differentiated through.

    ``hidden`` is (N, H), ``weight`` (V, H), ``targets`` (N,). Under autocast the matmuls run in the
    autocast dtype, as ``F.linear`` would; the loss is returned in fp32.
    """
    chunk = chunk_tokens or chunk_tokens_for(weight.shape[0])
    dtype = _compute_dtype(hidden, weight)
    scale = float(normalizer) if normalizer is not None else max(hidden.shape[0], 1)
    math = logit_math or NO_MATH
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias)):
        return _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk, dtype, scale, math)
    loss, _ = _chunked_pass(hidden, weight, bias, targets, chunk, dtype, _Wanted(False, False, False), scale, math)
    return loss


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    """Loss and input gradients in forward; backward only scales the stored gradients."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk, dtype, normalizer, logit_math):  # noqa: D102
        wanted = _Wanted(*ctx.needs_input_grad[:3])
        loss, grads = _chunked_pass(hidden, weight, bias, targets, chunk, dtype, wanted, normalizer, logit_math)
        grad_hidden, grad_weight, grad_bias = grads
        # The hidden gradient is an activation kept for backward, so it is saved the standard way
        # (memory probes count it); the weight and bias gradients become the parameters' .grad.
        ctx.save_for_backward(*(t for t in (grad_hidden,) if t is not None))
        ctx.has_hidden = grad_hidden is not None
        ctx.param_grads = (grad_weight, grad_bias)
        ctx.spent = False
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):  # noqa: D102
        if ctx.spent:
            raise RuntimeError("the chunked LM-head loss can be backpropagated once (its gradients were handed over)")
        ctx.spent = True
        grad_hidden = ctx.saved_tensors[0] if ctx.has_hidden else None
        grad_weight, grad_bias = ctx.param_grads
        ctx.param_grads = (None, None)  # let autograd take the buffers over instead of copying them
        scaled = [_scale(g, grad_loss) for g in (grad_hidden, grad_weight, grad_bias)]
        return (*scaled, None, None, None, None, None)


def _scale(grad: torch.Tensor | None, factor: torch.Tensor) -> torch.Tensor | None:
    # Always multiplied: testing for 1.0 would read the factor back from the device, a sync per step.
    return grad.mul_(factor.to(grad.dtype)) if grad is not None else None


def _chunked_pass(hidden, weight, bias, targets, chunk, dtype, wanted: _Wanted, normalizer: float,
                  logit_math: "LogitMath"):
    """(summed loss / normalizer, (grad_hidden, grad_weight, grad_bias)) with only one chunk's logits alive."""
    count = hidden.shape[0]
    with torch.autocast(hidden.device.type, enabled=False):
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if wanted.hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if wanted.weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if wanted.bias else None
        for start in range(0, count, chunk):
            h = hidden[start : start + chunk].to(dtype)  # (C, H)
            loss, d_logits = _chunk_loss(h, w, b, targets[start : start + chunk], wanted.any, normalizer, logit_math)
            total += loss
            if d_logits is None:
                continue
            d_logits = d_logits.to(dtype)  # d(loss)/d(raw logits): (C, V)
            if grad_hidden is not None:
                grad_hidden[start : start + chunk] = d_logits @ w  # (C, V) @ (V, H) -> (C, H)
            if grad_weight is not None:
                grad_weight += d_logits.T @ h  # (V, C) @ (C, H) -> (V, H)
            if grad_bias is not None:
                grad_bias += d_logits.sum(0, dtype=torch.float32)
    grads = (
        grad_hidden,
        grad_weight.to(weight.dtype) if grad_weight is not None else None,
        grad_bias.to(bias.dtype) if grad_bias is not None else None,
    )
    return total / normalizer, grads


def _chunk_loss(h, w, b, t, want_grad: bool, normalizer: float, logit_math: "LogitMath"):
    """(summed loss, fp32 gradient of the loss / normalizer w.r.t. the raw logits or None) of one chunk."""
    logits, slope = logit_math.forward(F.linear(h, w, b).float())  # (C, V) fp32, after the family's math
    lse = torch.logsumexp(logits, dim=-1)  # (C,)
    loss = (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
    if not want_grad:
        return loss, None
    probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place: (C, V)
    probs[torch.arange(len(t), device=t.device), t] -= 1.0
    grad = probs.div_(normalizer)  # d(loss)/d(logits after the math): (C, V)
    return loss, grad if slope is None else grad.mul_(slope)  # chain rule through scaling and soft-capping


@dataclass(frozen=True)
class LogitMath:
    """What a family's forward applies to the LM head's output, in HF's order: ``* multiplier``, ``/ divisor``, then
    soft-capping ``softcap * tanh(logits / softcap)``. The identity when all are None."""

    multiplier: float | None = None
    divisor: float | None = None
    softcap: float | None = None

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits as the HF forward returns them (in their own dtype)."""
        return self.forward(logits, want_slope=False)[0]

    def forward(self, logits: torch.Tensor, want_slope: bool = True) -> tuple[torch.Tensor, torch.Tensor | float | None]:
        """``(transformed logits, d transformed / d logits)`` (the slope None for the identity)."""
        slope: torch.Tensor | float | None = None
        if self.multiplier is not None:
            logits, slope = logits * self.multiplier, self.multiplier
        if self.divisor is not None:
            logits, slope = logits / self.divisor, (1.0 if slope is None else slope) / self.divisor
        if self.softcap is not None:
            capped = torch.tanh(logits / self.softcap)  # (C, V)
            logits = capped * self.softcap
            if want_slope:
                slope = (1 - capped.square()) * (1.0 if slope is None else slope)
        return logits, slope


NO_MATH = LogitMath()
