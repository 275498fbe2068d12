"""Packing a stream of tokenized examples into the token shards of both splits, resumable between input files.

The examples come in input order, each tagged with the index of its input file. The packer of the data
format (:mod:`segprop_ray.core.packing`) turns them into blocks; each block goes to the eval split if it
is held out (when no separate eval data is given), else to train, and each split writes a token shard file
every ``rows_per_file`` blocks. When the stream moves on to a new input file, the whole position (next
file, packer carry and counts, blocks cut, files written, blocks waiting for a file) is saved at most
every ``save_every_s`` seconds (see :mod:`segprop_ray.storage.tokenize_state`); a job started again reads
only the files from there on. Same inputs, same blocks, same bytes: a resumed job writes exactly the files
an uninterrupted one does.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable, Iterator

import numpy as np
import torch

from segprop_ray.config.schema import DataConfig
from segprop_ray.core.blocks import TokenBlocks
from segprop_ray.core.packing import PACKERS, Block, Example, PackStats, is_held_out, packer_kind
from segprop_ray.storage.errors import StorageError
from segprop_ray.storage.layout import RunLayout
from segprop_ray.storage.shard_format import ShardSpec
from segprop_ray.storage.shards import write_token_file
from segprop_ray.storage.tokenize_state import SplitProgress, TokenizeState, save_state

log = logging.getLogger(__name__)

FAIL_ENV = "SEGPROP_TEST_FAIL_TOKENIZE_AT"
"""Testing hook: ``"<stream>:<file index>"`` fails the job when that stream reaches that input file (after saving)."""

SAVE_EVERY_S = 30.0
"""Least time between two saves of the position (each writes the blocks waiting for a file, up to one file a split)."""

Documents = Callable[[list[str], int], Iterator[tuple[int, Example]]]
"""``documents(files, start)``: the examples of ``files[start:]`` in order, each with its file's index."""

InputFileCallback = Callable[[dict[str, int], dict[str, int]], None]
"""``on_input_file(done, total)``: input files consumed and input files, per stream (``train``, ``eval``)."""


class TokenShardSink:
    """One split's output: takes blocks until its limit and writes a token shard file every ``rows_per_file``."""

    def __init__(self, layout: RunLayout, split: str, spec: ShardSpec, limit: int | None, progress: SplitProgress):
        self.layout, self.split, self.spec, self.limit, self.progress = layout, split, spec, limit, progress

    @property
    def full(self) -> bool:
        """Whether the split has all the blocks it may take."""
        return self.limit is not None and self.progress.count >= self.limit

    def add(self, block: Block) -> None:
        """Take one block unless full; write a file when one is complete."""
        if self.full:
            return
        self.progress.pending.append(np.asarray([block.ids, block.positions, block.kinds], dtype=np.int64))  # (3, T)
        self.progress.count += 1
        if len(self.progress.pending) == self.spec.rows_per_file:
            self.flush()

    def flush(self) -> None:
        """Write the waiting blocks as the split's next file."""
        progress = self.progress
        if progress.pending:
            rows = torch.from_numpy(np.stack(progress.pending))  # (n, 3, T)
            blocks = TokenBlocks(rows[:, 0], rows[:, 1], rows[:, 2].to(torch.uint8))  # (n, T) each
            progress.files.append(write_token_file(self.layout, self.split, len(progress.files), blocks, self.spec))
            progress.pending = []


class Tokenization:
    """Feeds each input stream's documents through the packer into the split sinks, saving its position."""

    def __init__(self, layout: RunLayout, data: DataConfig, spec: ShardSpec, state: TokenizeState,
                 save_every_s: float | None = None, on_input_file: InputFileCallback | None = None, pad_id: int = 0):
        self.layout, self.data, self.state, self.on_input_file = layout, data, state, on_input_file
        self.pad_id = pad_id
        """Token id that fills a block after its last example."""
        self.save_every_s = SAVE_EVERY_S if save_every_s is None else save_every_s
        limits = {"train": data.max_train_blocks, "eval": data.max_eval_blocks}
        self.sinks = {split: TokenShardSink(layout, split, spec, limits[split],
                                            state.splits.setdefault(split, SplitProgress()))
                      for split in ("train", "eval")}
        self._saved_at = time.monotonic()

    def run(self, documents: Documents) -> dict[str, SplitProgress]:
        """Read what is left of every stream, write the last files; returns each split's files and block count
        (what the packers did to the examples is in ``state.stats``)."""
        streams = ["train"] + (["eval"] if self.data.eval is not None else [])
        for stream in streams[streams.index(self.state.stream):]:
            if stream != self.state.stream:
                self.state.stream, self.state.next_file, self.state.block_index, self.state.carry = stream, 0, 0, []
            if not self._stream_full(stream):
                self._read(stream, documents)
        for split, sink in self.sinks.items():
            sink.flush()
            if sink.progress.count == 0:
                raise StorageError(f"no {split} block of {self.data.seq_len} tokens could be made from the data: "
                                   "add text or lower data.seq_len")
        return {split: sink.progress for split, sink in self.sinks.items()}

    def _read(self, stream: str, documents: Documents) -> None:
        state = self.state
        packer = PACKERS[packer_kind(self.data.format, self.data.packing)](
            self.data.seq_len, self.pad_id, carry=state.carry, stats=state.stats.setdefault(stream, PackStats()))
        current = state.next_file
        for file_index, example in documents(state.inputs[stream], state.next_file):
            if file_index != current:  # files before file_index are consumed
                state.next_file, state.carry, current = file_index, packer.carry, file_index
                self._between_files(stream)
            if self._route_all(stream, packer.add([example])):
                return
        self._route_all(stream, packer.finish())

    def _route_all(self, stream: str, blocks: Iterator[Block]) -> bool:
        """Route ``blocks``; True once the stream has all the blocks it may take."""
        for block in blocks:
            self._route(stream, block)
            if self._stream_full(stream):
                return True
        return False

    def _route(self, stream: str, block: Block) -> None:
        held_out = stream == "train" and self.data.eval is None and is_held_out(self.state.block_index,
                                                                                  self.data.eval_fraction)
        self.state.block_index += 1
        self.sinks["eval" if held_out or stream == "eval" else "train"].add(block)

    def _stream_full(self, stream: str) -> bool:
        if stream == "eval" or self.data.eval is not None:
            return self.sinks[stream].full
        return all(sink.full for sink in self.sinks.values())

    def _between_files(self, stream: str) -> None:
        if self.on_input_file is not None:
            streams = list(self.state.inputs)
            done = {s: len(self.state.inputs[s]) if streams.index(s) < streams.index(stream) else 0 for s in streams}
            self.on_input_file({**done, stream: self.state.next_file}, {s: len(f) for s, f in self.state.inputs.items()})
        if time.monotonic() - self._saved_at >= self.save_every_s:
            save_state(self.layout, self.state)
            self._saved_at = time.monotonic()
            log.info("tokenize: %s input file %d/%d reached, position saved", stream, self.state.next_file,
                     len(self.state.inputs[stream]))
        if os.environ.get(FAIL_ENV) == f"{stream}:{self.state.next_file}":
            raise RuntimeError(f"{FAIL_ENV}: tokenize job failed on purpose at input file {self.state.next_file}")
