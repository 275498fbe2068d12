"""LoRA adapters on a segment through PEFT, and their merge into plain weights on commit.

A segment that trains adapters keeps every weight it was built with frozen and gets PEFT LoRA layers
(``peft.inject_adapter_in_model``) on the chosen linear modules of the decoder layers it would have
trained: the segment's layers (or one half of a layer), LL's layers, Stage 1's prefix. The embedding,
the final norm and the LM head stay frozen, as PEFT leaves them. On commit the adapters are merged
(``W + (B @ A) * alpha / r``, transposed for a ``fan_in_fan_out`` Conv1D as PEFT's ``get_delta_weight``
does) under the modules' own names, so committed layers, exits, snapshots and exports are plain weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from segprop_ray.core.adapter_spec import LoraSpec

ADAPTER = "default"
"""PEFT's adapter name."""
LORA_TAG = ".lora_"
"""Parameter names of adapters contain it (``q_proj.lora_A.default.weight``)."""


@dataclass(frozen=True)
class LoraTarget:
    """One module with an adapter: where, and how its update is scaled."""

    path: str
    """Module path inside the segment (``stack.layers.0.self_attn.q_proj``)."""
    scaling: float
    fan_in_fan_out: bool


def peft_default_targets(model_type: str) -> tuple[str, ...]:
    """PEFT's default LoRA target modules for a family (``q_proj``, ``v_proj`` for Llama)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    if model_type not in DEFAULTS:
        raise ValueError(f"segprop.adapter.target_modules: PEFT has no default for {model_type}; name the modules")
    return tuple(DEFAULTS[model_type])


def is_linear(module: nn.Module) -> bool:
    """A module PEFT's LoRA adapts here: ``nn.Linear`` or transformers' ``Conv1D`` (GPT-2)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def matches(path: str, targets: tuple[str, ...] | str) -> bool:
    """PEFT's matching of a module path: a name list matches the path's end, a string the whole path (regex)."""
    if isinstance(targets, str):
        return targets == "all-linear" or re.fullmatch(targets, path) is not None
    return any(path == name or path.endswith("." + name) for name in targets)


def chosen_modules(segment: nn.Module, spec: LoraSpec, model_type: str) -> list[str]:
    """Paths (in the segment) of the linear modules of its decoder layers whose weight trains now and that ``spec``
    targets, matched as PEFT matches them against their paths in the original model (``model.layers.5.mlp.up_proj``)."""
    targets = spec.target_modules if spec.target_modules is not None else peft_default_targets(model_type)
    chosen = []
    for index, layer in enumerate(segment.stack.layers):
        local = f"stack.layers.{index}"
        for path, module in layer.named_modules(prefix=segment.origins[local]):
            if is_linear(module) and module.weight.requires_grad and matches(path, targets):
                chosen.append(local + path[len(segment.origins[local]):])
    return chosen


def add_lora(segment: nn.Module, spec: LoraSpec, model_type: str) -> list[LoraTarget]:
    """Freeze ``segment`` and inject LoRA adapters (PEFT's initialisation: A random, B zero) on its targeted trainable
    linear modules; returns the adapted modules. One-line error when nothing matches."""
    from peft import LoraConfig, inject_adapter_in_model

    chosen = chosen_modules(segment, spec, model_type)
    if not chosen:
        raise ValueError(f"segprop.adapter.target_modules {spec.target_modules!r} matches no linear module of the "
                         "decoder layers this iteration trains")
    segment.requires_grad_(False)
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=chosen,
                        fan_in_fan_out=any(type(segment.get_submodule(p)).__name__ == "Conv1D" for p in chosen))
    inject_adapter_in_model(config, segment, adapter_name=ADAPTER)
    return lora_targets(segment)


def lora_targets(segment: nn.Module) -> list[LoraTarget]:
    """The segment's PEFT LoRA layers (none, without importing PEFT, when it has no adapter parameter)."""
    if not any(LORA_TAG in name for name, _ in segment.named_parameters()):
        return []
    from peft.tuners.lora import LoraLayer

    return [LoraTarget(path, float(module.scaling[ADAPTER]), bool(module.fan_in_fan_out))
            for path, module in segment.named_modules() if isinstance(module, LoraLayer)]


def merge_lora_state(state: dict[str, torch.Tensor], targets: list[LoraTarget]) -> dict[str, torch.Tensor]:
    """A segment's state dict (local names, adapters included) as plain weights: each adapted module's
    ``base_layer.weight`` plus ``(B @ A) * scaling`` (fp32) under ``<module>.weight``, its bias under ``<module>.bias``,
    adapters dropped."""
    merged = {name: tensor for name, tensor in state.items() if LORA_TAG not in name}
    for target in targets:
        base = merged.pop(f"{target.path}.base_layer.weight")
        a = state[f"{target.path}.lora_A.{ADAPTER}.weight"].float()  # (r, in)
        b = state[f"{target.path}.lora_B.{ADAPTER}.weight"].float()  # (out, r)
        delta = (b @ a) * target.scaling  # (out, in)
        delta = delta.T if target.fan_in_fan_out else delta  # Conv1D stores (in, out)
        merged[f"{target.path}.weight"] = (base.float() + delta).to(base.dtype)
        bias = merged.pop(f"{target.path}.base_layer.bias", None)
        if bias is not None:
            merged[f"{target.path}.bias"] = bias
    return merged
