"""Deterministic order of training blocks: the same seed gives the same batches everywhere.

Blocks are numbered ``0..num_blocks-1`` and stored in groups of ``group_size`` consecutive ids
(one Parquet row group each). An epoch shuffles the groups, deals them round-robin to the
data-parallel ranks, shuffles the rows inside each group, and cuts each rank's stream into
micro-batches; every rank gets the same number of micro-batches (the remainder is dropped),
so collectives never wait on a rank that ran out of data. Reading a group at a time keeps a
reader's memory bounded by one group, whatever the data set's size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BlockOrder:
    """How one rank walks the blocks of one split."""

    num_blocks: int
    group_size: int
    batch_size: int
    seed: int
    shuffle: bool = True
    world_size: int = 1
    rank: int = 0

    def __post_init__(self) -> None:
        if self.num_blocks < 1 or self.group_size < 1 or self.batch_size < 1:
            raise ValueError(f"invalid block order {self}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world of {self.world_size}")

    @property
    def num_groups(self) -> int:
        """Groups of consecutive block ids (the last one may be short)."""
        return -(-self.num_blocks // self.group_size)

    def group_rows(self, group: int) -> range:
        """Block ids in ``group``."""
        start = group * self.group_size
        return range(start, min(start + self.group_size, self.num_blocks))

    def batches_per_epoch(self) -> int:
        """Micro-batches every rank gets per epoch (the minimum over ranks)."""
        return min(len(self._rank_stream(0, rank)) for rank in range(self.world_size)) // self.batch_size

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's micro-batches of block ids for ``epoch``."""
        stream = self._rank_stream(epoch, self.rank)
        n = self.batches_per_epoch()
        return [stream[i * self.batch_size : (i + 1) * self.batch_size] for i in range(n)]

    def _rank_stream(self, epoch: int, rank: int) -> list[int]:
        groups = self._permutation(self.num_groups, epoch, salt=0)
        stream: list[int] = []
        for group in groups[rank :: self.world_size]:
            rows = list(self.group_rows(group))
            order = self._permutation(len(rows), epoch, salt=1 + group)
            stream.extend(rows[i] for i in order)
        return stream

    def _permutation(self, n: int, epoch: int, salt: int) -> list[int]:
        if not self.shuffle:
            return list(range(n))
        gen = torch.Generator().manual_seed(_mix(self.seed, epoch, salt))
        return torch.randperm(n, generator=gen).tolist()


def _mix(seed: int, epoch: int, salt: int) -> int:
    """A 63-bit seed from (seed, epoch, salt); distinct inputs give distinct streams."""
    value = (seed * 1_000_003 + epoch) * 2_654_435_761 + salt
    return value % (2**63 - 1)


def default_group_size(seq_len: int, hidden_size: int, bytes_per_value: int, target_bytes: int = 64 << 20) -> int:
    """Blocks per row group so one group of activations is about ``target_bytes`` (at least 1)."""
    return max(1, target_bytes // (seq_len * hidden_size * bytes_per_value))
