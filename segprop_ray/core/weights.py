"""Named tensors in and out: read only the tensors a piece needs, write committed weights as safetensors.

Weights are always addressed by their original parameter names (``model.layers.17.mlp.up_proj.weight``),
so a run's committed layers are plain per-layer safetensors files and the final model is their union.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Mapping, Protocol

import torch
from safetensors import safe_open
from safetensors.torch import save_file


class TensorSource(Protocol):
    """Read access to named tensors."""

    def keys(self) -> frozenset[str]:
        """All tensor names available."""
        ...

    def get(self, name: str) -> torch.Tensor:
        """The tensor called ``name`` (raises KeyError if absent)."""
        ...


class DictSource:
    """Tensors held in memory."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self._tensors = dict(tensors)
        self._keys = frozenset(self._tensors)

    def keys(self) -> frozenset[str]:
        return self._keys

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name]


class SafetensorsSource:
    """Tensors in safetensors files, opened lazily: reading a layer reads only that layer's bytes."""

    def __init__(self, files: Iterable[str | Path]):
        self._file_of: dict[str, str] = {}
        for path in files:
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    self._file_of[key] = str(path)
        self._keys = frozenset(self._file_of)

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> "SafetensorsSource":
        """The weights of a Hugging Face model directory (single file or sharded with an index)."""
        model_dir = Path(model_dir)
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return cls(model_dir / name for name in names)
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors weights in {model_dir} (pickled .bin weights are not read)")
        return cls(files)

    def keys(self) -> frozenset[str]:
        return self._keys

    def get(self, name: str) -> torch.Tensor:
        with safe_open(self._file_of[name], framework="pt") as handle:
            return handle.get_tensor(name)


class ChainSource:
    """The first source that has a name wins: committed weights over the input model's."""

    def __init__(self, *sources: TensorSource | None):
        self._sources = [(s.keys(), s) for s in sources if s is not None]

    def keys(self) -> frozenset[str]:
        return frozenset().union(*(keys for keys, _ in self._sources))

    def get(self, name: str) -> torch.Tensor:
        for keys, source in self._sources:
            if name in keys:
                return source.get(name)
        raise KeyError(name)


def save_tensors(tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` to a safetensors file (contiguous CPU copies; shared storage is split)."""
    flat = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    save_file(flat, str(path), metadata=metadata)


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Read every tensor of a safetensors file."""
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}
