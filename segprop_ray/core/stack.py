"""The split model: an optional embedder, any decoder layers (by original index), an optional LM head.

One module class covers every piece SegProp runs: Stage 1 (embed + layers 0..p + LL + head), a
Stage 2 segment (layer q + LL + head on cached activations), a snapshot job (layer q alone), an
exit model (LL + head) and E2E (everything). Each sub-module remembers its path in the original
model, so the trained weights are saved under their original names.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn

from segprop_ray.core.head_loss import linear_cross_entropy
from segprop_ray.core.hf_compat import attention_masks, call_decoder_layer, layer_attention_type


class Embedder(nn.Module):
    """Token embedding, plus learned positions and dropout where the family has them."""

    def __init__(self, tokens: nn.Embedding, positions: nn.Embedding | None = None, dropout: nn.Module | None = None):
        super().__init__()
        self.tokens = tokens
        self.positions = positions
        self.dropout = dropout

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.tokens(input_ids)  # (B, T) -> (B, T, H)
        if self.positions is not None:
            pos = torch.arange(input_ids.shape[1], device=input_ids.device)
            hidden = hidden + self.positions(pos)[None]  # (B, T, H) + (1, T, H)
        return self.dropout(hidden) if self.dropout is not None else hidden


class LMHead(nn.Module):
    """Final norm and projection to the vocabulary."""

    def __init__(self, norm: nn.Module, proj: nn.Linear):
        super().__init__()
        self.norm = norm
        self.proj = proj

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(hidden))  # (B, T, H) -> (B, T, V)

    def next_token_loss(self, hidden: torch.Tensor, input_ids: torch.Tensor, chunk_tokens: int | None = None):
        """Mean cross-entropy of predicting token t+1 at position t, without all logits in memory at once.

        Reads ``proj.weight`` directly rather than calling ``proj``: under FSDP the head must belong to the unit
        whose forward is running, which holds as the pipeline wraps the whole segment as one unit.
        """
        normed = self.norm(hidden[:, :-1])  # (B, T-1, H): the last position predicts nothing
        flat = normed.reshape(-1, normed.shape[-1])  # (B*(T-1), H)
        targets = input_ids[:, 1:].reshape(-1)  # (B*(T-1),)
        return linear_cross_entropy(flat, self.proj.weight, self.proj.bias, targets, chunk_tokens)


class DecoderStack(nn.Module):
    """Decoder layers applied in the given order; each keeps its original index for its attention type."""

    def __init__(self, config: Any, layers: list[tuple[int, nn.Module]], rotary: nn.Module | None):
        super().__init__()
        self.config = config
        self.indices = [index for index, _ in layers]
        self.layers = nn.ModuleList(module for _, module in layers)
        self.rotary = rotary
        self._kinds = [layer_attention_type(config, index) for index in self.indices]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if not self.indices:
            return hidden
        position_ids = torch.arange(hidden.shape[1], device=hidden.device)[None]  # (1, T): packed blocks start at 0
        rope = self.rotary(hidden, position_ids) if self.rotary is not None else None
        masks = attention_masks(self.config, hidden, position_ids, set(self._kinds))
        for layer, kind in zip(self.layers, self._kinds):
            hidden = call_decoder_layer(
                layer, hidden, attention_mask=masks[kind], position_ids=position_ids, position_embeddings=rope
            )
        return hidden


class Segment(nn.Module):
    """``head(stack(embed(input_ids) or hidden))``: the loss when it has a head, else the hidden states."""

    def __init__(
        self,
        stack: DecoderStack,
        origins: dict[str, str],
        embedder: Embedder | None = None,
        head: LMHead | None = None,
    ):
        super().__init__()
        self.embedder = embedder
        self.stack = stack
        self.head = head
        self.origins = origins  # sub-module path in this Segment -> path in the original model
        self.loss_chunk_tokens: int | None = None  # tokens per LM-head loss chunk; None: ~1 GiB of fp32 logits

    def forward(self, input_ids: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Mean next-token loss if the segment has a head, else its output hidden states (B, T, H)."""
        if self.embedder is not None:
            hidden = self.embedder(input_ids)
        elif hidden is None:
            raise ValueError("a segment without embedder needs the input hidden states")
        hidden = self.stack(hidden)
        if self.head is None:
            return hidden
        return self.head.next_token_loss(hidden, input_ids, self.loss_chunk_tokens)

    def logits(self, input_ids: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V) of a segment with a head."""
        if self.head is None:
            raise ValueError("this segment has no LM head")
        hidden = self.embedder(input_ids) if self.embedder is not None else hidden
        return self.head(self.stack(hidden))

    def original_state_dict(self) -> dict[str, torch.Tensor]:
        """Parameters under their names in the original model (``model.layers.17.mlp...``)."""
        return self.to_original_names(self.state_dict())

    def to_original_names(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A state dict of this segment (its own names, e.g. gathered from DDP/FSDP) under the original names."""
        result = {}
        for name, tensor in state.items():
            for local, origin in self.origins.items():
                if name.startswith(local + "."):
                    result[origin + name[len(local):]] = tensor
                    break
        return result

    def pieces(self) -> Iterator[tuple[str, nn.Module]]:
        """``(original path, module)`` of every piece."""
        for local, origin in self.origins.items():
            yield origin, self.get_submodule(local)

