"""Checks of the segment settings against the model and the machines, before any work (one line each).

``granularity: sublayer`` needs the family's layer halves described in the layout table (and covering
every parameter of its layers); ``segprop.adapter`` must target some linear module of the decoder
layers; ``training.optim: adamw_8bit`` and ``training.head_loss: fused`` need CUDA workers and their
packages (``segprop_ray[cuda]``).
"""

from __future__ import annotations

import torch

from segprop_ray.config import Config
from segprop_ray.core.adapters import chosen_modules
from segprop_ray.core.data_order import BlockOrder
from segprop_ray.core.fused_head_loss import fused_unavailable
from segprop_ray.core.layout import check_halves
from segprop_ray.core.optim import optimizer_unavailable
from segprop_ray.core.parts import ModelParts
from segprop_ray.core.plan import MODES, SegPropPlan


def check_segments(cfg: Config, parts: ModelParts, plan: SegPropPlan) -> None:
    """Refuse segment settings the model cannot take (one-line ValueError)."""
    skeleton_layers = parts.skeleton.get_submodule(parts.layout.layers)
    if plan.granularity == "sublayer":
        check_halves(parts.layout, skeleton_layers[0])
    if plan.adapter is not None:
        _check_targets(parts, plan)


class _Probe(torch.nn.Module):
    """The skeleton's decoder layers as a segment looks to the adapter code (``stack.layers`` and origins)."""

    def __init__(self, parts: ModelParts):
        super().__init__()
        self.stack = torch.nn.Module()
        self.stack.layers = parts.skeleton.get_submodule(parts.layout.layers)
        self.origins = {f"stack.layers.{i}": parts.layout.layer_path(i) for i in range(parts.num_layers)}


def _check_targets(parts: ModelParts, plan: SegPropPlan) -> None:
    if not chosen_modules(_Probe(parts), plan.adapter, parts.config.model_type):
        raise ValueError(f"segprop.adapter.target_modules {plan.adapter.target_modules!r} matches no linear module of "
                         f"the {parts.layout.family} decoder layers")


def check_devices(cfg: Config) -> None:
    """Refuse an optimizer or head loss that the training workers cannot run (CUDA-only, package missing)."""
    resources = [cfg.resources.stage1] + ([] if MODES[cfg.segprop.mode].end_to_end else [cfg.resources.segment])
    on_cuda = all(res.use_gpu for res in resources)
    for stage in cfg.training_stages:
        args = cfg.training_for(stage)
        reason = optimizer_unavailable(args.optim, on_cuda)
        if reason is not None:
            raise ValueError(reason + ("" if on_cuda else " (the training workers have no GPU: resources.*.use_gpu)"))
        if args.head_loss == "fused":
            why = fused_unavailable(torch.device("cuda" if on_cuda else "cpu"))
            if why is not None:
                raise ValueError(f"training.head_loss: fused cannot be used: {why}")


def check_block_orders(cfg: Config, num_blocks: int, group_size: int) -> None:
    """Refuse (one-line ValueError) a training stage whose data-parallel workers would get no micro-batch of the
    ``num_blocks`` training blocks, once they are known (before any training starts)."""
    for stage in cfg.training_stages:
        resources = cfg.resources.segment if stage == "stage2" else cfg.resources.stage1
        BlockOrder.for_training(num_blocks, group_size, cfg.training_for(stage), cfg.data, resources.num_workers)
