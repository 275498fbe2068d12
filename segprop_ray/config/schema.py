"""The typed run configuration: every field documented, impossible settings rejected."""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from segprop_ray.config.data import DataConfig
from segprop_ray.config.placement import CpuWorkResources, ExportResources, StageModel, task_options
from segprop_ray.config.segprop import SegPropConfig
from segprop_ray.config.training import TRAINING_FIELDS, Strict, TrainingConfig
from segprop_ray.storage.shard_sinks import WriteOptions
from segprop_ray.core.plan import MODES, SegPropPlan


class LayerExitConfig(Strict):
    """When one iteration (Stage 1 or one Stage 2 layer) stops, besides its step/epoch budget."""

    patience: int = Field(0, ge=0)
    """Stop after this many evaluations without improving the best eval loss by ``min_delta`` (0: off).
    Needs ``training.eval_steps`` > 0."""
    min_delta: float = Field(0.0, ge=0)
    """Improvement of the eval loss that counts as progress for ``patience``."""
    target_loss: float | None = None
    """Stop as soon as the eval loss reaches this value."""


class RunExitConfig(Strict):
    """The global exit: when to stop adding depth and keep a shallower model."""

    target_loss: float | None = None
    """Stop once an exit's eval loss is at or below this value."""
    patience_layers: int = Field(0, ge=0)
    """Stop when the exit's eval loss has not improved by ``min_delta`` over this many exits (0: off): layers, or
    segments of ``segprop.segment_layers``."""
    min_delta: float = Field(0.0, ge=0)
    """Improvement of the exit eval loss that counts as progress for ``patience_layers``."""
    max_depth: int | None = Field(None, ge=0)
    """Train no layer deeper than this index (a depth budget)."""


class ExitConfig(Strict):
    """Exit criteria: per iteration (``layer``) and global (``run``)."""

    layer: LayerExitConfig = LayerExitConfig()
    """Per-iteration criteria."""
    run: RunExitConfig = RunExitConfig()
    """Global criterion deciding whether to train the next layer."""


SNAPCHECK_IO_FIELDS = frozenset({"read_threads", "prefetch_groups", "upload_part_mib", "upload_concurrency"})
"""SnapCheck settings of how shards are moved, not what they hold: changing them continues a run."""


class SnapCheckConfig(Strict):
    """Activation snapshots of the frozen prefix (SnapCheck)."""

    dtype: Literal["bf16", "fp32"] = "bf16"
    """Precision the hidden states are stored in (bf16 bits are kept exactly)."""
    rows_per_group: int | None = Field(None, ge=1)
    """Blocks per Parquet row group, the unit of shuffling and reading (None: about 64 MiB of activations)."""
    groups_per_file: int = Field(4, ge=1)
    """Row groups per shard file."""
    keep_depths: int = Field(2, ge=1)
    """Committed snapshot depths kept on storage; older ones are deleted."""
    compression: Literal["none", "zstd", "lz4", "snappy"] = "none"
    """Parquet compression of shards (activation bits compress poorly; ``none`` reads fastest, and only ``none``
    shards are written and read without copies in Python, see BENCHMARKS.md)."""
    read_threads: int = Field(4, ge=1, le=64)
    """Threads reading shard row groups for a training worker, each a whole group straight into the batches'
    tensors (page-locked on CUDA). More than one keeps a fast step fed where one group's read takes longer than
    the steps it feeds (the layer-wise step at 7B needs about 1.6 GB/s)."""
    prefetch_groups: int = Field(2, ge=1, le=64)
    """Row groups read ahead of the one the worker takes batches from. A worker holds about prefetch_groups + 1
    groups (about 64 MiB each by default) of reads in memory."""
    upload_part_mib: int = Field(64, ge=5, le=5120)
    """Part size of the S3 multipart uploads of shard files, in MiB (S3 needs at least 5 MiB for all but the last
    part)."""
    upload_concurrency: int = Field(4, ge=1, le=64)
    """Parts of one shard file uploaded to S3 at once. A file being written holds about upload_concurrency + 1
    parts in memory."""

    def write_options(self) -> WriteOptions:
        """How the storage writes this run's shard files."""
        return WriteOptions(upload_part_bytes=self.upload_part_mib << 20, upload_concurrency=self.upload_concurrency)


class EvaluationConfig(Strict):
    """Evaluation of every exit as soon as its layer is committed (beside the next layer's training)."""

    mc_path: str | None = None
    """Multiple-choice items (JSONL or Parquet, MMLU layout: ``question``, ``choices``, ``answer`` index);
    local path or any fsspec URI. None: no accuracy, only held-out loss and perplexity."""
    mc_dev_path: str | None = None
    """Items the few-shot examples are drawn from (default: the first items of ``mc_path``, then skipped)."""
    few_shot: int = Field(0, ge=0)
    """Solved examples put before each question."""
    prompt_style: Literal["mmlu", "cloze", "chat"] = "mmlu"
    """``mmlu``: "Question: ... A. ... Answer:" then each option's text; ``cloze``: the bare question
    then each option (for base models that never saw the MMLU format); ``chat``: the question as a user turn
    rendered with the tokenizer's chat template (shots as earlier turns), each option as the assistant's answer
    (for chat models and ``data.format: chat`` runs)."""
    system_prompt: str | None = None
    """A system message put first in ``chat`` style prompts (e.g. the one the training conversations have)."""
    max_items: int | None = Field(None, ge=1)
    """Score at most this many items per exit."""
    nhsic_tokens: int = Field(512, ge=0)
    """Token positions sampled for the nHSIC diagnostics of each depth (0: off)."""
    baseline: bool = True
    """Also evaluate the input model itself (its original score, for the report)."""


class TrainResources(Strict):
    """Ray Train resources for one kind of training job."""

    num_workers: int = Field(1, ge=1)
    """Data-parallel workers."""
    use_gpu: bool = False
    """One GPU per worker."""
    resources_per_worker: dict[str, float] = {}
    """Extra Ray resources per worker, e.g. ``{"CPU": 4}`` or a custom ``{"spot_gpu": 1}``."""
    label_selector: dict[str, str] = {}
    """Ray node labels the workers must run on, e.g. ``{"ray.io/market-type": "spot"}``."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """Data-parallel strategy: ``ddp``, or ``fsdp`` (one FullyShardedDataParallel unit over the segment, original
    parameters kept: shards weights, gradients and AdamW state across workers; useful for Stage 1 and E2E on
    GPUs; on CPU it runs over gloo, which the tests use, but saves nothing worth the communication)."""

    @property
    def cpus_needed(self) -> float:
        """CPUs the workers take at once, by Ray Train's rule: ``resources_per_worker``'s CPU entry (0 if it has
        none) when given, else 1 per worker, or 0 with ``use_gpu``."""
        if self.resources_per_worker:
            per_worker = self.resources_per_worker.get("CPU", 0)
        else:
            per_worker = 0 if self.use_gpu else 1
        return self.num_workers * per_worker


class SnapshotResources(Strict):
    """Ray Data resources of the snapshot (frozen-layer forward) job."""

    num_actors: int = Field(1, ge=1)
    """Actors in the pool, each holding the layer(s) it applies."""
    num_cpus: float = Field(1, ge=0)
    """CPUs per actor."""
    num_gpus: float = Field(0, ge=0)
    """GPUs per actor (0: CPU). A fraction (0.5) puts several actors on one GPU, each with its own copy of the
    layer(s)."""
    files_per_actor: int = Field(1, ge=1, le=64)
    """Shard files one actor writes at once (Ray Data's concurrent calls per actor), all through the actor's one
    copy of the layer(s) on its device. Each file in flight keeps its own reading, writing and hashing threads
    busy beside the shared forward, so a GPU's fast forward is not left waiting on one file's storage I/O. Needs a
    CPU per file in flight (``num_cpus >= files_per_actor``). The snapshot step's outputs in the manifest give
    ``bytes_per_s_per_actor``: the figure to size this and ``num_actors`` by, against the bytes/s training reads."""
    resources: dict[str, float] = {}
    """Extra custom Ray resources per actor."""
    label_selector: dict[str, str] = {}
    """Ray node labels the actors must run on."""
    fallback_label_selectors: list[dict[str, str]] = []
    """Node labels tried in order when ``label_selector`` cannot be met (Ray's ``fallback_strategy``), e.g.
    ``[{"segprop/pool": "snapshot", "ray.io/market-type": "on-demand"}]`` behind a spot selector."""

    @model_validator(mode="after")
    def _a_cpu_per_file_in_flight(self) -> "SnapshotResources":
        if self.files_per_actor > max(1.0, self.num_cpus):
            raise ValueError(f"files_per_actor = {self.files_per_actor} needs num_cpus >= {self.files_per_actor} "
                             f"(a CPU for each file in flight), got num_cpus = {self.num_cpus:g}")
        return self

    def pool_options(self, num_files: int) -> dict[str, Any]:
        """``ActorPoolStrategy`` arguments: the pool (never more actors than files) and its calls per actor."""
        actors = max(1, min(self.num_actors, -(-num_files // self.files_per_actor)))
        return {"size": actors, "max_tasks_in_flight_per_actor": self.files_per_actor,
                "max_concurrent_calls_per_actor": self.files_per_actor,
                "enable_true_multi_threading": self.files_per_actor > 1}

    def ray_options(self) -> dict[str, Any]:
        """Ray's options for one actor or task of this kind: CPUs, GPUs, and the custom resources, node labels
        and fallback labels when set."""
        options = {**task_options(self.num_cpus, self.label_selector, fallback=self.fallback_label_selectors),
                   "num_gpus": self.num_gpus}
        if self.resources:
            options["resources"] = self.resources
        return options


class ResourcesConfig(Strict):
    """Where the work runs: the Ray cluster and the resources of each job kind."""

    address: str | None = None
    """Ray cluster to connect to (else ``RAY_ADDRESS``, else a local Ray started by the command)."""
    num_cpus: int | None = Field(None, ge=1)
    """CPUs of the local Ray started when no cluster is given (None: all)."""
    tokenize_cpus: float = Field(1, gt=0)
    """CPUs per tokenizer actor."""
    tokenize_actors: int = Field(1, ge=1)
    """Tokenizer actors working at once (documents are still packed in input order, so any count gives the
    same blocks)."""
    snapshot: SnapshotResources = SnapshotResources()
    """Snapshot job actors."""
    stage1: TrainResources = TrainResources()
    """Stage 1 (and ``e2e``) training workers."""
    segment: TrainResources = TrainResources()
    """Stage 2 segment training workers."""
    max_failures: int = Field(3, ge=0)
    """Worker failures Ray Train retries per iteration (preemptions have their own unlimited budget)."""
    max_preemption_handovers: int = Field(20, ge=0)
    """How many times one iteration may hand over to a new node after a preemption notice (checkpoint, new trainer)
    before the run fails: a spot pool reclaimed again and again makes no progress, and then on-demand capacity or
    another pool is the answer."""
    preemption_check_steps: int = Field(1, ge=1)
    """Every how many steps the training workers ask Ray Train for a preemption notice (a barrier over the ranks,
    a round trip to one actor); on one they checkpoint that step and the iteration continues on another node."""
    cpu: CpuWorkResources = CpuWorkResources()
    """CPU work kept off the GPU nodes: tokenizing, checking committed files on resume, staging the model."""
    export: ExportResources = ExportResources()
    """The export task (the final model as sharded safetensors, written on a worker, not on the head)."""
    worker_group_start_timeout_s: float | None = Field(None, gt=0)
    """Seconds Ray Train waits for a worker group to start before retrying (a GPU pool scaling up from zero
    and pulling a large image takes minutes). None: ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` if set, else 900."""
    driver_lease_s: float = Field(120, ge=5)
    """A driver holds its run directory by a lease renewed every quarter of this; a second driver refuses while
    it is fresh, and takes it over once it is this many seconds old (its holder gone)."""
    stage_model: StageModel = "auto"
    """Copy the input model (config, tokenizer, safetensors) into the run directory once, for the workers to
    read from there: ``auto`` when the run directory is not a local path or the model is a GGUF file (converted
    once, on a CPU worker), ``always``, ``never`` (each node then reads, or converts, the model itself)."""


class Config(Strict):
    """A SegProp run. Loaded from YAML; ``--set a.b=c`` overrides any field."""

    run_dir: str
    """Where everything of the run lives: a local path or any fsspec URI (``s3://bucket/prefix``)."""
    model: str
    """The input model: a Hugging Face hub id, a directory (local or ``s3://``), or a ``.gguf`` file (local or any
    fsspec URI; dequantized to fp32 and staged once as safetensors; needs ``segprop_ray[gguf]``)."""
    storage_options: dict[str, Any] = {}
    """Extra fsspec options for the run directory and model (e.g. ``endpoint_url``, ``profile``).
    Credentials are better left to the standard AWS environment; these are never printed or saved."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Device of in-process work (``auto``: CUDA when available)."""
    data: DataConfig
    """Input text."""
    segprop: SegPropConfig = SegPropConfig()
    """The algorithm."""
    training: TrainingConfig = TrainingConfig()
    """Hyper-parameters of every segment (Stage 1, each Stage 2 layer, or the whole ``e2e`` run)."""
    stage1: dict[str, Any] = {}
    """Overrides of ``training`` fields for Stage 1 only (e.g. ``{max_steps: 200}``)."""
    exit: ExitConfig = ExitConfig()
    """Early-exit criteria."""
    snapcheck: SnapCheckConfig = SnapCheckConfig()
    """Activation snapshots."""
    evaluation: EvaluationConfig = EvaluationConfig()
    """Per-exit evaluation: held-out loss, multiple-choice accuracy, nHSIC."""
    resources: ResourcesConfig = ResourcesConfig()
    """Ray resources and scheduling."""

    @field_validator("run_dir", "model")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("stage1")
    @classmethod
    def _known_training_fields(cls, value: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(value) - TRAINING_FIELDS)
        if unknown:
            raise ValueError(f"unknown training field(s) {unknown}")
        return value

    @model_validator(mode="after")
    def _stage1_overrides_valid(self) -> "Config":
        self.training_for("stage1")
        return self

    @model_validator(mode="after")
    def _layer_exit_needs_evaluations(self) -> "Config":
        layer = self.exit.layer
        setting = "exit.layer.patience" if layer.patience else "exit.layer.target_loss" if layer.target_loss is not None else ""
        if setting and all(self.training_for(stage).eval_steps == 0 for stage in self.training_stages):
            raise ValueError(f"{setting} needs training.eval_steps > 0: an iteration evaluated only at its end "
                             "cannot stop early")
        return self

    @model_validator(mode="after")
    def _local_ray_fits_each_job(self) -> "Config":
        """A local Ray too small for one job's actors or workers at once would wait for CPUs forever."""
        res = self.resources
        if res.num_cpus is None or res.address or os.environ.get("RAY_ADDRESS"):
            return self  # num_cpus only sizes a local Ray started by the command
        needs = {
            "the tokenize job (tokenize_actors x tokenize_cpus, + 1 reading)": res.tokenize_actors * res.tokenize_cpus + 1,
            "the snapshot job (snapshot.num_actors x snapshot.num_cpus)": res.snapshot.num_actors * res.snapshot.num_cpus,
            "Stage 1 (stage1 workers x their CPUs)": res.stage1.cpus_needed,
        }
        if not MODES[self.segprop.mode].end_to_end:
            needs["Stage 2 (segment workers x their CPUs)"] = res.segment.cpus_needed
        job, need = max(needs.items(), key=lambda item: item[1])
        if need > res.num_cpus:
            raise ValueError(f"resources.num_cpus = {res.num_cpus} is too few: {job} needs {need:g} at once")
        return self

    @property
    def training_stages(self) -> list[str]:
        """The training stages this mode runs: ``e2e`` alone, or ``stage1`` and ``stage2``."""
        return ["e2e"] if MODES[self.segprop.mode].end_to_end else ["stage1", "stage2"]

    def training_for(self, stage: Literal["stage1", "stage2", "e2e"]) -> TrainingConfig:
        """The hyper-parameters of a stage: ``training`` with the Stage 1 overrides applied."""
        if stage != "stage1" or not self.stage1:
            return self.training
        return TrainingConfig.model_validate({**self.training.model_dump(), **self.stage1})

    def check_against_model(self, num_layers: int) -> None:
        """Reject settings impossible for a model of ``num_layers`` decoder layers (one-line ValueError)."""
        p, r, mode = self.segprop.base_depth, self.segprop.effective_last_layers, self.segprop.mode
        if MODES[mode].end_to_end:
            return
        if p + r > num_layers - 2:
            raise ValueError(
                f"segprop.base_depth + segprop.last_layers = {p} + {r} leaves no middle layer in a "
                f"{num_layers}-layer model (need base_depth + last_layers <= {num_layers - 2})"
            )
        max_depth = self.exit.run.max_depth
        if max_depth is not None and max_depth < p:
            raise ValueError(f"exit.run.max_depth = {max_depth} is shallower than segprop.base_depth = {p}")
        exits = SegPropPlan.from_config(self.segprop, num_layers).exit_depths
        if max_depth is not None and max_depth < exits[-1] and max_depth not in exits:
            raise ValueError(f"exit.run.max_depth = {max_depth} is not a segment boundary with segprop.segment_layers "
                             f"= {self.segprop.segment_layers} (exits at {', '.join(map(str, exits))})")
