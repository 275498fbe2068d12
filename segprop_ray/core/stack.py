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

from segprop_ray.core.blocks import all_positions_index
from segprop_ray.core.fused_head_loss import fused_linear_cross_entropy
from segprop_ray.core.head_loss import NO_MATH, LogitMath, linear_cross_entropy
from segprop_ray.core.hf_compat import attention_masks, call_decoder_layer, layer_attention_type, rotary_embeddings


class Embedder(nn.Module):
    """Token embedding (times the family's embedding multiplier), plus learned positions and dropout where the
    family has them."""

    def __init__(self, tokens: nn.Embedding, positions: nn.Embedding | None = None, dropout: nn.Module | None = None,
                 scale: float | None = None, scale_in_dtype: bool = False):
        super().__init__()
        self.tokens = tokens
        self.positions = positions
        self.dropout = dropout
        self.scale = scale
        """Multiplier of the token embeddings (None: none)."""
        self.scale_in_dtype = scale_in_dtype
        """Round the multiplier to the embeddings' dtype first (Gemma's ``normalizer``), else multiply by the float."""

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.tokens(input_ids)  # (B, T) -> (B, T, H)
        if self.scale is not None:
            factor = torch.tensor(self.scale, dtype=hidden.dtype) if self.scale_in_dtype else self.scale
            hidden = hidden * factor
        if self.positions is not None:
            hidden = hidden + self.positions(position_ids)  # (B, T, H) + (B, T, H)
        return self.dropout(hidden) if self.dropout is not None else hidden


class LMHead(nn.Module):
    """Final norm and projection to the vocabulary, then the family's logit scaling and soft-capping."""

    def __init__(self, norm: nn.Module, proj: nn.Linear, logit_math: LogitMath | None = None):
        super().__init__()
        self.norm = norm
        self.proj = proj
        self.logit_math = logit_math or NO_MATH
        self.loss_kind = "chunked"
        """``chunked`` (:mod:`.head_loss`) or ``fused`` (:mod:`.fused_head_loss`, CUDA), set when the segment is built."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.logit_math.apply(self.proj(self.norm(hidden)))  # (B, T, H) -> (B, T, V)

    def next_token_loss(self, hidden: torch.Tensor, input_ids: torch.Tensor, predict_at: torch.Tensor | None = None,
                        num_items: float | None = None, chunk_tokens: int | None = None) -> torch.Tensor:
        """Cross-entropy of predicting token t+1 at the positions ``predict_at`` (flat indices into (B*T); all but
        each block's last by default), summed and divided by ``num_items`` (default: the number of predictions),
        without all logits in memory at once: only the predicted positions go through the head.

        Reads ``proj.weight`` directly rather than calling ``proj``: under FSDP the head must belong to the unit
        whose forward is running, which holds as the pipeline wraps the whole segment as one unit.
        """
        batch, seq_len, width = hidden.shape
        if predict_at is None:
            predict_at = all_positions_index(batch, seq_len, hidden.device)
        chosen = hidden.reshape(batch * seq_len, width).index_select(0, predict_at)  # (N, H)
        targets = input_ids.reshape(-1).index_select(0, predict_at + 1)  # (N,): the next token of each
        normalizer = float(num_items) if num_items is not None else max(len(predict_at), 1)
        if self.loss_kind == "fused" and torch.is_grad_enabled() and len(predict_at):
            return fused_linear_cross_entropy(self.norm(chosen), self.proj.weight, self.proj.bias, targets, normalizer,
                                              self.logit_math)
        return linear_cross_entropy(self.norm(chosen), self.proj.weight, self.proj.bias, targets, chunk_tokens,
                                    normalizer=normalizer, logit_math=self.logit_math)


def shared_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """``position_ids`` (B, T) as (1, T) when every row holds the same positions (blocks of one sequence each, the
    usual unpacked case), as HF's models pass them: the rotary tables and masks are then made once and broadcast,
    with the same values; rows that differ (packed examples) are kept as they are."""
    if position_ids.shape[0] > 1 and bool((position_ids == position_ids[:1]).all()):
        return position_ids[:1]  # (B, T) -> (1, T)
    return position_ids


class DecoderStack(nn.Module):
    """Decoder layers applied in the given order; each keeps its original index for its attention type."""

    def __init__(self, config: Any, layers: list[tuple[int, nn.Module]], rotary: nn.Module | None):
        super().__init__()
        self.config = config
        self.indices = [index for index, _ in layers]
        self.layers = nn.ModuleList(module for _, module in layers)
        self.rotary = rotary
        self._kinds = [layer_attention_type(config, index) for index in self.indices]

    def forward(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """The layers on ``hidden`` (B, T, H); ``position_ids`` (B, T) restart at 0 where a packed example starts,
        which gives every example its own block of the causal mask (transformers' packed-sequence masks)."""
        if not self.indices:
            return hidden
        position_ids = shared_positions(position_ids)
        kinds = set(self._kinds)
        rope = rotary_embeddings(self.rotary, hidden, position_ids, kinds) if self.rotary is not None else {}
        masks = attention_masks(self.config, hidden, position_ids, kinds)
        for layer, kind in zip(self.layers, self._kinds):
            hidden = call_decoder_layer(
                layer, hidden, attention_mask=masks[kind], position_ids=position_ids, position_embeddings=rope.get(kind)
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

    def forward(self, input_ids: torch.Tensor, hidden: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, predict_at: torch.Tensor | None = None,
                num_items: float | None = None) -> torch.Tensor:
        """The next-token loss if the segment has a head (summed over ``predict_at``, divided by ``num_items``: see
        :meth:`LMHead.next_token_loss`), else its output hidden states (B, T, H).

        ``position_ids`` (B, T): each token's position in its example (default: one sequence per block).
        """
        hidden = self.hidden_states(input_ids, hidden, position_ids)
        if self.head is None:
            return hidden
        return self.head.next_token_loss(hidden, input_ids, predict_at, num_items, self.loss_chunk_tokens)

    def hidden_states(self, input_ids: torch.Tensor, hidden: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The hidden states after the segment's layers (B, T, H), from token ids or the given input states."""
        if position_ids is None:
            position_ids = default_positions(input_ids)
        if self.embedder is not None:
            hidden = self.embedder(input_ids, position_ids)
        elif hidden is None:
            raise ValueError("a segment without embedder needs the input hidden states")
        return self.stack(hidden, position_ids)

    def logits(self, input_ids: torch.Tensor, hidden: torch.Tensor | None = None,
               position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V) of a segment with a head."""
        if self.head is None:
            raise ValueError("this segment has no LM head")
        return self.head(self.hidden_states(input_ids, hidden, position_ids))

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


def default_positions(input_ids: torch.Tensor) -> torch.Tensor:
    """Positions 0..T-1 in every row: one sequence per block."""
    batch, seq_len = input_ids.shape
    return torch.arange(seq_len, device=input_ids.device).expand(batch, seq_len)  # (B, T)
