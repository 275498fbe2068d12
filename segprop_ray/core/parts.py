"""Building only the pieces a job needs, with only their weights read.

The full model exists only as a skeleton on the ``meta`` device (no memory); a piece is a copy of
its skeleton module, materialised on the target device and filled from a :class:`TensorSource`.
A segment worker for a 70B model therefore holds one layer, LL and the head, never the model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from segprop_ray.core.hf_compat import make_rotary, model_from_config
from segprop_ray.core.layout import ArchLayout, resolve_layout
from segprop_ray.core.stack import DecoderStack, Embedder, LMHead, Segment
from segprop_ray.core.weights import TensorSource


class ModelParts:
    """Factory of pieces of one model: embedder, decoder layers, LM head, rotary embedding."""

    def __init__(self, config: Any, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.config = copy.deepcopy(config)
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        self.config.tie_word_embeddings = False  # pieces are built apart; a segment ties them again when asked
        with torch.device("meta"):
            self.skeleton = model_from_config(self.config)
        self.layout: ArchLayout = resolve_layout(self.skeleton)
        self.device = torch.device(device)
        self.dtype = dtype

    @property
    def num_layers(self) -> int:
        """Decoder layers of the model."""
        return len(self.skeleton.get_submodule(self.layout.layers))

    def piece(self, path: str, source: TensorSource) -> nn.Module:
        """A fresh copy of module ``path`` on the device, with its weights read from ``source``."""
        template = self.skeleton.get_submodule(path)
        if _computed_buffers(template):
            module = self._constructed(path, template)
        else:
            module = copy.deepcopy(template).to_empty(device=self.device)
        module = module.to(self.dtype)
        state = {name: self._read(source, f"{path}.{name}") for name in module.state_dict()}
        module.load_state_dict(state, strict=True)
        return module

    def _constructed(self, path: str, template: nn.Module) -> nn.Module:
        """Build a decoder layer for real: its non-saved buffers (e.g. transformers 4.x GPT-2's causal mask)
        are computed in ``__init__`` and would be garbage after a meta copy."""
        prefix = self.layout.layers + "."
        if not path.startswith(prefix):
            raise ValueError(f"{path} holds buffers that are not saved with the weights; cannot rebuild it")
        with torch.device(self.device):
            return type(template)(self.config, layer_idx=int(path[len(prefix):]))

    def _read(self, source: TensorSource, name: str) -> torch.Tensor:
        if name in source.keys():
            return source.get(name)
        if name == f"{self.layout.head}.weight" and self.tied:  # untie: the head starts as a copy
            return source.get(f"{self.layout.embed}.weight").clone()
        raise KeyError(f"weight {name} not found in the model's weights")

    def embedder(self, source: TensorSource) -> Embedder:
        """Token (and position) embedding."""
        lay = self.layout
        positions = self.piece(lay.pos_embed, source) if lay.pos_embed else None
        dropout = copy.deepcopy(self.skeleton.get_submodule(lay.embed_dropout)) if lay.embed_dropout else None
        return Embedder(self.piece(lay.embed, source), positions, dropout)

    def head(self, source: TensorSource) -> LMHead:
        """Final norm + LM head."""
        return LMHead(self.piece(self.layout.norm, source), self.piece(self.layout.head, source))

    def rotary(self) -> nn.Module | None:
        """The rotary embedding (computed buffers, no weights), if the family has one."""
        if self.layout.rotary is None:
            return None
        return make_rotary(type(self.skeleton.get_submodule(self.layout.rotary)), self.config, self.device)

    def segment(self, spec: "SegmentSpec") -> Segment:
        """Build the segment described by ``spec``."""
        lay = self.layout
        origins: dict[str, str] = {}
        embedder = self.embedder(spec.embed_source) if spec.embed_source is not None else None
        if embedder is not None:
            origins["embedder.tokens"] = lay.embed
            if lay.pos_embed:
                origins["embedder.positions"] = lay.pos_embed
        layers = [(index, self.piece(lay.layer_path(index), src)) for index, src in spec.layers]
        origins.update({f"stack.layers.{i}": lay.layer_path(index) for i, (index, _) in enumerate(layers)})
        head = self.head(spec.head_source) if spec.head_source is not None else None
        if head is not None:
            origins.update({"head.norm": lay.norm, "head.proj": lay.head})
        if spec.tie_head and embedder is not None and head is not None:
            head.proj.weight = embedder.tokens.weight  # one tensor, trained as one (HF's tied embeddings)
        stack = DecoderStack(self.config, layers, self.rotary())
        return Segment(stack, origins, embedder, head)


def _computed_buffers(module: nn.Module) -> bool:
    """Whether ``module`` has buffers that are not in its state dict (computed at construction)."""
    return any(m._non_persistent_buffers_set for m in module.modules())


@dataclass
class SegmentSpec:
    """Which pieces a segment has and where each one's weights come from."""

    layers: list[tuple[int, TensorSource]]
    """Decoder layers in execution order: ``(original index, weights source)``."""
    embed_source: TensorSource | None = None
    """Weights of the embedder, or None for a segment fed with hidden states."""
    head_source: TensorSource | None = None
    """Weights of norm + LM head, or None for a segment that outputs hidden states."""
    tie_head: bool = False
    """The LM head shares the embedding's weight tensor (a tied model in a stage that trains both)."""
