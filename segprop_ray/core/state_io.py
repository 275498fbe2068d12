"""Nested training state (optimizer, scheduler, counters, RNG) as safetensors + JSON, never pickle.

Tensors go to a safetensors file under generated names; the structure around them (dicts with
int or str keys, lists, numbers, strings) goes to JSON with references to those names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from segprop_ray.core.weights import load_tensors, save_tensors

_TENSOR = "__tensor__"
_DICT = "__dict__"
_TUPLE = "__tuple__"


def flatten_state(obj: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """``(json_structure, tensors)`` for a nested object of dicts, lists, scalars and tensors."""
    tensors: dict[str, torch.Tensor] = {}

    def encode(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            key = f"t{len(tensors)}"
            tensors[key] = value
            return {_TENSOR: key}
        if isinstance(value, dict):
            return {_DICT: [[encode(k), encode(v)] for k, v in value.items()]}
        if isinstance(value, tuple):
            return {_TUPLE: [encode(v) for v in value]}
        if isinstance(value, list):
            return [encode(v) for v in value]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"cannot store {type(value).__name__} in a checkpoint")

    return encode(obj), tensors


def unflatten_state(structure: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`."""
    if isinstance(structure, list):
        return [unflatten_state(v, tensors) for v in structure]
    if isinstance(structure, dict):
        if _TENSOR in structure:
            return tensors[structure[_TENSOR]]
        if _DICT in structure:
            return {unflatten_state(k, tensors): unflatten_state(v, tensors) for k, v in structure[_DICT]}
        if _TUPLE in structure:
            return tuple(unflatten_state(v, tensors) for v in structure[_TUPLE])
    return structure


def save_state(obj: Any, directory: str | Path, name: str) -> None:
    """Write ``obj`` as ``<name>.json`` + ``<name>.safetensors`` in ``directory``."""
    directory = Path(directory)
    structure, tensors = flatten_state(obj)
    save_tensors(tensors, directory / f"{name}.safetensors")
    (directory / f"{name}.json").write_text(json.dumps(structure))


def load_state(directory: str | Path, name: str) -> Any:
    """Read what :func:`save_state` wrote."""
    directory = Path(directory)
    structure = json.loads((directory / f"{name}.json").read_text())
    return unflatten_state(structure, load_tensors(directory / f"{name}.safetensors"))
