"""Which parameters of a built segment train in an iteration: all of them, one half of its layer, or LoRA adapters.

A segment is built with every parameter trainable (:func:`segprop_ray.core.iteration.build_segment`). A
``granularity: sublayer`` iteration then freezes the other half of its layer (which submodules form each half
comes from the family's :class:`~segprop_ray.core.layout.LayerHalves`); with ``segprop.adapter`` every weight
is frozen and PEFT's LoRA layers are added where full weights would have trained.
"""

from __future__ import annotations

from torch import nn

from segprop_ray.core.adapters import LoraTarget, add_lora
from segprop_ray.core.layout import ArchLayout, check_halves
from segprop_ray.core.plan import Iteration, SegPropPlan


def freeze_other_half(segment: nn.Module, layout: ArchLayout, layer: int, part: str) -> None:
    """Freeze every parameter of decoder layer ``layer`` (original index) of ``segment`` outside half ``part``."""
    position = segment.stack.indices.index(layer)
    module = segment.stack.layers[position]
    halves = check_halves(layout, module)
    for name, param in module.named_parameters():
        if halves.half_of(name) != part:
            param.requires_grad_(False)


def make_trainable(segment: nn.Module, plan: SegPropPlan, it: Iteration, layout: ArchLayout,
                   model_type: str) -> list[LoraTarget]:
    """Restrict what trains in ``segment`` for iteration ``it``; returns the LoRA-adapted modules (none without an
    adapter)."""
    if it.half is not None:
        freeze_other_half(segment, layout, it.first, it.half)
    if plan.adapter is None:
        return []
    return add_lora(segment, plan.adapter, model_type)


def trainable_names(module: nn.Module) -> set[str]:
    """Names of the parameters that train (what a checkpoint holds)."""
    return {name for name, param in module.named_parameters() if param.requires_grad}
