"""What one micro-batch feeds a segment, and the token-weighted evaluation loss.

Losses follow Hugging Face's Trainer: a micro-batch's loss is the sum of its tokens' cross-entropies
divided by ``num_items``, the label tokens of the whole optimizer step (all its micro-batches, on
every data-parallel rank: ``average_tokens_across_devices``), so an optimizer step's gradient is
that of the token mean over the step however the tokens fall into micro-batches and ranks.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from segprop_ray.core.blocks import Batch, count_targets, prediction_index, trim_padding
from segprop_ray.core.optim import autocast_context


def model_inputs(batch: Batch, device: torch.device) -> Batch:
    """The tensors a :class:`~segprop_ray.core.stack.Segment` takes, on ``device``: token ids, positions, the
    prediction index (computed here, on the host, from the token kinds: no device sync), and stored activations as
    fp32. A batch of padded examples is first cut to its longest example."""
    batch = trim_padding(batch)
    inputs = {"input_ids": batch["input_ids"].to(device, non_blocking=True)}
    if "position_ids" in batch:
        inputs["position_ids"] = batch["position_ids"].to(device, non_blocking=True)
    if "token_kind" in batch:
        inputs["predict_at"] = prediction_index(batch["token_kind"]).to(device, non_blocking=True)
    if "hidden" in batch:  # bf16 or fp32 snapshot -> fp32 master precision (exact widening)
        inputs["hidden"] = batch["hidden"].to(device, non_blocking=True).float()
    return inputs


def batch_targets(batch: Batch) -> int:
    """Label tokens of a micro-batch (every position but each block's last when it has no token kinds)."""
    if "token_kind" in batch:
        return count_targets(batch["token_kind"])
    ids = batch["input_ids"]
    return ids.shape[0] * (ids.shape[1] - 1)


def step_items(batches: Iterable[Batch], device: torch.device) -> int:
    """``num_items_in_batch`` of an optimizer step: label tokens of its micro-batches, summed over the ranks."""
    count = sum(batch_targets(batch) for batch in batches)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        total = torch.tensor(count, dtype=torch.int64, device=device)
        dist.all_reduce(total)
        count = int(total)
    return count


def data_parallel_world(model: nn.Module) -> int:
    """Ranks whose gradients a wrapped model averages (1 for a plain module): HF's Trainer multiplies the loss by
    it so that the average of per-rank ``sum / num_items`` gradients is the global token mean's."""
    if not hasattr(model, "no_sync") or not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


def evaluate_loss(model: nn.Module, batches: Iterator[Batch], device: torch.device, bf16: bool) -> float:
    """Token-weighted mean loss of ``model`` over the label tokens of ``batches`` (no gradients)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), autocast_context(device, bf16):
        for batch in batches:
            total += float(model(**model_inputs(batch, device), num_items=1))  # the sum over the batch's labels
            count += batch_targets(batch)
    model.train(was_training)
    return total / max(count, 1)
