"""Streaming micro-batches out of committed shards, one row group at a time, in BlockOrder's exact order.

A rank's stream (:meth:`BlockOrder.epoch_batches`) visits each row group's rows consecutively, so the
reader needs one group at a time and knows, before it starts, which groups it needs and in which order it
will take each group's rows. ``read_threads`` threads read the next ``prefetch_groups`` groups ahead of the
trainer, each group's rows straight into a tensor in the order the batches take them
(:func:`~segprop_ray.storage.shard_rows.read_rows`; page-locked with ``pin_memory``, for asynchronous copies to
a GPU), so a batch inside one group is a slice of it and costs no copy; only a batch that spans two groups is
put together. Batches come out in exactly the order of ``batches`` whatever the number of threads.
``skip_batches=k`` resumes mid-epoch without reading the groups the first ``k`` batches consumed.
:class:`ReadStats` records how long the consumer waited on reads; file footers are read once per process
(:class:`FooterCache`).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from segprop_ray.core.data_order import BlockOrder
from segprop_ray.storage.errors import StorageError
from segprop_ray.storage.layout import RunLayout
from segprop_ray.storage.shard_rows import read_rows
from segprop_ray.storage.shards import ShardFooter, read_footer
from segprop_ray.storage.snapcheck import CommitMarker

Batch = dict[str, torch.Tensor]
_STATS_LOCK = threading.Lock()
THREAD_PREFIX = "segprop-shard-prefetch"
"""Name prefix of the reader's threads."""


@dataclass
class ReadStats:
    """Where a reader's time went."""

    wait_seconds: float = 0.0
    """Time the consumer spent blocked waiting for a row group (the trainer's "waiting on shard reads")."""
    read_seconds: float = 0.0
    """Time the reading threads spent reading row groups (summed over the threads)."""
    groups_read: int = 0
    """Row groups read."""
    bytes_read: int = 0
    """Bytes of tensors produced from the row groups read."""

    def add_read(self, seconds: float, nbytes: int) -> None:
        """Count one row group read in ``seconds`` producing ``nbytes`` of tensors (thread-safe)."""
        with _STATS_LOCK:
            self.read_seconds += seconds
            self.groups_read += 1
            self.bytes_read += nbytes

    def wait_share(self, elapsed_seconds: float) -> float:
        """Share of ``elapsed_seconds`` spent waiting on reads (0..1)."""
        return 0.0 if elapsed_seconds <= 0 else min(1.0, self.wait_seconds / elapsed_seconds)


class ShardBatchReader:
    """Iterates ``batches`` (lists of block ids) of a committed depth as dicts of tensors:
    ``{"block_id": (B,) int64, "input_ids": (B, T) int64, "position_ids": (B, T) int64, "token_kind": (B, T) uint8,
    "hidden": (B, T, H) bf16|fp32}``.

    Each row group's rows must be consecutive across ``batches`` (true for :class:`BlockOrder` streams).
    Batches may be views of a row group's read buffer: treat them as read-only (``.to(device)`` copies).
    ``read_threads`` threads read up to ``prefetch_groups`` groups ahead; ``pin_memory`` (CUDA only) reads
    into page-locked memory. Iterate once; build a new reader for another pass.
    """

    def __init__(self, layout: RunLayout, marker: CommitMarker, batches: Sequence[Sequence[int]],
                 prefetch_groups: int = 2, with_hidden: bool = True, pin_memory: bool = False,
                 read_threads: int = 1) -> None:
        self.layout, self.marker, self.batches = layout, marker, [list(batch) for batch in batches]
        self.prefetch_groups, self.with_hidden = max(1, prefetch_groups), with_hidden
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.read_threads = max(1, read_threads)
        self.stats = ReadStats()
        if any(block < 0 or block >= marker.total_rows for batch in self.batches for block in batch):
            raise ValueError(f"batches name block ids outside 0..{marker.total_rows - 1}")
        stream = [block for batch in self.batches for block in batch]
        self.runs = _runs_by_group(stream, marker.spec.group_size)  # [(group, its block ids in stream order)]
        if len({group for group, _ in self.runs}) != len(self.runs):
            raise ValueError("batches revisit a row group after leaving it; the reader needs each group's rows together")

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Batch]:
        if not self.batches:
            return
        pool = ThreadPoolExecutor(self.read_threads, thread_name_prefix=THREAD_PREFIX)
        ahead: deque[Future] = deque()
        try:
            groups = iter(self.runs)
            current, used = None, 0  # the group being sliced, and how many of its rows are taken
            for batch in self.batches:
                pieces, need = [], len(batch)
                while need:
                    while len(ahead) <= self.prefetch_groups and (run := next(groups, None)) is not None:
                        ahead.append(pool.submit(self._timed_load, *run))
                    if current is None or used == len(current["block_id"]):
                        current, used = self._wait(ahead.popleft()), 0
                    take = min(need, len(current["block_id"]) - used)
                    pieces.append({key: value[used : used + take] for key, value in current.items()})  # (take, ...)
                    used, need = used + take, need - take
                yield pieces[0] if len(pieces) == 1 else {key: _concat([p[key] for p in pieces], self.pin_memory)
                                                          for key in pieces[0]}
        finally:
            for future in ahead:
                future.cancel()
            pool.shutdown(wait=True)

    def _wait(self, future: Future) -> Batch:
        start = time.perf_counter()
        try:
            return future.result()
        finally:
            self.stats.wait_seconds += time.perf_counter() - start

    def _timed_load(self, group: int, blocks: list[int]) -> Batch:
        start = time.perf_counter()
        rows = self._load_group(group, blocks)
        self.stats.add_read(time.perf_counter() - start, sum(t.numel() * t.element_size() for t in rows.values()))
        return rows

    def _load_group(self, group: int, blocks: list[int]) -> Batch:
        """Row group ``group``'s rows ``blocks`` (block ids), in that order, checked against the file's block ids."""
        spec, marker = self.marker.spec, self.marker
        file_index, group_in_file = divmod(group, spec.groups_per_file)
        path = self.layout.shard_file(marker.split, marker.depth, file_index)
        footer = FOOTERS.get(self.layout, path, marker.files[file_index].sha256)
        rows = read_rows(self.layout.fs, path, group_in_file, spec, footer, [b - group * spec.group_size for b in blocks],
                         self.with_hidden, self.pin_memory)
        if rows["block_id"].tolist() != blocks:
            raise StorageError(f"{path}: row group {group_in_file} does not hold blocks {blocks[0]}..{blocks[-1]} "
                               "where the marker says")
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
                 prefetch_groups: int = 2, with_hidden: bool = True, pin_memory: bool = False,
                 read_threads: int = 1) -> ShardBatchReader:
    """This rank's micro-batches of ``epoch`` in exactly ``order.epoch_batches(epoch)`` order, from batch
    ``skip_batches`` on (the row groups only the skipped batches used are not read)."""
    if order.group_size != marker.spec.group_size:
        raise ValueError(f"BlockOrder groups of {order.group_size} blocks, shards have {marker.spec.group_size}")
    if order.num_blocks > marker.total_rows:
        raise ValueError(f"BlockOrder has {order.num_blocks} blocks, the shards only {marker.total_rows}")
    batches = order.epoch_batches(epoch)
    if not 0 <= skip_batches <= len(batches):
        raise ValueError(f"skip_batches={skip_batches} outside 0..{len(batches)}")
    return ShardBatchReader(layout, marker, batches[skip_batches:], prefetch_groups, with_hidden, pin_memory,
                            read_threads)


def sequential_reader(layout: RunLayout, marker: CommitMarker, batch_size: int, prefetch_groups: int = 2,
                      with_hidden: bool = True, read_threads: int = 1) -> ShardBatchReader:
    """All rows of a committed depth in block-id order, ``batch_size`` at a time (the last batch may be short)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    blocks = list(range(marker.total_rows))
    batches = [blocks[start : start + batch_size] for start in range(0, len(blocks), batch_size)]
    return ShardBatchReader(layout, marker, batches, prefetch_groups, with_hidden, read_threads=read_threads)


def _concat(parts: list[torch.Tensor], pin_memory: bool) -> torch.Tensor:
    """Rows of two groups as one batch, kept in page-locked memory when asked."""
    if not pin_memory:
        return torch.cat(parts)
    out = torch.empty((sum(len(p) for p in parts), *parts[0].shape[1:]), dtype=parts[0].dtype, pin_memory=True)
    return torch.cat(parts, out=out)  # (b, ...)


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
