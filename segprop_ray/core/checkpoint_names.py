"""A checkpoint read under the parameter names the installed transformers builds.

transformers 5 stores some families under other names than its modules use: Mixtral's and Qwen3-MoE's
experts are one expert per tensor on disk (``block_sparse_moe.experts.3.w1.weight``) and one fused tensor per
layer in the model (``mlp.experts.gate_up_proj``). transformers describes each such family's conversion as
data (``conversion_mapping``: renamings, and converters made of operations such as stacking the experts and
concatenating gate and up); :class:`ConvertedSource` applies that same description, with transformers' own
operations, to the tensors a piece asks for, so only those tensors are read.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from segprop_ray.core.weights import TensorSource

EXPERT_INDEX = r"(\d+)"


def checkpoint_conversions(model_type: str) -> list[Any] | None:
    """transformers' conversion list for ``model_type`` (None: names on disk are the model's own, as in 4.x)."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:  # transformers 4.x: modules and checkpoints use the same names
        return None
    return get_checkpoint_conversion_mapping(model_type)


def model_source(source: TensorSource, model_type: str) -> TensorSource:
    """``source`` under the names the model's modules use (itself when the family stores them so)."""
    conversions = checkpoint_conversions(model_type)
    return ConvertedSource(source, conversions) if conversions else source


class ConvertedSource:
    """Tensors of a checkpoint under the model's names: renamed, or built from several checkpoint tensors."""

    def __init__(self, source: TensorSource, conversions: list[Any]):
        self._source = source
        renamings = [c for c in conversions if not hasattr(c, "operations")]
        self._converters = [c for c in conversions if hasattr(c, "operations")]
        self._original = {_renamed(key, renamings): key for key in source.keys()}  # renamed -> on-disk name
        self._built: dict[str, tuple[Any, dict[str, list[str]]]] = {}
        for converter in self._converters:
            self._built.update(_targets(converter, self._original))
        consumed = {key for _, groups in self._built.values() for keys in groups.values() for key in keys}
        self._keys = frozenset(set(self._original) - consumed) | frozenset(self._built)

    def keys(self) -> frozenset[str]:
        return self._keys

    def get(self, name: str) -> torch.Tensor:
        if name in self._built:
            converter, groups = self._built[name]
            data = {pattern: [self._source.get(self._original[key]) for key in keys] for pattern, keys in groups.items()}
            for operation in converter.operations:  # transformers' own ops: stack the experts, concatenate gate/up
                data = operation.convert(data, source_patterns=converter.source_patterns,
                                         target_patterns=converter.target_patterns)
            (tensor,) = data.values()
            return tensor
        return self._source.get(self._original[name])


def _renamed(key: str, renamings: list[Any]) -> str:
    for renaming in renamings:
        for source, target in zip(renaming.source_patterns, renaming.target_patterns):
            key = re.sub(source, target, key)
    return key


def _pattern(prefix: str, pattern: str) -> re.Pattern:
    return re.compile(re.escape(prefix) + re.escape(pattern).replace(r"\*", EXPERT_INDEX) + "$")


def _targets(converter: Any, names: dict[str, str]) -> dict[str, tuple[Any, dict[str, list[str]]]]:
    """Model names this converter builds, each with the checkpoint names of each source pattern, in expert order."""
    first = re.compile(re.escape(converter.source_patterns[0]).replace(r"\*", EXPERT_INDEX) + "$")
    prefixes = {name[: match.start()] for name in names if (match := first.search(name))}
    built = {}
    for prefix in sorted(prefixes):
        groups = {}
        for pattern in converter.source_patterns:
            matcher = _pattern(prefix, pattern)
            found = [(int(m.group(1)), name) for name in names if (m := matcher.match(name))]
            groups[pattern] = [name for _, name in sorted(found)]
        built[prefix + converter.target_patterns[0]] = (converter, groups)
    return built
