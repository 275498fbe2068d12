"""Snapshot depths as Ray Data jobs: stateful actors apply the committed layer(s) to every shard file.

The dataset is the list of shard files of both splits; ``map_batches`` sends each file to an actor
from a pool that loaded only the layer(s) it applies (the embedder and the prefix for the first
depth, one committed layer after that), on a GPU when the config asks for one. The actor streams
the source file row group by row group through the SnapCheck storage and writes the same-named
file at the new depth, so a retried task overwrites rather than duplicates. The driver commits
the depth (the ``_COMMITTED`` marker) once every file is written.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import ray
import torch

from segprop_ray.core.iteration import build_segment, snapshot_forward
from segprop_ray.pipeline.context import JobContext
from segprop_ray.storage.layout import SPLITS
from segprop_ray.storage.shards import FileInfo
from segprop_ray.storage.snapcheck import transform_file


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

    def apply(self, input_ids: torch.Tensor, hidden: torch.Tensor | None) -> torch.Tensor:
        """S[depth] rows from token ids (first depth) or from S[depth-1] rows, in the storage precision."""
        cfg = self.ctx.cfg
        return snapshot_forward(self.producer, input_ids, hidden, cfg.snapcheck.dtype, cfg.training.bf16, self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        infos = []
        for split, file_index in zip(batch["split"], batch["file_index"]):
            info = transform_file(self.ctx.layout, str(split), int(file_index), source_depth=self.source_depth,
                                  depth=self.ctx.depth, fn=self.apply, spec=self.spec)
            infos.append(json.dumps(info.to_dict()))
        return {"split": batch["split"], "info": np.array(infos)}


def run_snapshot_job(ctx: JobContext, hidden_size: int) -> dict[str, list[FileInfo]]:
    """Write every shard file of S[ctx.depth] for both splits; returns the written files per split."""
    spec = ctx.spec(hidden_size)
    items = [{"split": split, "file_index": i} for split in SPLITS for i in range(spec.num_files(ctx.num_blocks[split]))]
    res = ctx.cfg.resources.snapshot
    remote_args: dict[str, Any] = {}
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
    written: dict[str, list[FileInfo]] = {split: [] for split in SPLITS}
    for row in dataset.take_all():
        written[str(row["split"])].append(FileInfo.from_dict(json.loads(str(row["info"]))))
    return written
