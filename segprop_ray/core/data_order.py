"""Deterministic order of training blocks: the same seed gives the same batches everywhere.

Blocks are numbered ``0..num_blocks-1`` and stored in groups of ``group_size`` consecutive ids
(one Parquet row group each). An epoch shuffles the groups, deals them round-robin to the
data-parallel ranks, shuffles the rows inside each group, and cuts each rank's stream into
micro-batches; every rank gets the same number of micro-batches (the remainder is dropped),
so collectives never wait on a rank that ran out of data. Reading a group at a time keeps a
reader's memory bounded by one group, whatever the data set's size.

Padded examples (``data.packing: false``) are batched by length instead, as HF's ``group_by_length``
does: the tokenize job stores them sorted by length (longest first, in runs of
:data:`~segprop_ray.core.packing.PACK_WINDOW` examples), so ``by_length`` keeps that order inside a
micro-batch: a micro-batch is ``batch_size`` consecutive blocks, a *span* is the fewest whole row groups
that hold whole micro-batches (``lcm(group_size, batch_size)`` blocks), and an epoch shuffles the spans
(HF's random megabatches), deals them round-robin to the ranks and takes each span's micro-batches in
order, longest first (HF sorts each megabatch so). The reader still reads every row group once, whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

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
    by_length: bool = False
    """Micro-batches of consecutive blocks (padded examples stored sorted by length), spans shuffled."""

    @classmethod
    def for_training(cls, num_blocks: int, group_size: int, args: Any, data: Any, world_size: int = 1,
                     rank: int = 0) -> "BlockOrder":
        """The training order of a run: batch size and seed from the training settings ``args``, shuffling from the
        data settings ``data``, by length when ``data.packing`` is off (one padded example per block)."""
        return cls(num_blocks, group_size, args.per_device_train_batch_size, args.seed, data.shuffle, world_size,
                   rank, by_length=not data.packing)

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

    @property
    def unit_size(self) -> int:
        """Blocks per shuffled unit: a row group, or by length a span (whole groups holding whole micro-batches)."""
        return math.lcm(self.group_size, self.batch_size) if self.by_length else self.group_size

    @property
    def num_units(self) -> int:
        """Shuffled units: every row group, or by length the spans holding a whole micro-batch (a short last span with
        fewer blocks than a micro-batch is left out)."""
        short = self.num_blocks % self.unit_size
        if self.by_length:
            return self.num_blocks // self.unit_size + (short >= self.batch_size)
        return self.num_blocks // self.unit_size + bool(short)

    def batches_per_epoch(self) -> int:
        """Micro-batches every rank gets in every epoch: what a rank dealt the fewest units, the short last unit among
        them, holds (units are dealt anew each epoch, so that is the least any rank can get)."""
        units = self.num_units // self.world_size
        last = self.num_blocks - (self.num_units - 1) * self.unit_size  # blocks of the last unit dealt
        short = self.num_units * self.unit_size > self.num_blocks and units > 0
        if self.by_length:  # micro-batches never cross spans
            per_span = self.unit_size // self.batch_size
            return (units - short) * per_span + (last // self.batch_size if short else 0)
        return (units * self.unit_size - (self.unit_size - last if short else 0)) // self.batch_size

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's micro-batches of block ids for ``epoch``."""
        n = self.batches_per_epoch()
        if self.by_length:
            return self._span_batches(epoch, self.rank)[:n]
        stream = self._rank_stream(epoch, self.rank)
        return [stream[i * self.batch_size : (i + 1) * self.batch_size] for i in range(n)]

    def _span_batches(self, epoch: int, rank: int) -> list[list[int]]:
        """The micro-batches of the spans dealt to ``rank``: each span's consecutive blocks ``batch_size`` at a time,
        in block order (longest first), a short last span's remainder dropped."""
        batches = []
        for span in self._permutation(self.num_units, epoch, salt=0)[rank :: self.world_size]:
            start, stop = span * self.unit_size, min((span + 1) * self.unit_size, self.num_blocks)
            batches += [list(range(first, first + self.batch_size))
                        for first in range(start, stop - self.batch_size + 1, self.batch_size)]
        return batches

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


def sequential_batches(count: int, batch_size: int) -> list[list[int]]:
    """Blocks ``0..count-1`` in order, ``batch_size`` consecutive blocks at a time (the last may be short): how every
    evaluation reads its split, so padded examples stored sorted by length are batched with their like."""
    return [list(range(start, min(start + batch_size, count))) for start in range(0, count, batch_size)]


def _mix(seed: int, epoch: int, salt: int) -> int:
    """A 63-bit seed from (seed, epoch, salt); distinct inputs give distinct streams."""
    value = (seed * 1_000_003 + epoch) * 2_654_435_761 + salt
    return value % (2**63 - 1)


def default_group_size(seq_len: int, hidden_size: int, bytes_per_value: int, target_bytes: int = 64 << 20) -> int:
    """Blocks per row group so one group of activations is about ``target_bytes`` (at least 1)."""
    return max(1, target_bytes // (seq_len * hidden_size * bytes_per_value))
