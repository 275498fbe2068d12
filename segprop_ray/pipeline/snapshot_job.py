"""Snapshot depths as Ray Data jobs: stateful actors apply the committed layer(s) to every shard file.

The dataset is the list of shard files of both splits; ``map_batches`` sends each file to an actor
from a pool that loaded only the layer(s) it applies (the embedder and the prefix for the first
depth, one committed layer after that), on a GPU when the config asks for one. The actor streams
the source file row group by row group through the SnapCheck storage and writes the same-named
file at the new depth, so a retried task overwrites rather than duplicates. After each file the
actor leaves a per-file record (``storage.snapshot_resume``): a job started again for the same
depth skips the files already finished. The driver commits the depth (the ``_COMMITTED`` marker)
once every file is written.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import ray
import torch

from segprop_ray.core.iteration import build_segment, snapshot_forward
from segprop_ray.pipeline.context import JobContext, forwarded_env
from segprop_ray.storage.layout import SPLITS
from segprop_ray.storage.shards import FileInfo
from segprop_ray.storage.snapcheck import transform_file
from segprop_ray.storage.snapshot_resume import is_intact, record_written

log = logging.getLogger(__name__)

FAULT_ENV = "SEGPROP_TEST_FAIL_SNAPSHOT_AT"
"""Testing hook: ``"<depth>:<split>:<file index>"`` makes the actor raise on that file (see tests)."""


class SnapshotActor:
    """Holds the producer of S[depth] on its device and writes snapshot files with it."""

    def __init__(self, job: dict[str, Any]):
        self.ctx = JobContext(**job)
        self.device = torch.device("cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu")
        parts = self.ctx.parts(self.device)
        plan = self.ctx.plan(parts.num_layers)
        it = plan.iteration(self.ctx.depth)  # the iteration that committed this depth: its layers produce S[depth]
        layers = plan.prefix_layers if it.stage != "stage2" else it.layers
        weights = self.ctx.run_weights(plan, committed_layers=layers, parts=parts)
        self.producer = build_segment(parts, weights.snapshot_spec(self.ctx.depth), trainable=False)
        self.source_depth = plan.source_depth(it)
        self.spec = self.ctx.spec(parts.config.hidden_size)
        self.weights_hash = self.ctx.snapshot_hash

    def apply(self, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        """S[depth] rows from token ids (first depth) or from S[depth-1] rows, in the storage precision."""
        cfg = self.ctx.cfg
        return snapshot_forward(self.producer, rows, cfg.snapcheck.dtype, cfg.training.bf16, self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        infos, kept = [], []
        for split, file_index, record in zip(batch["split"], batch["file_index"], batch["record"]):
            split, file_index = str(split), int(file_index)
            info = self._kept(split, str(record))
            kept.append(info is not None)
            infos.append(json.dumps((info or self._write(split, file_index)).to_dict()))
        return {"split": batch["split"], "info": np.array(infos), "kept": np.array(kept)}

    def _kept(self, split: str, record: str) -> FileInfo | None:
        """The recorded file of an earlier attempt, if its content is intact (the sha256 is checked here, in
        parallel across the actors, rather than on the driver)."""
        if not record:
            return None
        info = FileInfo.from_dict(json.loads(record))
        return info if is_intact(self.ctx.layout, split, self.ctx.depth, info) else None

    def _write(self, split: str, file_index: int) -> FileInfo:
        if os.environ.get(FAULT_ENV) == f"{self.ctx.depth}:{split}:{file_index}":
            raise RuntimeError(f"{FAULT_ENV}: failing {split} file {file_index} of depth {self.ctx.depth}")
        info = transform_file(self.ctx.layout, split, file_index, source_depth=self.source_depth,
                              depth=self.ctx.depth, fn=self.apply, spec=self.spec)
        try:
            record_written(self.ctx.layout, split, self.ctx.depth, info, self.weights_hash)
        except Exception as error:  # noqa: BLE001 - the file is written; only a restart's shortcut is lost
            log.warning("%s: no resume record written (%s)", info.name, error)
        return info


def run_snapshot_job(ctx: JobContext, hidden_size: int, recorded: dict[str, dict[int, FileInfo]] | None = None,
                     on_file: Callable[[str, FileInfo], None] | None = None) -> SnapshotFiles:
    """Write the shard files of S[ctx.depth] for both splits. Files in ``recorded`` (an earlier attempt's,
    by split and file index) are kept if their sha256 still matches, else written again. ``on_file(split,
    info)`` hears of each file as it is done."""
    spec, recorded = ctx.spec(hidden_size), recorded or {}
    items = [{"split": split, "file_index": i, "record": _record_json(recorded.get(split, {}).get(i))}
             for split in SPLITS for i in range(spec.num_files(ctx.num_blocks[split]))]
    res = ctx.cfg.resources.snapshot
    hooks = forwarded_env(FAULT_ENV)
    dataset = ray.data.from_items(items).map_batches(
        SnapshotActor,
        fn_constructor_kwargs={"job": ctx.to_dict()},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=min(res.num_actors, len(items))),
        **res.ray_options(),
        **({"runtime_env": hooks} if hooks else {}),
    )
    files = SnapshotFiles()
    for row in dataset.iter_rows():
        split, info = str(row["split"]), FileInfo.from_dict(json.loads(str(row["info"])))
        (files.kept if bool(row["kept"]) else files.written)[split].append(info)
        if on_file is not None:
            on_file(split, info)
    return files


@dataclass
class SnapshotFiles:
    """The files of a snapshot job, per split: written by it, or kept from an earlier attempt."""

    written: dict[str, list[FileInfo]] = field(default_factory=lambda: {split: [] for split in SPLITS})
    kept: dict[str, list[FileInfo]] = field(default_factory=lambda: {split: [] for split in SPLITS})

    def all(self, split: str) -> list[FileInfo]:
        """Every file of ``split``, in no particular order."""
        return self.written[split] + self.kept[split]


def _record_json(info: FileInfo | None) -> str:
    return json.dumps(info.to_dict()) if info is not None else ""
