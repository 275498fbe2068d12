"""Token blocks with their per-example structure: ids, positions, and which tokens carry the loss.

A block is ``seq_len`` tokens. It holds one text stream cut to length (``text`` data), whole examples
packed one after another, or one example padded at the end. Three rows of ``seq_len`` values describe it:

- ``input_ids``: the tokens;
- ``position_ids``: each token's position in its own example, restarting at 0 where an example starts
  (padding continues the last example's positions, so it belongs to no new example). This is exactly
  what transformers reads to build a block-diagonal causal mask for packed examples
  (``masking_utils.find_packed_sequence_indices``), and what rotary / learned position embeddings take;
- ``token_kind``: :data:`PAD` (padding), :data:`CONTEXT` (seen, never predicted: prompts, and the
  first token of every example) or :data:`TARGET` (carries loss, as a label that is not -100 in HF).

The loss at position t predicts token t+1 and counts when token t+1 is a TARGET: since an example's
first token is never a TARGET, no label crosses from one example to the next.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PAD, CONTEXT, TARGET = 0, 1, 2
Batch = dict[str, torch.Tensor]


@dataclass
class TokenBlocks:
    """``N`` blocks of ``T`` tokens (what the token shards of a split hold)."""

    input_ids: torch.Tensor
    """(N, T) int64 token ids."""
    position_ids: torch.Tensor
    """(N, T) int64 positions within each token's example."""
    token_kind: torch.Tensor
    """(N, T) uint8: PAD, CONTEXT or TARGET."""

    @classmethod
    def of_text(cls, input_ids: torch.Tensor) -> "TokenBlocks":
        """Blocks cut from a text stream: one sequence per block, every token a target."""
        n, t = input_ids.shape
        positions = torch.arange(t, dtype=torch.int64).expand(n, t).clone()  # (N, T)
        return cls(input_ids, positions, torch.full((n, t), TARGET, dtype=torch.uint8))

    def __len__(self) -> int:
        return len(self.input_ids)

    def span(self, start: int, stop: int) -> "TokenBlocks":
        """Blocks ``start..stop-1`` (views)."""
        return TokenBlocks(self.input_ids[start:stop], self.position_ids[start:stop], self.token_kind[start:stop])

    def rows(self, index: list[int] | torch.Tensor) -> Batch:
        """The blocks at ``index`` as a batch (copies)."""
        index = torch.as_tensor(index, dtype=torch.int64)
        return {"input_ids": self.input_ids[index], "position_ids": self.position_ids[index],
                "token_kind": self.token_kind[index]}


def prediction_index(token_kind: torch.Tensor) -> torch.Tensor:
    """Flat indices ``b * T + t`` (into the (B*T) flattening) of the positions t whose next token is a target."""
    _, t = token_kind.shape
    rows, cols = (token_kind[:, 1:] == TARGET).nonzero(as_tuple=True)  # next token t+1 carries loss
    return rows * t + cols  # (N,) int64


def all_positions_index(batch: int, seq_len: int, device: torch.device | None = None) -> torch.Tensor:
    """The prediction index when every token is a target: all positions but each block's last."""
    grid = torch.arange(batch * seq_len, device=device).view(batch, seq_len)  # (B, T)
    return grid[:, :-1].reshape(-1)  # (B*(T-1),)


def count_targets(token_kind: torch.Tensor) -> int:
    """Tokens that carry loss in a batch (the first column is never predicted)."""
    return int((token_kind[:, 1:] == TARGET).sum())


def trim_padding(batch: Batch) -> Batch:
    """The batch cut to its longest example when every row ends in padding (one padded example per row):
    padding after the last real token changes nothing before it, so the cut is exact and saves compute."""
    kinds = batch.get("token_kind")
    if kinds is None:
        return batch
    real = (kinds != PAD).any(dim=0)  # (T,)
    length = int(real.nonzero().max()) + 1 if bool(real.any()) else 1
    if length == kinds.shape[1]:
        return batch
    return {key: value[:, :length] if value.dim() >= 2 else value for key, value in batch.items()}
