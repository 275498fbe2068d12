"""What a Ray worker needs to do its part of a run: small, picklable, rebuilt into real objects on the worker.

The driver hands every job a :class:`JobContext` (the config, the depth, the hashes of the committed
files the job may read); large things (weights, activations) travel through the run directory.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any

import torch

from segprop_ray.config import Config
from segprop_ray.core.iteration import RunWeights
from segprop_ray.core.parts import ModelParts
from segprop_ray.core.plan import SegPropPlan
from segprop_ray.core.weights import DictSource, TensorSource
from segprop_ray.storage.layout import RunLayout
from segprop_ray.storage.models import resolve_model_dir
from segprop_ray.storage.shard_format import ShardSpec
from segprop_ray.storage.weights_store import EMBED_FILE, WeightStore, exit_file, layer_file, snapshot_weights_hash


def forwarded_env(*names: str) -> dict[str, Any] | None:
    """A runtime env passing those of the driver's variables ``names`` that are set on to a job's workers (the
    testing hooks: never set in normal runs), else None."""
    env_vars = {name: os.environ[name] for name in names if os.environ.get(name)}
    return {"env_vars": env_vars} if env_vars else None


@dataclass
class JobContext:
    """The facts a job runs on; everything else is derived or read from the run directory."""

    config: dict[str, Any]
    depth: int
    group_size: int
    num_blocks: dict[str, int]
    files: dict[str, str] = field(default_factory=dict)
    """Committed files the job may read: run-relative path -> sha256."""
    input_hash: str = ""
    """Expected weights hash of the shards the job reads (tokens, or the snapshot depth it starts from)."""
    model_source: str = ""
    """Where the job reads the input model: the run directory's staged copy (empty: the config's ``model``)."""
    part: str = "layer"
    """What a training job trains of its layers: ``layer``, or the ``attn`` / ``mlp`` half of layer ``depth``."""

    @property
    def key(self) -> str:
        """The iteration's key in the plan and the manifest (``<depth>`` or ``<depth>-attn``)."""
        return f"{self.depth}-attn" if self.part == "attn" else str(self.depth)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for Ray (train_loop_config, actor constructor kwargs)."""
        return asdict(self)

    @cached_property
    def cfg(self) -> Config:
        """The run's typed config."""
        return Config.model_validate(self.config)

    @cached_property
    def layout(self) -> RunLayout:
        """The run directory."""
        return RunLayout.open(self.cfg.run_dir, self.cfg.storage_options)

    @property
    def model_uri(self) -> str:
        """Where this job reads the input model, weights and tokenizer alike: the staged copy once the model is
        staged (never its origin again), else the config's ``model``."""
        return self.model_source or self.cfg.model

    @cached_property
    def model_dir(self) -> str:
        """The input model as a local directory on this node."""
        return str(resolve_model_dir(self.model_uri, self.cfg.storage_options))

    def parts(self, device: torch.device) -> ModelParts:
        """Piece factory for the input model on ``device``."""
        from transformers import AutoConfig

        return ModelParts(AutoConfig.from_pretrained(self.model_dir), device)

    def plan(self, num_layers: int) -> SegPropPlan:
        """The layer plan of the run."""
        return SegPropPlan.from_config(self.cfg.segprop, num_layers)

    @property
    def snapshot_hash(self) -> str:
        """Weights hash of snapshot depth :attr:`depth` (what a snapshot job of this depth writes)."""
        return snapshot_weights_hash(self.files, self.depth)

    def spec(self, hidden_size: int) -> ShardSpec:
        """Shard geometry of the run (same for tokens and every snapshot depth)."""
        snap = self.cfg.snapcheck
        return ShardSpec.for_snapcheck(self.cfg.data.seq_len, hidden_size, snap.dtype, self.group_size,
                                       snap.groups_per_file, snap.compression)

    def source(self, paths: list[str]) -> TensorSource:
        """Committed files (those of ``paths`` that are committed) as one lazy tensor source."""
        chosen = {p: self.files[p] for p in paths if p in self.files}
        return WeightStore(self.layout).source(chosen) if chosen else DictSource({})

    def run_weights(self, plan: SegPropPlan, committed_layers: list[int | str], parts: ModelParts,
                    tied: bool = False) -> RunWeights:
        """Weight sources for this job: the input model (under the names of ``parts``' modules), the committed files
        it needs (layers by index, halves by key such as ``5-attn``), and exits on demand (``tied``: the model ties
        its head to the embedding, see :class:`RunWeights`)."""
        base = parts.base_source(self.model_dir)
        paths = [EMBED_FILE] + [layer_file(i) for i in committed_layers]
        committed = self.source(paths)
        return RunWeights(plan, base, committed, lambda d: self.source([exit_file(d)]), self.cfg.segprop.ll_baseline,
                          tied)
