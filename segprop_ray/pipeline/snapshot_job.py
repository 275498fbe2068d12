"""Snapshot depths as Ray Data jobs: stateful actors apply the committed layer(s) to every shard file.

The dataset is the list of shard files of both splits; ``map_batches`` sends each file to an actor
from a pool that loaded only the layer(s) it applies (the embedder and the prefix for the first
depth, one committed layer after that), on a GPU when the config asks for one. The actor streams
the source file row group by row group through the SnapCheck storage and writes the same-named
file at the new depth, so a retried task overwrites rather than duplicates. After each file the
actor leaves a per-file record (``storage.snapshot_resume``): a job started again for the same
depth skips the files already finished. The driver commits the depth (the ``_COMMITTED`` marker)
once every file is written.

Sizing: ``resources.snapshot.files_per_actor`` files go through one actor at once (Ray Data's concurrent
calls), sharing its layer(s) and device, each with its own read, write and hash threads; ``num_actors`` actors
(several per GPU with a fractional ``num_gpus``) work in parallel. Every file reports when it started and ended
on which actor, and :class:`SnapshotFiles` turns that into the figure that decides the sizing: bytes written
per second per actor (``sizing()``, in the snapshot step's outputs of the manifest).
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
import uuid
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
        self.layout, self.write_options = self.ctx.layout, self.ctx.cfg.snapcheck.write_options()
        self.actor_id = uuid.uuid4().hex[:12]

    def apply(self, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        """S[depth] rows from token ids (first depth) or from S[depth-1] rows, in the storage precision."""
        cfg = self.ctx.cfg
        return snapshot_forward(self.producer, rows, cfg.snapcheck.dtype, cfg.training.bf16, self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Keep or write each file of the batch (calls may run at once, ``files_per_actor``): the files' infos,
        whether each was kept, and when it started and ended on this actor."""
        infos, kept, spans = [], [], []
        for split, file_index, record in zip(batch["split"], batch["file_index"], batch["record"]):
            split, file_index = str(split), int(file_index)
            started = time.time()
            info = self._kept(split, str(record))
            kept.append(info is not None)
            infos.append(json.dumps((info or self._write(split, file_index)).to_dict()))
            spans.append(json.dumps([self.actor_id, started, time.time()]))
        return {"split": batch["split"], "info": np.array(infos), "kept": np.array(kept), "span": np.array(spans)}

    def _kept(self, split: str, record: str) -> FileInfo | None:
        """The recorded file of an earlier attempt, if its content is intact (the sha256 is checked here, in
        parallel across the actors, rather than on the driver)."""
        if not record:
            return None
        info = FileInfo.from_dict(json.loads(record))
        return info if is_intact(self.layout, split, self.ctx.depth, info) else None

    def _write(self, split: str, file_index: int) -> FileInfo:
        if os.environ.get(FAULT_ENV) == f"{self.ctx.depth}:{split}:{file_index}":
            raise RuntimeError(f"{FAULT_ENV}: failing {split} file {file_index} of depth {self.ctx.depth}")
        info = transform_file(self.layout, split, file_index, source_depth=self.source_depth, depth=self.ctx.depth,
                              fn=self.apply, spec=self.spec, options=self.write_options,
                              pin_memory=self.device.type == "cuda")
        try:
            record_written(self.layout, split, self.ctx.depth, info, self.weights_hash)
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
        compute=ray.data.ActorPoolStrategy(**res.pool_options(len(items))),
        **res.ray_options(),
        **({"runtime_env": hooks} if hooks else {}),
    )
    files = SnapshotFiles(files_per_actor=res.files_per_actor)
    for row in dataset.iter_rows():
        split, info = str(row["split"]), FileInfo.from_dict(json.loads(str(row["info"])))
        kept = bool(row["kept"])
        (files.kept if kept else files.written)[split].append(info)
        if not kept:
            files.spans.append((*json.loads(str(row["span"])), info.bytes))
        if on_file is not None:
            on_file(split, info)
    return files


@dataclass
class SnapshotFiles:
    """The files of a snapshot job, per split: written by it, or kept from an earlier attempt; and for every
    written file, ``(actor, started, ended, bytes)``."""

    written: dict[str, list[FileInfo]] = field(default_factory=lambda: {split: [] for split in SPLITS})
    kept: dict[str, list[FileInfo]] = field(default_factory=lambda: {split: [] for split in SPLITS})
    spans: list[tuple[str, float, float, int]] = field(default_factory=list)
    files_per_actor: int = 1

    def all(self, split: str) -> list[FileInfo]:
        """Every file of ``split``, in no particular order."""
        return self.written[split] + self.kept[split]

    def sizing(self) -> dict[str, Any]:
        """What sizes the job: actors that wrote, files each wrote at once, and the bytes written per second of
        each actor's busy span (first file's start to last file's end): median, min and max over actors."""
        per_actor: dict[str, list[tuple[float, float, int]]] = {}
        for actor, started, ended, size in self.spans:
            per_actor.setdefault(actor, []).append((started, ended, size))
        rates = [sum(s for _, _, s in spans) / max(max(e for _, e, _ in spans) - min(b for b, _, _ in spans), 1e-9)
                 for spans in per_actor.values()]
        if not rates:
            return {"actors": 0, "files_per_actor": self.files_per_actor, "bytes_per_s_per_actor": None}
        return {"actors": len(rates), "files_per_actor": self.files_per_actor,
                "bytes_per_s_per_actor": round(statistics.median(rates)),
                "bytes_per_s_per_actor_range": [round(min(rates)), round(max(rates))]}


def _record_json(info: FileInfo | None) -> str:
    return json.dumps(info.to_dict()) if info is not None else ""
