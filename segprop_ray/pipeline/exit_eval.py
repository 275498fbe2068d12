"""Evaluating exits beside training: each committed exit (and the input model itself) is scored by a
Ray task while the next layer trains, and its numbers land in the manifest.

Per exit q: multiple-choice accuracy of the model that stops at q (layers 0..q + exit q's LL), when
``evaluation.mc_path`` is set, and the nHSIC of the representation after layer q with the inputs and
the labels, on a sample of evaluation blocks. Held-out loss and perplexity come from the iteration
itself (its final evaluation on the eval snapshots).
"""

from __future__ import annotations

from typing import Any

import ray
import torch

from segprop_ray.core.data_order import sequential_batches
from segprop_ray.core.iteration import build_segment
from segprop_ray.core.parts import SegmentSpec
from segprop_ray.core.step_inputs import evaluate_loss
from segprop_ray.core.weights import ChainSource
from segprop_ray.pipeline.context import JobContext
from segprop_ray.storage.reader import ShardBatchReader
from segprop_ray.storage.snapcheck import CommitMarker, load_committed


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu")


def _tokenizer(ctx: JobContext):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ctx.model_dir)


def _eval_tokens(ctx: JobContext, hidden_size: int) -> CommitMarker:
    """The committed evaluation token shards."""
    marker = load_committed(ctx.layout, "eval", None, ctx.input_hash, ctx.num_blocks["eval"], ctx.spec(hidden_size))
    if marker is None:
        raise RuntimeError("evaluation tokens are not committed")
    return marker


def _first_blocks(ctx: JobContext, marker: CommitMarker, count: int) -> dict[str, torch.Tensor]:
    """The first ``count`` evaluation token blocks."""
    rows = list(range(min(count, marker.total_rows)))
    return next(iter(ShardBatchReader(ctx.layout, marker, [rows], with_hidden=False)))


def exit_metrics(job: dict[str, Any]) -> dict[str, Any]:
    """Accuracy and nHSIC of exit ``job.depth`` (``depth = -1``: the input model, with its eval loss)."""
    from segprop_ray.reporting.nhsic import representation_nhsic

    ctx = JobContext(**job)
    cfg, device = ctx.cfg, _device()
    parts = ctx.parts(device)
    plan = ctx.plan(parts.num_layers)
    depth = ctx.depth
    weights = ctx.run_weights(plan, committed_layers=list(range(depth + 1)) if depth >= 0 else [], parts=parts)
    layers = list(range(parts.num_layers)) if depth < 0 else plan.exit_layers(depth)
    source = weights.base if depth < 0 else ChainSource(weights.committed, weights.exit_weights(depth), weights.base)
    model = build_segment(parts, SegmentSpec([(i, source) for i in layers], source, source), trainable=False,
                          loss_chunk_tokens=cfg.training.loss_chunk_tokens)
    metrics: dict[str, Any] = {}
    tokens = _eval_tokens(ctx, parts.config.hidden_size)
    with torch.no_grad():
        if depth < 0:
            metrics["eval_loss"] = _baseline_loss(ctx, tokens, model, device)
        if cfg.evaluation.nhsic_tokens and depth >= 0:
            blocks = max(cfg.evaluation.nhsic_tokens // max(cfg.data.seq_len - 1, 1) + 1, 1)
            rows = _first_blocks(ctx, tokens, blocks)  # (N, T) each
            hidden = _hidden_after(model, rows, depth + 1, device)  # (N, T, H): after layer `depth`
            metrics.update(representation_nhsic(hidden.cpu(), rows["input_ids"], cfg.evaluation.nhsic_tokens,
                                                seed=cfg.training.seed, token_kind=rows["token_kind"]))
        if cfg.evaluation.mc_path:
            from segprop_ray.reporting.mc_eval import evaluate_exit_mc

            result = evaluate_exit_mc(model.logits, _tokenizer(ctx), cfg.evaluation, cfg.storage_options)
            metrics.update({k: result[k] for k in ("accuracy", "accuracy_norm", "n") if k in result})
    return metrics


def _hidden_after(model, rows: dict[str, torch.Tensor], num_layers: int, device: torch.device) -> torch.Tensor:
    """Hidden states after the first ``num_layers`` decoder layers of ``model`` (embedder included), each packed
    example seeing only itself (its positions and mask)."""
    ids, positions = rows["input_ids"].to(device), rows["position_ids"].to(device)  # (N, T)
    stack = model.stack
    truncated = type(stack)(stack.config, list(zip(stack.indices[:num_layers], stack.layers[:num_layers])), stack.rotary)
    return truncated(model.embedder(ids, positions), positions)


def _baseline_loss(ctx: JobContext, marker: CommitMarker, model, device: torch.device) -> float:
    """Mean eval loss of the input model over all evaluation blocks (the original score)."""
    batches = sequential_batches(marker.total_rows, ctx.cfg.training.per_device_eval_batch_size)
    return evaluate_loss(model, iter(ShardBatchReader(ctx.layout, marker, batches, with_hidden=False)), device, False)


def launch(ctx: JobContext) -> ray.ObjectRef:
    """Start :func:`exit_metrics` as a Ray task with the snapshot job's resources."""
    options = ctx.cfg.resources.snapshot.ray_options()
    return ray.remote(exit_metrics).options(**options, max_retries=2).remote(ctx.to_dict())

