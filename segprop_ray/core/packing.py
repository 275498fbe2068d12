"""Packing tokenized documents into fixed-length blocks, and the deterministic eval hold-out."""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

_GOLDEN = 0x9E3779B1  # 2^32 / golden ratio: consecutive blocks spread evenly over [0, 1)


class BlockPacker:
    """Concatenates documents (each already ending in EOS) and cuts the stream into ``seq_len`` blocks.

    The tail shorter than a block is dropped at the end, as Hugging Face's ``group_texts`` does.
    """

    def __init__(self, seq_len: int, carry: list[int] | None = None):
        self.seq_len = seq_len
        self._pending: list[int] = list(carry or [])

    @property
    def carry(self) -> list[int]:
        """The tokens after the last full block (fewer than ``seq_len``): what a restarted packer starts from."""
        return list(self._pending)

    def add(self, documents: Iterable[list[int]]) -> Iterator[torch.Tensor]:
        """Feed token lists; yields every block (T,) int64 completed so far."""
        for tokens in documents:
            self._pending.extend(tokens)
            while len(self._pending) >= self.seq_len:
                block, self._pending = self._pending[: self.seq_len], self._pending[self.seq_len :]
                yield torch.tensor(block, dtype=torch.int64)  # (T,)


def is_held_out(block_index: int, fraction: float) -> bool:
    """Whether block ``block_index`` of a stream goes to evaluation when ``fraction`` of blocks is held out.

    Deterministic and evenly spread (a golden-ratio sequence), so any prefix of the stream holds out
    about ``fraction`` of its blocks and the choice never depends on how many blocks follow.
    """
    return ((block_index * _GOLDEN) % (1 << 32)) / (1 << 32) < fraction
