"""Deterministic order of training blocks: the same seed gives the same batches everywhere.

Blocks are numbered ``0..num_blocks-1`` and stored in groups of ``group_size`` consecutive ids
(one Parquet row group each). An epoch shuffles the groups, deals them round-robin to the
data-parallel ranks, shuffles the rows inside each group, and cuts each rank's stream into
micro-batches; every rank gets the same number of micro-batches (the remainder is dropped),
so collectives never wait on a rank that ran out of data. Reading a group at a time keeps a
reader's memory bounded by one group, whatever the data set's size.

Padded examples (``data.packing: false``) are batched by length instead, as HF's ``group_by_length``
does: the tokenize job stores them sorted by length (longest first, in runs of
:data:`~segprop_ray.core.packing.PACK_WINDOW` examples), and ``by_length`` keeps that order inside every
unit: a micro-batch is ``batch_size`` consecutive blocks of it. The shuffled unit is then a *span*, the
fewest whole row groups that hold whole micro-batches (``lcm(group_size, batch_size)`` blocks), so no
micro-batch mixes two spans; an epoch shuffles the spans (HF's random megabatches) and deals them to the
ranks as groups are dealt. Where spans would be too few to deal (fewer than :data:`MIN_UNITS_PER_RANK`
per rank), the unit stays a row group, taken in stored order: only a micro-batch across the seam of two
groups then mixes lengths. Either way a rank's stream is its units one after another, cut every
``batch_size`` blocks, every row group is read once, whole, and every rank gets the same micro-batches
per epoch as with packed data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

MIN_UNITS_PER_RANK = 4
"""Spans (by length) are the shuffled unit only where every rank gets at least this many of them per epoch."""


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
        order = cls(num_blocks, group_size, args.per_device_train_batch_size, args.seed, data.shuffle, world_size,
                    rank, by_length=not data.packing)
        order.check()
        return order

    def __post_init__(self) -> None:
        if self.num_blocks < 1 or self.group_size < 1 or self.batch_size < 1:
            raise ValueError(f"invalid block order {self}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world of {self.world_size}")

    @property
    def unit_size(self) -> int:
        """Blocks per shuffled unit: a row group, or by length a span (whole groups holding whole micro-batches)
        where the data holds enough of them."""
        span = math.lcm(self.group_size, self.batch_size)
        if self.by_length and self.num_blocks // span >= MIN_UNITS_PER_RANK * self.world_size:
            return span
        return self.group_size

    @property
    def num_units(self) -> int:
        """Shuffled units (the last one may be short)."""
        return -(-self.num_blocks // self.unit_size)

    def units(self, unit: int) -> range:
        """Block ids in ``unit``."""
        start = unit * self.unit_size
        return range(start, min(start + self.unit_size, self.num_blocks))

    def batches_per_epoch(self) -> int:
        """Micro-batches every rank gets in every epoch: what a rank dealt the fewest units, the short last unit among
        them, holds (units are dealt anew each epoch, so that is the least any rank can get)."""
        units = self.num_units // self.world_size
        short = self.unit_size - len(self.units(self.num_units - 1)) if units else 0
        return (units * self.unit_size - short) // self.batch_size

    def check(self) -> None:
        """One-line ValueError when a rank would get no micro-batch in an epoch."""
        if self.batches_per_epoch() < 1:
            raise ValueError(
                f"{self.num_blocks} blocks in row groups of {self.group_size} cannot give each of {self.world_size} "
                f"data-parallel workers a micro-batch of {self.batch_size}: lower the workers, "
                "per_device_train_batch_size or snapcheck.rows_per_group, or add data")

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's micro-batches of block ids for ``epoch``."""
        self.check()
        stream = self._rank_stream(epoch, self.rank)
        return [stream[i * self.batch_size : (i + 1) * self.batch_size] for i in range(self.batches_per_epoch())]

    def _rank_stream(self, epoch: int, rank: int) -> list[int]:
        """The blocks of the units dealt to ``rank``, one unit after another: shuffled inside each unit, or by length
        in stored order (longest first)."""
        dealt = self._permutation(self.num_units, epoch, salt=0)[rank :: self.world_size]
        if self.by_length:  # the short last unit last, so the spans before it stay cut at micro-batch boundaries
            dealt.sort(key=lambda unit: unit == self.num_units - 1)
        stream: list[int] = []
        for unit in dealt:
            rows = list(self.units(unit))
            order = range(len(rows)) if self.by_length else self._permutation(len(rows), epoch, salt=1 + unit)
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
