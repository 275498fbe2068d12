"""One SegProp iteration, the same in-process and on a Ray worker: build, train, split the weights.

``RunWeights`` answers "where do this piece's weights come from now": the input model, the
committed layers, or an exit (LL + head trained in an earlier iteration). Whoever runs an
iteration (the in-process runner or a Ray Train worker) builds the segment from it, trains it with
:class:`SegmentLoop`, and splits the result into what is committed and what is kept as the exit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from segprop_ray.core.adapters import lora_targets, merge_lora_state
from segprop_ray.core.fused_head_loss import resolve_head_loss
from segprop_ray.core.optim import autocast_context
from segprop_ray.core.parts import ModelParts, SegmentSpec
from segprop_ray.core.plan import Iteration, SegPropPlan, snapshot_spec, split_exit_weights, stage1_spec, stage2_spec
from segprop_ray.core.stack import Segment
from segprop_ray.core.trainable import make_trainable
from segprop_ray.core.weights import ChainSource, TensorSource


@dataclass
class RunWeights:
    """Weight sources of a run at the current point of the algorithm."""

    plan: SegPropPlan
    base: TensorSource
    """The input model."""
    committed: TensorSource
    """Committed weights so far (embedder, prefix and middle layers), under original names."""
    exit_weights: Callable[[int | str], TensorSource]
    """LL layers + head kept by an iteration, by :func:`exit_id` (exit ``depth``, or ``<depth>-attn``)."""
    ll_baseline: str = "input"
    """``input``: LL layers restart from the input model each iteration; ``stage1``: from Stage 1's."""
    tied: bool = False
    """The model ties its LM head to the embedding: Stage 1 (and E2E) train them as one tensor."""

    def training_spec(self, it: Iteration | int) -> SegmentSpec:
        """The segment iteration ``it`` trains (a depth: the iteration that commits it): Stage 1 (or E2E), else a
        Stage 2 segment whose layers start from the input model (an MLP half: from its attention half's commit)."""
        it = self.plan.iteration(it) if isinstance(it, int) else it
        if it.stage != "stage2":
            return stage1_spec(self.plan, self.base, self.tied)
        previous = self.plan.iterations[self.plan.iterations.index(it) - 1]
        head = self.exit_weights(exit_id(previous))  # the head committed by the previous iteration
        ll = self.base if self.ll_baseline == "input" else self.exit_weights(self.plan.base_depth)
        layers = ChainSource(self.committed, self.base) if it.part == "mlp" else self.base
        return stage2_spec(self.plan, it.layers, layers, ll, head)

    def snapshot_spec(self, depth: int) -> SegmentSpec:
        """The producer of S[depth]: embedder + prefix for the base depth, else the committed layers of the segment
        that ends at ``depth``."""
        source = ChainSource(self.committed, self.base)
        it = self.plan.iteration(depth)
        if it.stage != "stage2":
            return snapshot_spec(self.plan.prefix_layers, source, embed=True)
        return snapshot_spec(it.layers, source, embed=False)


def exit_id(it: Iteration) -> int | str:
    """The name an iteration's exit weights are kept under: its depth, or ``<depth>-attn`` for an attention half."""
    return it.last if it.commits_depth else it.key


def build_segment(parts: ModelParts, spec: SegmentSpec, trainable: bool, loss_chunk_tokens: int = 0,
                  head_loss: str = "chunked") -> Segment:
    """Materialise a segment; all its parameters train when ``trainable``, else none.

    ``loss_chunk_tokens``: tokens per LM-head loss chunk (0: the default size, see ``core.head_loss``);
    ``head_loss``: ``training.head_loss`` (``auto``, ``chunked`` or ``fused``), resolved for the device and the
    family's logit math (:func:`~segprop_ray.core.fused_head_loss.resolve_head_loss`).
    """
    segment = parts.segment(spec)
    segment.loss_chunk_tokens = loss_chunk_tokens or None
    if segment.head is not None:
        segment.head.loss_kind = resolve_head_loss(head_loss, parts.device, segment.head.logit_math)
    segment.requires_grad_(trainable)
    return segment if trainable else segment.eval()


def build_training_segment(parts: ModelParts, weights: RunWeights, it: Iteration, args: object) -> Segment:
    """The segment iteration ``it`` trains, with only what it trains left trainable (one half of its layer with
    ``granularity: sublayer``; LoRA adapters with ``segprop.adapter``)."""
    segment = build_segment(parts, weights.training_spec(it), trainable=True,
                            loss_chunk_tokens=args.loss_chunk_tokens, head_loss=args.head_loss)  # type: ignore[attr-defined]
    make_trainable(segment, weights.plan, it, parts.layout, parts.config.model_type)
    return segment


def split_trained(segment: Segment, parts: ModelParts, plan: SegPropPlan, state: dict | None = None) -> tuple[dict, dict]:
    """(committed tensors, exit tensors) of a trained segment, as CPU copies under original names, LoRA adapters
    merged into their weights.

    ``state``: the segment's full state dict when it trained wrapped (DDP/FSDP); default: its own.
    """
    local = merge_lora_state(state if state is not None else segment.state_dict(), lora_targets(segment))
    tensors = {k: v.detach().to("cpu", copy=True) for k, v in segment.to_original_names(local).items()}
    return split_exit_weights(tensors, parts.layout, plan)


@torch.no_grad()
def snapshot_forward(producer: Segment, rows: dict[str, torch.Tensor], dtype: str, bf16: bool,
                     device: torch.device) -> torch.Tensor:
    """One snapshot batch: ``producer`` on the rows' token ids (first depth) or stored activations ``hidden``, with
    their positions, in the training precision (bf16 autocast when training uses it), cast to the storage dtype, on
    the CPU.

    On a GPU the rows come in without blocking (from page-locked memory when the reader pinned them) and the result
    goes out through a page-locked buffer (PyTorch's caching host allocator reuses it): on the H200, page-locked copies
    between host and GPU ran about 3x the pageable ones (BENCHMARKS.md). The values are the same either way.
    """
    def on_device(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device, non_blocking=True)

    hidden = rows.get("hidden")
    hidden = None if hidden is None else on_device(hidden).float()  # (n, T, H) widened exactly
    positions = on_device(rows["position_ids"]) if "position_ids" in rows else None
    with autocast_context(device, bf16):
        output = producer(on_device(rows["input_ids"]), hidden, positions)  # (n, T, H)
    return to_host(snapshot_cast(output, dtype))


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` on the CPU: itself there; from a GPU through a page-locked buffer, the copy waited for."""
    if tensor.device.type != "cuda":
        return tensor.cpu()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    torch.cuda.current_stream(tensor.device).synchronize()  # the writer reads it next
    return host


def snapshot_cast(hidden: torch.Tensor, dtype: str) -> torch.Tensor:
    """Activations in the SnapCheck storage precision (``bf16`` rounds, ``fp32`` keeps)."""
    return hidden.to(torch.bfloat16 if dtype == "bf16" else torch.float32)
