"""Turning tokenized examples into fixed-length blocks, and the deterministic eval hold-out.

Three packers, one per ``(data.format, data.packing)`` kind (see :data:`PACKERS`), all with the same
interface: :meth:`add` takes examples and yields the blocks completed so far, :meth:`finish` yields
what is left, and :attr:`carry` is what a packer restarted between two input files must be given back
(with :attr:`stats`) to cut exactly the blocks an uninterrupted one cuts.

- :class:`StreamPacker` (``text``, packing on): documents concatenated and cut into ``seq_len`` blocks,
  one sequence per block, as Hugging Face's ``group_texts`` does; the tail shorter than a block is dropped.
- :class:`ExamplePacker` (examples, packing on): whole examples packed into blocks by best-fit decreasing
  over windows of :data:`PACK_WINDOW` examples (TRL's ``bfd`` strategy), each keeping its own positions;
  the rest of a block is padding.
- :class:`RowPacker` (packing off): one example per block, padded, in runs of similar length (each window
  sorted by length, longest first), so micro-batches hold examples of similar length as HF's
  ``group_by_length`` arranges them and can be cut to their longest example.

An example longer than ``seq_len`` is truncated to its first ``seq_len`` tokens, never split; one left
without a target token is dropped. Both are counted in :attr:`stats`.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Iterable, Iterator

from segprop_ray.core.blocks import PAD, TARGET

_GOLDEN = 0x9E3779B1  # 2^32 / golden ratio: consecutive blocks spread evenly over [0, 1)
PACK_WINDOW = 1000
"""Examples sorted and packed together (ExamplePacker) or sorted by length together (RowPacker)."""


@dataclass
class Example:
    """One tokenized example: its token ids and each token's kind (CONTEXT or TARGET)."""

    ids: list[int]
    kinds: list[int]

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Block:
    """One block of ``seq_len`` tokens: ids, positions within each example, token kinds."""

    ids: list[int]
    positions: list[int]
    kinds: list[int]


@dataclass
class PackStats:
    """What a packer did to the examples it was given."""

    examples: int = 0
    """Examples given."""
    truncated: int = 0
    """Examples longer than ``seq_len``, cut to their first ``seq_len`` tokens."""
    dropped: int = 0
    """Examples with no target token left within ``seq_len`` (not packed)."""

    def to_dict(self) -> dict[str, int]:
        """JSON-able counts."""
        return {"examples": self.examples, "truncated": self.truncated, "dropped": self.dropped}


class _Packer:
    """Shared parts: truncation, counting, padding, and the carry of buffered examples."""

    def __init__(self, seq_len: int, pad_id: int, carry: list[Example] | None = None,
                 stats: PackStats | None = None):
        self.seq_len, self.pad_id = seq_len, pad_id
        self._pending: list[Example] = list(carry or [])
        self.stats = stats or PackStats()

    @property
    def carry(self) -> list[Example]:
        """The examples taken but not yet in a block."""
        return list(self._pending)

    def _fit(self, example: Example) -> Example | None:
        """``example`` cut to ``seq_len`` (counted), or None when no target token is left (counted)."""
        self.stats.examples += 1
        if len(example) > self.seq_len:
            self.stats.truncated += 1
            example = Example(example.ids[: self.seq_len], example.kinds[: self.seq_len])
        if TARGET not in example.kinds[1:]:
            self.stats.dropped += 1
            return None
        return example

    def _block(self, examples: list[Example]) -> Block:
        """Examples one after another, each with positions from 0, then padding to ``seq_len``."""
        ids, positions, kinds = [], [], []
        for example in examples:
            ids += example.ids
            positions += range(len(example))
            kinds += example.kinds
        pad = self.seq_len - len(ids)
        last = positions[-1] + 1 if positions else 0
        return Block(ids + [self.pad_id] * pad, positions + list(range(last, last + pad)), kinds + [PAD] * pad)

    def finish(self) -> Iterator[Block]:
        """The blocks of the examples still buffered."""
        yield from self._flush()

    def _flush(self) -> Iterator[Block]:
        raise NotImplementedError


class StreamPacker(_Packer):
    """Documents concatenated and cut into blocks of ``seq_len`` (the carry: the tokens after the last cut)."""

    def add(self, examples: Iterable[Example]) -> Iterator[Block]:
        """Feed documents; yields every block completed so far."""
        tail = self._pending[0] if self._pending else Example([], [])
        for example in examples:
            self.stats.examples += 1
            ids, kinds, start = tail.ids + example.ids, tail.kinds + example.kinds, 0
            while len(ids) - start >= self.seq_len:
                end = start + self.seq_len
                yield Block(ids[start:end], list(range(self.seq_len)), kinds[start:end])
                start = end
            tail = Example(ids[start:], kinds[start:])
        self._pending = [tail] if len(tail) else []

    def _flush(self) -> Iterator[Block]:
        self._pending = []  # the short tail is dropped, as group_texts does
        return iter(())


class ExamplePacker(_Packer):
    """Whole examples packed by best-fit decreasing, a window of :data:`PACK_WINDOW` examples at a time."""

    def add(self, examples: Iterable[Example]) -> Iterator[Block]:
        """Feed examples; yields the blocks of every full window."""
        for example in examples:
            fitted = self._fit(example)
            if fitted is None:
                continue
            self._pending.append(fitted)
            if len(self._pending) == PACK_WINDOW:
                yield from self._flush()

    def _flush(self) -> Iterator[Block]:
        window, self._pending = self._pending, []
        for members in best_fit_decreasing([len(e) for e in window], self.seq_len):
            yield self._block([window[i] for i in members])


class RowPacker(_Packer):
    """One example per block, padded; each window's examples longest first (similar lengths side by side)."""

    def add(self, examples: Iterable[Example]) -> Iterator[Block]:
        """Feed examples; yields the rows of every full window."""
        for example in examples:
            fitted = self._fit(example)
            if fitted is not None:
                self._pending.append(fitted)
                if len(self._pending) == PACK_WINDOW:
                    yield from self._flush()

    def _flush(self) -> Iterator[Block]:
        window, self._pending = self._pending, []
        for index in sorted(range(len(window)), key=lambda i: (-len(window[i]), i)):
            yield self._block([window[index]])


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of item indices: items by decreasing length (ties in input order), each into the fullest bin it
    still fits in, else a new bin. Bins in the order they were opened, items in the order they were placed."""
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (space left, bin index)
    for item in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        at = bisect.bisect_left(free, (lengths[item], -1))
        if at < len(free):
            space, index = free.pop(at)
        else:
            space, index = capacity, len(bins)
            bins.append([])
        bins[index].append(item)
        if space - lengths[item] > 0:
            bisect.insort(free, (space - lengths[item], index))
    return bins


PACKERS: dict[str, type[_Packer]] = {"stream": StreamPacker, "examples": ExamplePacker, "rows": RowPacker}
"""Packer by kind: ``stream`` (text, packing on), ``examples`` (examples, packing on), ``rows`` (packing off)."""


def packer_kind(data_format: str, packing: bool) -> str:
    """Which packer a data format uses."""
    if not packing:
        return "rows"
    return "stream" if data_format == "text" else "examples"


def is_held_out(block_index: int, fraction: float) -> bool:
    """Whether block ``block_index`` of a stream goes to evaluation when ``fraction`` of blocks is held out.

    Deterministic and evenly spread (a golden-ratio sequence), so any prefix of the stream holds out
    about ``fraction`` of its blocks and the choice never depends on how many blocks follow.
    """
    return ((block_index * _GOLDEN) % (1 << 32)) / (1 << 32) < fraction
