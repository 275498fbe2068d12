"""Building only the pieces a job needs, with only their weights read.

The full model exists only as a skeleton whose parameters are on the ``meta`` device (no memory) and whose
buffers are real (they are computed from the config at construction and small: rotary frequencies, Gemma's
embedding scale, transformers 4.x GPT-2's causal mask). A piece is a copy of its skeleton module with its
parameters materialised on the target device and filled from a :class:`TensorSource`. A segment worker for a
70B model therefore holds one layer, LL and the head, never the model.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from segprop_ray.core.head_loss import LogitMath
from segprop_ray.core.hf_compat import make_rotary, model_from_config
from segprop_ray.core.layout import ArchLayout, resolve_layout
from segprop_ray.core.stack import DecoderStack, Embedder, LMHead, Segment
from segprop_ray.core.checkpoint_names import model_source
from segprop_ray.core.weights import SafetensorsSource, TensorSource


class ModelParts:
    """Factory of pieces of one model: embedder, decoder layers, LM head, rotary embedding."""

    def __init__(self, config: Any, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.config = copy.deepcopy(config)
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        self.config.tie_word_embeddings = False  # pieces are built apart; a segment ties them again when asked
        with parameters_on_meta():
            self.skeleton = model_from_config(self.config)
        self.layout: ArchLayout = resolve_layout(self.skeleton)
        self.device = torch.device(device)
        self.dtype = dtype

    def base_source(self, model_dir: str | Path) -> TensorSource:
        """The input model's weights in ``model_dir`` under the names this model's modules use."""
        return model_source(SafetensorsSource.from_model_dir(model_dir), self.layout.family)

    @property
    def num_layers(self) -> int:
        """Decoder layers of the model."""
        return len(self.skeleton.get_submodule(self.layout.layers))

    def piece(self, path: str, source: TensorSource) -> nn.Module:
        """A fresh copy of module ``path`` on the device, with its weights read from ``source``."""
        module = materialize(copy.deepcopy(self.skeleton.get_submodule(path)), self.device).to(self.dtype)
        state = {name: self._read(source, f"{path}.{name}") for name in module.state_dict()}
        module.load_state_dict(state, strict=True)
        return module

    def _read(self, source: TensorSource, name: str) -> torch.Tensor:
        if name in source.keys():
            return source.get(name)
        if name == f"{self.layout.head}.weight" and self.tied:  # untie: the head starts as a copy
            return source.get(f"{self.layout.embed}.weight").clone()
        raise KeyError(f"weight {name} not found in the model's weights")

    def embedder(self, source: TensorSource) -> Embedder:
        """Token (and position) embedding, with the family's embedding multiplier."""
        lay = self.layout
        positions = self.piece(lay.pos_embed, source) if lay.pos_embed else None
        dropout = copy.deepcopy(self.skeleton.get_submodule(lay.embed_dropout)) if lay.embed_dropout else None
        tokens = self.piece(lay.embed, source)
        scale = lay.math.embedding_multiplier(self.config, tokens)
        return Embedder(tokens, positions, dropout, scale, scale_in_dtype=lay.math.embed_scale_in_dtype)

    def head(self, source: TensorSource) -> LMHead:
        """Final norm + LM head, with the family's logit scaling and soft-capping."""
        return LMHead(self.piece(self.layout.norm, source), self.piece(self.layout.head, source), self.logit_math())

    def logit_math(self) -> LogitMath:
        """The logit transform of this model's family and config."""
        math = self.layout.math
        return LogitMath(math.logit_multiplier(self.config), math.logit_divisor(self.config), math.softcap(self.config))

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


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on ``meta`` (no memory, no initialisation) and their buffers for
    real, as accelerate's ``init_empty_weights(include_buffers=False)`` does."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def materialize(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` with empty parameters on ``device`` (to be loaded) and its computed buffers moved there."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None:
                sub._parameters[name] = nn.Parameter(torch.empty_like(param, device=device),
                                                     requires_grad=param.requires_grad)
        for name, buffer in list(sub._buffers.items()):
            if buffer is not None:
                sub._buffers[name] = buffer.to(device) if buffer.device.type != "meta" else torch.empty_like(
                    buffer, device=device)
    return module


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
