"""The run manifest: the driver's only state, read at start and rewritten atomically after every step.

Everything a restarted driver needs to continue, and everything ``segprop status`` shows, is here:
which steps are done, what each committed layer's file hash is, the metrics and decisions of each
iteration, and the URIs of what was written.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field

from segprop_ray.core.adapter_spec import LoraSpec
from segprop_ray.core.plan import SegPropPlan, iteration_order
from segprop_ray.storage.documents import DocumentFormat
from segprop_ray.storage.errors import DocumentNotFound
from segprop_ray.storage.layout import RunLayout

MANIFEST_FORMAT = DocumentFormat("segprop_ray.manifest", 1)
Status = Literal["pending", "running", "done", "failed"]


def now() -> str:
    """The current UTC time, ISO 8601."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StepRecord(_Record):
    """One step of the pipeline (tokenize, a snapshot depth, export...)."""

    status: Status = "pending"
    started: str | None = None
    finished: str | None = None
    wall_s: float | None = None
    attempts: int = 0
    outputs: dict[str, Any] = Field(default_factory=dict)
    error: str | None = None


class LayerRecord(_Record):
    """An iteration: Stage 1 (the base depth), a Stage 2 segment (its last layer's depth), or the whole E2E run.
    Kept under its key: the depth, or ``<depth>-attn`` for the attention half of a layer trained in halves."""

    depth: int
    stage: Literal["stage1", "stage2", "e2e"]
    part: Literal["layer", "attn", "mlp"] = "layer"
    """What it trained of its layers: whole layers, or the attention / MLP half of layer ``depth``."""
    first: int | None = None
    """First middle layer of a Stage 2 segment (``depth`` for a one-layer segment)."""
    label: str | None = None
    """How it is shown: ``layers 3-4``, ``layer 5 attn``, ``Stage 1 (layers 0..2 + LL)``."""
    status: Status = "pending"
    steps: int = 0
    train_loss: float | None = None
    eval_loss: float | None = None
    perplexity: float | None = None
    decision: dict[str, Any] | None = None
    kept_step: int | None = None
    """The step whose weights were committed: the best evaluation's with ``load_best_model_at_end``, else the last."""
    history: list[dict[str, float]] = Field(default_factory=list)
    files: dict[str, str] = Field(default_factory=dict)
    """Committed files (run-dir relative path) -> sha256."""
    exit_file: str | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    """tokens, tokens_per_s, wall_s, peak_memory_bytes, data_wait_share, resumed_from_step..."""
    started: str | None = None
    finished: str | None = None


class ModelInfo(_Record):
    """What the input model is."""

    uri: str
    architecture: str
    family: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    tied_embeddings: bool
    untied: bool = False
    """True when the run's Stage 2 exits train their own copy of a head tied to the embeddings (Stage 1 and E2E
    train it tied, as one tensor with the embedding)."""


class Manifest(_Record):
    """The state of a run."""

    run_id: str
    created: str = Field(default_factory=now)
    config_hash: str
    config: dict[str, Any] = Field(default_factory=dict)
    """The settings the hash covers (the run's meaning, not where it runs), to name what changed."""
    state: Literal["running", "done", "failed"] = "running"
    mode: str
    base_depth: int
    last_layers: int
    segment_layers: int = 1
    """Middle layers per Stage 2 iteration."""
    granularity: str = "layer"
    """``layer`` or ``sublayer`` (attention and MLP halves as iterations of their own)."""
    adapter: dict[str, Any] | None = None
    """The LoRA adapter trained instead of full weights (``r``, ``alpha``, ``dropout``, ``target_modules``), if any."""
    model: ModelInfo
    group_size: int
    tokens: dict[str, dict[str, Any]] = Field(default_factory=dict)
    examples: dict[str, dict[str, int]] = Field(default_factory=dict)
    """Per input stream (``train``, and ``eval`` when separate): examples (documents) read, ``truncated`` to
    ``seq_len``, ``dropped`` (no target token left within ``seq_len``)."""
    steps: dict[str, StepRecord] = Field(default_factory=dict)
    layers: dict[str, LayerRecord] = Field(default_factory=dict)
    decisions: list[dict[str, Any]] = Field(default_factory=list)
    baseline: dict[str, Any] | None = None
    """The input model's own scores on the evaluation data (eval_loss, perplexity, accuracy)."""
    final_depth: int | None = None
    error: str | None = None
    updated: str | None = None
    """When the manifest was last written (a running driver writes it at least every step, and every 10 s
    while an iteration trains)."""

    def plan(self) -> SegPropPlan:
        """The run's layer plan, as it was made from the config."""
        adapter = None
        if self.adapter is not None:
            targets = self.adapter.get("target_modules")
            adapter = LoraSpec(**{**self.adapter, "target_modules": tuple(targets) if isinstance(targets, list) else targets})
        return SegPropPlan(self.model.num_layers, self.base_depth, self.last_layers, self.mode, self.segment_layers,
                           self.granularity, adapter)

    def layer(self, depth: int) -> LayerRecord | None:
        """The record of ``depth``, if any."""
        return self.layers.get(str(depth))

    def committed_depths(self) -> list[int]:
        """Exit depths whose iteration is done, in order (an attention half is no exit)."""
        return sorted(rec.depth for rec in self.layers.values() if rec.status == "done" and rec.part != "attn")

    def records(self) -> list[LayerRecord]:
        """Every iteration record in the order the iterations run."""
        return [self.layers[key] for key in sorted(self.layers, key=iteration_order)]

    def committed_files(self) -> dict[str, str]:
        """Every committed file of the run: run-relative path -> sha256."""
        files: dict[str, str] = {}
        for record in self.records():
            if record.status == "done":
                files.update(record.files)
        return files

    def step(self, name: str) -> StepRecord:
        """The record of step ``name``, created pending if new."""
        return self.steps.setdefault(name, StepRecord())

    def record_progress(self, key: int | str, record: dict[str, Any]) -> None:
        """A running iteration's (by depth or key) latest posted ``step``, step budget (``total``) and ``train_loss``."""
        layer = self.layers[str(key)]
        layer.steps = int(record.get("step", layer.steps))
        layer.metrics["total_steps"] = record.get("total")
        layer.train_loss = record.get("train_loss", layer.train_loss)

    def mark_failed(self, reason: str) -> None:
        """The run, and the step or iteration that was running, failed with ``reason`` (running again continues)."""
        self.state, self.error = "failed", reason
        for step in self.steps.values():
            if step.status == "running":
                step.status, step.error = "failed", reason
        for layer in self.layers.values():
            if layer.status == "running":
                layer.status = "failed"


class ManifestStore:
    """Reads and atomically writes ``manifest.json`` of a run directory."""

    def __init__(self, layout: RunLayout, guard: Callable[[], None] | None = None):
        self.layout = layout
        self.guard = guard
        """Called before every write (the driver's lease check: a driver taken over must not write)."""

    def exists(self) -> bool:
        """Whether the run directory has a manifest."""
        return self.layout.fs.exists(self.layout.manifest)

    def read(self) -> Manifest | None:
        """The manifest, or None for a new run directory (a wrong format version raises)."""
        try:
            body = MANIFEST_FORMAT.read(self.layout.fs, self.layout.manifest)
        except DocumentNotFound:
            return None
        return Manifest.model_validate(body)

    def write(self, manifest: Manifest) -> None:
        """Replace the manifest atomically (stamping :attr:`Manifest.updated`)."""
        if self.guard is not None:
            self.guard()
        manifest.updated = now()
        MANIFEST_FORMAT.write(self.layout.fs, self.layout.manifest, manifest.model_dump(mode="json"))

    def update(self, manifest: Manifest, change: Callable[[Manifest], None]) -> Manifest:
        """Apply ``change`` to ``manifest`` and persist it; returns the manifest."""
        change(manifest)
        self.write(manifest)
        return manifest
