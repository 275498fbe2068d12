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
import os
from typing import Any, Callable

import numpy as np
import ray
import torch

from segprop_ray.core.iteration import build_segment, snapshot_forward
from segprop_ray.pipeline.context import JobContext
from segprop_ray.storage.layout import SPLITS
from segprop_ray.storage.shards import FileInfo
from segprop_ray.storage.snapcheck import transform_file
from segprop_ray.storage.snapshot_resume import record_written

FAULT_ENV = "SEGPROP_TEST_FAIL_SNAPSHOT_AT"
"""Testing hook: ``"<depth>:<split>:<file index>"`` makes the actor raise on that file (see tests)."""


class SnapshotActor:
    """Holds the producer of S[depth] on its device and writes snapshot files with it."""

    def __init__(self, job: dict[str, Any]):
        self.ctx = JobContext(**job)
        self.device = torch.device("cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu")
        parts = self.ctx.parts(self.device)
        plan = self.ctx.plan(parts.num_layers)
        layers = plan.prefix_layers if self.ctx.depth == plan.base_depth else [self.ctx.depth]
        weights = self.ctx.run_weights(plan, committed_layers=layers)
        self.producer = build_segment(parts, weights.snapshot_spec(self.ctx.depth), trainable=False)
        self.source_depth = None if self.ctx.depth == plan.base_depth else self.ctx.depth - 1
        self.spec = self.ctx.spec(parts.config.hidden_size)
        self.weights_hash = self.ctx.snapshot_hash

    def apply(self, input_ids: torch.Tensor, hidden: torch.Tensor | None) -> torch.Tensor:
        """S[depth] rows from token ids (first depth) or from S[depth-1] rows, in the storage precision."""
        cfg = self.ctx.cfg
        return snapshot_forward(self.producer, input_ids, hidden, cfg.snapcheck.dtype, cfg.training.bf16, self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        infos = []
        for split, file_index in zip(batch["split"], batch["file_index"]):
            split, file_index = str(split), int(file_index)
            if os.environ.get(FAULT_ENV) == f"{self.ctx.depth}:{split}:{file_index}":
                raise RuntimeError(f"{FAULT_ENV}: failing {split} file {file_index} of depth {self.ctx.depth}")
            info = transform_file(self.ctx.layout, split, file_index, source_depth=self.source_depth,
                                  depth=self.ctx.depth, fn=self.apply, spec=self.spec)
            record_written(self.ctx.layout, split, self.ctx.depth, info, self.weights_hash)
            infos.append(json.dumps(info.to_dict()))
        return {"split": batch["split"], "info": np.array(infos)}


def run_snapshot_job(ctx: JobContext, hidden_size: int, skip: dict[str, set[int]] | None = None,
                     on_file: Callable[[str, FileInfo], None] | None = None) -> dict[str, list[FileInfo]]:
    """Write the shard files of S[ctx.depth] for both splits, except the file indices in ``skip``;
    returns the written files per split. ``on_file(split, info)`` hears of each file as it is done."""
    spec, skip = ctx.spec(hidden_size), skip or {}
    items = [{"split": split, "file_index": i} for split in SPLITS
             for i in range(spec.num_files(ctx.num_blocks[split])) if i not in skip.get(split, ())]
    written: dict[str, list[FileInfo]] = {split: [] for split in SPLITS}
    if not items:
        return written
    res = ctx.cfg.resources.snapshot
    remote_args: dict[str, Any] = {}
    if os.environ.get(FAULT_ENV):
        remote_args["runtime_env"] = {"env_vars": {FAULT_ENV: os.environ[FAULT_ENV]}}
    if res.resources:
        remote_args["resources"] = res.resources
    if res.label_selector:
        remote_args["label_selector"] = res.label_selector
    dataset = ray.data.from_items(items).map_batches(
        SnapshotActor,
        fn_constructor_kwargs={"job": ctx.to_dict()},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=min(res.num_actors, len(items))),
        num_cpus=res.num_cpus,
        num_gpus=res.num_gpus,
        **remote_args,
    )
    for row in dataset.iter_rows():
        split, info = str(row["split"]), FileInfo.from_dict(json.loads(str(row["info"])))
        written[split].append(info)
        if on_file is not None:
            on_file(split, info)
    return written
