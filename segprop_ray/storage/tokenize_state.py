"""Where a tokenize job stands, so a restarted job continues at the last finished input file.

Tokenizing is sequential over the input files (documents are packed in input order). Between two
input files the job may save its state under ``tokens/_resume/``:

- ``state.json``: which input stream (``train`` or ``eval``) and file come next, the input file lists
  the state belongs to, the tokenization hash, the number of blocks cut so far and, per split, the
  token shard files already written (their :class:`FileInfo`) and the block count;
- ``pending-<uuid>.parquet``: the blocks each split holds that are not yet in a file (ids, positions and
  token kinds), and the packer's carry (the examples it holds that are not yet in a block), one row each.

``state.json`` is written atomically after its ``pending`` file, so it never names a missing or
partial one. A later job uses the state only if it has the same tokenization hash, input file lists
and input file sizes and every recorded shard file still has its sha256; otherwise it starts over
(reason logged). The directory is removed once the tokens are committed.
"""

from __future__ import annotations

import io
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from segprop_ray.core.packing import Example, PackStats
from segprop_ray.storage.documents import DocumentFormat
from segprop_ray.storage.errors import DocumentNotFound, StorageError
from segprop_ray.storage.layout import RunLayout
from segprop_ray.storage.shards import FileInfo
from segprop_ray.storage.snapshot_resume import is_intact

log = logging.getLogger(__name__)

STATE_FORMAT = DocumentFormat("segprop_ray.tokenize_state", 2)
CARRY = "carry"
PENDING_COLUMNS = ("split", "tokens", "positions", "kinds")


@dataclass
class SplitProgress:
    """One split's output so far: files written, blocks taken and blocks (3, T) (ids, positions, kinds) waiting
    for the next file."""

    files: list[FileInfo] = field(default_factory=list)
    count: int = 0
    pending: list[np.ndarray] = field(default_factory=list)


@dataclass
class TokenizeState:
    """A tokenize job between two input files."""

    tokens_hash: str
    inputs: dict[str, list[str]]
    """Input file URIs of each stream (``train``, and ``eval`` when the eval data is separate)."""
    input_sizes: dict[str, list[int]] = field(default_factory=dict)
    """Byte size of each input file when the job started (a file edited since makes the state unusable)."""
    stream: str = "train"
    """The stream being read."""
    next_file: int = 0
    """Index in ``inputs[stream]`` of the first file not fully consumed."""
    block_index: int = 0
    """Blocks cut so far from the stream (they decide the eval hold-out)."""
    carry: list[Example] = field(default_factory=list)
    """The examples the packer holds that are not yet in a block."""
    stats: dict[str, PackStats] = field(default_factory=dict)
    """What the packer did to each stream's examples so far (truncated, dropped)."""
    splits: dict[str, SplitProgress] = field(default_factory=dict)


def save_state(layout: RunLayout, state: TokenizeState) -> None:
    """Save ``state``: its pending blocks to a new file first (never the one ``state.json`` names, which a kill
    mid-write would tear), then ``state.json`` naming it, then the older pending files go."""
    directory = layout.tokenize_state_dir()
    pending_name = f"pending-{uuid.uuid4().hex}.parquet"
    layout.fs.makedirs(directory, exist_ok=True)
    layout.fs.pipe_file(f"{directory}/{pending_name}", _pending_bytes(state))
    body = {"tokens_hash": state.tokens_hash, "inputs": state.inputs, "input_sizes": state.input_sizes,
            "stream": state.stream,
            "next_file": state.next_file, "block_index": state.block_index, "pending_file": pending_name,
            "stats": {stream: stats.to_dict() for stream, stats in state.stats.items()},
            "splits": {split: {"count": p.count, "files": [info.to_dict() for info in p.files]}
                       for split, p in state.splits.items()}}
    STATE_FORMAT.write(layout.fs, f"{directory}/state.json", body)
    for stale in layout.fs.ls(directory, detail=False):
        if stale.rsplit("/", 1)[-1].startswith("pending-") and not stale.endswith(pending_name):
            layout.fs.rm(stale)


def load_state(layout: RunLayout, tokens_hash: str, inputs: dict[str, list[str]],
               input_sizes: dict[str, list[int]] | None = None) -> TokenizeState | None:
    """The saved state if it belongs to this tokenization and these inputs (names, and sizes when given) and
    its files are intact, else None."""
    directory = layout.tokenize_state_dir()
    try:
        body = STATE_FORMAT.read(layout.fs, f"{directory}/state.json")
    except DocumentNotFound:
        return None
    except StorageError as error:
        log.warning("tokenize state not usable, tokenizing from the start: %s", error)
        return None
    reason = _mismatch(layout, body, tokens_hash, inputs, input_sizes)
    if reason:
        log.warning("tokenize state not usable, tokenizing from the start: %s", reason)
        return None
    state = TokenizeState(tokens_hash, inputs, body.get("input_sizes", {}), body["stream"], body["next_file"],
                          body["block_index"], stats={k: PackStats(**v) for k, v in body.get("stats", {}).items()})
    state.splits = {split: SplitProgress([FileInfo.from_dict(f) for f in p["files"]], p["count"])
                    for split, p in body["splits"].items()}
    try:
        table = pq.read_table(io.BytesIO(layout.fs.cat_file(f"{directory}/{body['pending_file']}")))
    except (OSError, pa.ArrowException) as error:  # FileNotFoundError is an OSError
        log.warning("tokenize state not usable, tokenizing from the start: %s unreadable (%s)",
                    body["pending_file"], error)
        return None
    for split, tokens, positions, kinds in zip(*(table.column(c).to_pylist() for c in PENDING_COLUMNS)):
        if split == CARRY:
            state.carry.append(Example(tokens, kinds))
        else:
            state.splits[split].pending.append(np.asarray([tokens, positions, kinds], dtype=np.int64))
    return state


def clear_state(layout: RunLayout) -> None:
    """Remove the saved state (after the tokens are committed)."""
    directory = layout.tokenize_state_dir()
    if layout.fs.exists(directory):
        layout.fs.rm(directory, recursive=True)


def _pending_bytes(state: TokenizeState) -> bytes:
    rows: list[tuple[str, Any, Any, Any]] = [(split, *block.tolist()) for split, p in state.splits.items()
                                             for block in p.pending]
    rows += [(CARRY, example.ids, [], example.kinds) for example in state.carry]
    lists = pa.list_(pa.int64())
    table = pa.table({"split": [r[0] for r in rows],
                      **{name: pa.array([r[i] for r in rows], lists) for i, name in enumerate(PENDING_COLUMNS[1:], 1)}})
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def _mismatch(layout: RunLayout, body: dict[str, Any], tokens_hash: str, inputs: dict[str, list[str]],
              input_sizes: dict[str, list[int]] | None) -> str:
    """Why the saved state cannot be continued ('' when it can)."""
    if body.get("tokens_hash") != tokens_hash:
        return "it was saved for another tokenization (data, model or shard settings changed)"
    if body.get("inputs") != inputs:
        return "the input files are not the ones it was saved for"
    if input_sizes is not None and body.get("input_sizes") != input_sizes:
        return "an input file changed size since the job started"
    for split, progress in body["splits"].items():
        for info in map(FileInfo.from_dict, progress["files"]):
            if not is_intact(layout, split, None, info):
                return f"token file {split}/{info.name} is missing or changed"
    return ""
