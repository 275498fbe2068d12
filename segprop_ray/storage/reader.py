"""Streaming micro-batches out of committed shards, one row group at a time, in BlockOrder's exact order.

A rank's stream (:meth:`BlockOrder.epoch_batches`) visits each row group's rows consecutively, so the
reader needs one group at a time; a background thread reads the groups and assembles the batches
(into page-locked memory with ``pin_memory``, for asynchronous copies to a GPU) while the trainer works
on the current one (bounded queue: about ``prefetch_groups`` groups' worth of batches ahead).
``skip_batches=k`` resumes mid-epoch without reading the groups the first ``k`` batches consumed.
:class:`ReadStats` records how long the consumer waited on reads; file footers are read once per
process (:class:`FooterCache`).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from segprop_ray.core.data_order import BlockOrder
from segprop_ray.storage.errors import StorageError
from segprop_ray.storage.layout import RunLayout
from segprop_ray.storage.shards import ShardFooter, read_footer, read_row_group
from segprop_ray.storage.snapcheck import CommitMarker

Batch = dict[str, torch.Tensor]


@dataclass
class ReadStats:
    """Where a reader's time went."""

    wait_seconds: float = 0.0
    """Time the consumer spent blocked waiting for a row group (the trainer's "waiting on shard reads")."""
    read_seconds: float = 0.0
    """Time the background thread spent reading row groups."""
    groups_read: int = 0
    """Row groups read."""
    bytes_read: int = 0
    """Bytes of tensors produced from the row groups read."""

    def wait_share(self, elapsed_seconds: float) -> float:
        """Share of ``elapsed_seconds`` spent waiting on reads (0..1)."""
        return 0.0 if elapsed_seconds <= 0 else min(1.0, self.wait_seconds / elapsed_seconds)


class ShardBatchReader:
    """Iterates ``batches`` (lists of block ids) of a committed depth as dicts of tensors:
    ``{"block_id": (B,) int64, "input_ids": (B, T) int64, "hidden": (B, T, H) bf16|fp32}``.

    Each row group's rows must be consecutive across ``batches`` (true for :class:`BlockOrder` streams).
    Batches may be views of the row group's read buffer: treat them as read-only (``.to(device)`` copies).
    Iterate once; build a new reader for another pass.
    """

    def __init__(self, layout: RunLayout, marker: CommitMarker, batches: Sequence[Sequence[int]],
                 prefetch_groups: int = 1, with_hidden: bool = True, pin_memory: bool = False) -> None:
        self.layout, self.marker, self.batches = layout, marker, [list(batch) for batch in batches]
        self.prefetch_groups, self.with_hidden = max(1, prefetch_groups), with_hidden
        self.pin_memory = pin_memory
        _check_groups_consecutive(self.batches, marker.spec.group_size)
        self.stats = ReadStats()
        if any(block < 0 or block >= marker.total_rows for batch in self.batches for block in batch):
            raise ValueError(f"batches name block ids outside 0..{marker.total_rows - 1}")

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Batch]:
        if not self.batches:
            return
        per_group = -(-self.marker.spec.group_size // max(len(self.batches[0]), 1))  # batches one group feeds
        depth = max(2, self.prefetch_groups * per_group)
        prefetcher = _Prefetcher(self._assembled_batches(), depth, self.stats)
        try:
            for _ in self.batches:
                yield prefetcher.next()
        finally:
            prefetcher.close()

    def _assembled_batches(self) -> Iterator[Batch]:
        """The batches, built on the prefetch thread: row groups read as needed, rows gathered (pinned if asked)."""
        group_size = self.marker.spec.group_size
        loaded: dict[int, Batch] = {}
        for batch in self.batches:
            pieces = []
            for group, blocks in _runs_by_group(batch, group_size):
                if group not in loaded:
                    loaded = {group: self._timed_load(group)}  # the previous group is fully consumed
                rows = [block - group * group_size for block in blocks]
                pieces.append(_take_rows(loaded[group], rows, self.pin_memory))
            yield pieces[0] if len(pieces) == 1 else {key: _concat([p[key] for p in pieces], self.pin_memory)
                                                      for key in pieces[0]}

    def _timed_load(self, group: int) -> Batch:
        start = time.perf_counter()
        rows = self._load_group(group)
        self.stats.read_seconds += time.perf_counter() - start
        self.stats.groups_read += 1
        self.stats.bytes_read += sum(t.numel() * t.element_size() for t in rows.values())
        return rows

    def _load_group(self, group: int) -> Batch:
        spec, marker = self.marker.spec, self.marker
        file_index, group_in_file = divmod(group, spec.groups_per_file)
        path = self.layout.shard_file(marker.split, marker.depth, file_index)
        footer = FOOTERS.get(self.layout, path, marker.files[file_index].sha256)
        rows = read_row_group(self.layout.fs, path, group_in_file, spec, self.with_hidden, footer)
        expected = torch.arange(group * spec.group_size, min((group + 1) * spec.group_size, marker.total_rows))
        if not torch.equal(rows["block_id"], expected):
            raise StorageError(f"{path}: row group {group_in_file} does not hold blocks {expected[0]}..{expected[-1]}")
        return rows


class FooterCache:
    """Shard footers by (file URI, sha256), shared by the readers of a process.

    A reader is built per epoch and per evaluation; without this each would fetch every file's
    footer again (on S3, one more round trip per file and pass). The key holds the content hash
    from the commit marker, so a regenerated file is never served a stale footer.
    """

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[tuple[str, str], ShardFooter] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, layout: RunLayout, path: str, sha256: str) -> ShardFooter:
        """The footer of ``path`` (content ``sha256``), read on first use."""
        key = (layout.uri(path), sha256)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
        footer = read_footer(layout.fs, path)
        with self._lock:
            self._entries[key] = footer
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        return footer


FOOTERS = FooterCache()


def epoch_reader(layout: RunLayout, marker: CommitMarker, order: BlockOrder, epoch: int, skip_batches: int = 0,
                 prefetch_groups: int = 1, with_hidden: bool = True, pin_memory: bool = False) -> ShardBatchReader:
    """This rank's micro-batches of ``epoch`` in exactly ``order.epoch_batches(epoch)`` order, from batch
    ``skip_batches`` on (the row groups only the skipped batches used are not read)."""
    if order.group_size != marker.spec.group_size:
        raise ValueError(f"BlockOrder groups of {order.group_size} blocks, shards have {marker.spec.group_size}")
    if order.num_blocks > marker.total_rows:
        raise ValueError(f"BlockOrder has {order.num_blocks} blocks, the shards only {marker.total_rows}")
    batches = order.epoch_batches(epoch)
    if not 0 <= skip_batches <= len(batches):
        raise ValueError(f"skip_batches={skip_batches} outside 0..{len(batches)}")
    return ShardBatchReader(layout, marker, batches[skip_batches:], prefetch_groups, with_hidden, pin_memory)


def sequential_reader(layout: RunLayout, marker: CommitMarker, batch_size: int, prefetch_groups: int = 1,
                      with_hidden: bool = True) -> ShardBatchReader:
    """All rows of a committed depth in block-id order, ``batch_size`` at a time (the last batch may be short)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    blocks = list(range(marker.total_rows))
    batches = [blocks[start : start + batch_size] for start in range(0, len(blocks), batch_size)]
    return ShardBatchReader(layout, marker, batches, prefetch_groups, with_hidden)


def _take_rows(group: Batch, rows: list[int], pin_memory: bool = False) -> Batch:
    """Rows of a loaded group: a view when they are one ascending range (and no pinning), else a gather (copy),
    into page-locked memory with ``pin_memory`` so the trainer's host-to-GPU copy runs asynchronously."""
    if not pin_memory and rows == list(range(rows[0], rows[0] + len(rows))):
        return {key: value[rows[0] : rows[0] + len(rows)] for key, value in group.items()}  # (b, ...) view
    index = torch.tensor(rows)  # (b,) int64
    return {key: _gather(value, index, pin_memory) for key, value in group.items()}  # (b, ...) copy


def _concat(parts: list[torch.Tensor], pin_memory: bool) -> torch.Tensor:
    """Rows of two groups as one batch, kept in page-locked memory when asked."""
    if not pin_memory:
        return torch.cat(parts)
    out = torch.empty((sum(len(p) for p in parts), *parts[0].shape[1:]), dtype=parts[0].dtype, pin_memory=True)
    return torch.cat(parts, out=out)  # (b, ...)


def _gather(value: torch.Tensor, index: torch.Tensor, pin_memory: bool) -> torch.Tensor:
    if not pin_memory:
        return value.index_select(0, index)
    out = torch.empty((len(index), *value.shape[1:]), dtype=value.dtype, pin_memory=True)
    return torch.index_select(value, 0, index, out=out)


def _runs_by_group(blocks: Sequence[int], group_size: int) -> list[tuple[int, list[int]]]:
    """Split consecutive block ids into runs of the same row group: ``[(group, [ids...]), ...]``."""
    runs: list[tuple[int, list[int]]] = []
    for block in blocks:
        group = block // group_size
        if runs and runs[-1][0] == group:
            runs[-1][1].append(block)
        else:
            runs.append((group, [block]))
    return runs


def _check_groups_consecutive(batches: Sequence[Sequence[int]], group_size: int) -> None:
    """The reader holds one row group at a time: each group must be needed in one consecutive stretch."""
    stream = [block for batch in batches for block in batch]
    groups = [group for group, _ in _runs_by_group(stream, group_size)]
    if len(set(groups)) != len(groups):
        raise ValueError("batches revisit a row group after leaving it; the reader needs each group's rows together")


class _Prefetcher:
    """Runs an iterator of batches on a background thread into a bounded queue (``depth`` batches ahead)."""

    def __init__(self, items: Iterator[Batch], depth: int, stats: ReadStats) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._stats = stats
        self._thread = threading.Thread(target=self._run, args=(items,), name="segprop-shard-prefetch", daemon=True)
        self._thread.start()

    def _run(self, items: Iterator[Batch]) -> None:
        try:
            for item in items:
                if not self._put((item, None)):
                    return
        except BaseException as error:  # noqa: BLE001 - re-raised in the consumer
            self._put((None, error))

    def _put(self, item: tuple) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def next(self) -> Batch:
        """The next batch (blocking; the wait is added to the stats)."""
        start = time.perf_counter()
        batch, error = self._queue.get()
        self._stats.wait_seconds += time.perf_counter() - start
        if error is not None:
            raise error
        return batch

    def close(self) -> None:
        """Stop the thread (it finishes the batch it is building) and drop queued batches."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get_nowait()
            except queue.Empty:
                self._thread.join(0.05)
