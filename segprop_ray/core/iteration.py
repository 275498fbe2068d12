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

from segprop_ray.core.optim import autocast_context
from segprop_ray.core.parts import ModelParts, SegmentSpec
from segprop_ray.core.plan import SegPropPlan, snapshot_spec, split_exit_weights, stage1_spec, stage2_spec
from segprop_ray.core.stack import Segment
from segprop_ray.core.weights import ChainSource, TensorSource


@dataclass
class RunWeights:
    """Weight sources of a run at the current point of the algorithm."""

    plan: SegPropPlan
    base: TensorSource
    """The input model."""
    committed: TensorSource
    """Committed weights so far (embedder, prefix and middle layers), under original names."""
    exit_weights: Callable[[int], TensorSource]
    """LL layers + head kept as exit ``depth``."""
    ll_baseline: str = "input"
    """``input``: LL layers restart from the input model each iteration; ``stage1``: from Stage 1's."""
    tied: bool = False
    """The model ties its LM head to the embedding: Stage 1 (and E2E) train them as one tensor."""

    def training_spec(self, depth: int) -> SegmentSpec:
        """The segment trained to commit ``depth``: Stage 1 at the base depth, else a Stage 2 iteration."""
        if depth == self.plan.base_depth:
            return stage1_spec(self.plan, self.base, self.tied)
        head = self.exit_weights(depth - 1)  # the head committed by the previous iteration
        ll = self.base if self.ll_baseline == "input" else self.exit_weights(self.plan.base_depth)
        return stage2_spec(self.plan, depth, self.base, ll, head)

    def snapshot_spec(self, depth: int) -> SegmentSpec:
        """The producer of S[depth]: embedder + prefix for the base depth, else committed layer ``depth`` alone."""
        source = ChainSource(self.committed, self.base)
        if depth == self.plan.base_depth:
            return snapshot_spec(self.plan.prefix_layers, source, embed=True)
        return snapshot_spec([depth], source, embed=False)


def build_segment(parts: ModelParts, spec: SegmentSpec, trainable: bool, loss_chunk_tokens: int = 0) -> Segment:
    """Materialise a segment; all its parameters train when ``trainable``, else none.

    ``loss_chunk_tokens``: tokens per LM-head loss chunk (0: the default size, see ``core.head_loss``).
    """
    segment = parts.segment(spec)
    segment.loss_chunk_tokens = loss_chunk_tokens or None
    segment.requires_grad_(trainable)
    return segment if trainable else segment.eval()


def split_trained(segment: Segment, parts: ModelParts, plan: SegPropPlan, state: dict | None = None) -> tuple[dict, dict]:
    """(committed tensors, exit tensors) of a trained segment, as CPU copies under original names.

    ``state``: the segment's full state dict when it trained wrapped (DDP/FSDP); default: its own.
    """
    named = segment.to_original_names(state) if state is not None else segment.original_state_dict()
    tensors = {k: v.detach().to("cpu", copy=True) for k, v in named.items()}
    return split_exit_weights(tensors, parts.layout, plan)


@torch.no_grad()
def snapshot_forward(producer: Segment, rows: dict[str, torch.Tensor], dtype: str, bf16: bool,
                     device: torch.device) -> torch.Tensor:
    """One snapshot batch: ``producer`` on the rows' token ids (first depth) or stored activations ``hidden``, with
    their positions, in the training precision (bf16 autocast when training uses it), cast to the storage dtype, on
    the CPU."""
    hidden = rows.get("hidden")
    hidden = None if hidden is None else hidden.to(device).float()  # (n, T, H) widened exactly
    positions = rows["position_ids"].to(device) if "position_ids" in rows else None
    with autocast_context(device, bf16):
        output = producer(rows["input_ids"].to(device), hidden, positions)  # (n, T, H)
    return snapshot_cast(output, dtype).cpu()


def snapshot_cast(hidden: torch.Tensor, dtype: str) -> torch.Tensor:
    """Activations in the SnapCheck storage precision (``bf16`` rounds, ``fp32`` keeps)."""
    return hidden.to(torch.bfloat16 if dtype == "bf16" else torch.float32)
