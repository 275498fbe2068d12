"""Exporting the model that exits at depth K as a standard Hugging Face directory (any fsspec URI), streamed
shard by shard (:mod:`segprop_ray.reporting.export_stream`)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from segprop_ray.core.assemble import exit_config, write_model_files
from segprop_ray.core.parts import ModelParts
from segprop_ray.core.plan import exit_is_tied
from segprop_ray.core.weights import SafetensorsSource
from segprop_ray.reporting.export_stream import INDEX_NAME, ShardPlan, plan_shards, write_index, write_shards
from segprop_ray.storage.errors import StorageError
from segprop_ray.storage.fs import publish_dir, resolve_filesystem, scratch_dir
from segprop_ray.storage.layout import RunLayout
from segprop_ray.storage.manifest import Manifest, ManifestStore
from segprop_ray.storage.models import TOKENIZER_FILE_PATTERNS, resolve_model_dir
from segprop_ray.storage.weights_store import EMBED_FILE, WeightStore, exit_file, layer_file, safetensors_sizes


def open_run(run_dir: str, storage_options: dict[str, Any] | None = None) -> tuple[RunLayout, Manifest]:
    """The layout and manifest of an existing run (one-line error if there is none)."""
    layout = RunLayout.open(run_dir, storage_options)
    manifest = ManifestStore(layout).read()
    if manifest is None:
        raise StorageError(f"{layout.describe()} holds no segprop run (no manifest.json)")
    return layout, manifest


def best_depth(manifest: Manifest) -> int:
    """The committed exit with the lowest eval loss (the shallower one on ties)."""
    depths = manifest.committed_depths()
    if not depths:
        raise StorageError("the run has no committed exit yet")
    return min(depths, key=lambda d: (manifest.layer(d).eval_loss, d))


DEPTH_NAMES = ("best", "final")
"""The named depths ``choose_depth`` takes besides a committed depth: lowest eval loss, the run's final exit."""


def parse_depth(depth: str | int | None) -> str | int | None:
    """``best``, ``final``, None or an integer depth (as text or int); a one-line ValueError for anything else."""
    if depth is None or depth in DEPTH_NAMES or (isinstance(depth, int) and not isinstance(depth, bool)):
        return depth
    try:
        return int(str(depth).strip())
    except ValueError:
        raise ValueError(f"depth {depth!r} is not valid: use a committed depth (an integer), "
                         f"{' or '.join(repr(name) for name in DEPTH_NAMES)}") from None


def choose_depth(manifest: Manifest, depth: str | int | None) -> int:
    """``best``, ``final`` (None) or a committed depth; one-line error for an uncommitted one."""
    depth = parse_depth(depth)
    committed = manifest.committed_depths()
    if depth in (None, "final", "best") and not committed:
        raise StorageError("the run has no committed exit yet")
    if depth in (None, "final"):
        return manifest.final_depth if manifest.final_depth is not None else max(committed)
    if depth == "best":
        return best_depth(manifest)
    if int(depth) not in committed:
        raise StorageError(f"exit {depth} is not committed; committed exits: {committed}")
    return int(depth)


def export_model(run_dir: str, out: str, depth: str | int | None = None, storage_options: dict[str, Any] | None = None,
                 extra_files: dict[str, str] | None = None, model_source: str | None = None,
                 memory_budget: int | None = None) -> tuple[int, str]:
    """Write the model exiting at ``depth`` to ``out`` (local path or URI) as sharded safetensors with HF's index,
    one shard (a decoder layer, the embeddings, the head) in memory at a time; returns ``(depth, out)``.

    ``model_source``: where the input model's config and tokenizer are read (the run's staged copy; default the
    manifest's model). ``memory_budget`` (bytes): refuse, before writing, an export whose largest shard exceeds it.
    """
    layout, manifest = open_run(run_dir, storage_options)
    depth = choose_depth(manifest, depth)
    model_dir = resolve_model_dir(model_source or manifest.model.uri, storage_options, patterns=TOKENIZER_FILE_PATTERNS)
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(model_dir)
    plan = manifest.plan()
    files = manifest.committed_files()
    needed = {path: files[path] for path in [EMBED_FILE, *map(layer_file, range(depth + 1)), exit_file(depth)]}
    parts = ModelParts(hf_config)
    arch, tied = parts.layout, exit_is_tied(plan, depth, parts.tied)
    shards = plan_shards(arch, {path: safetensors_sizes(layout, path) for path in needed}, exit_file(depth),
                         head_with_embedding=tied)
    _check_budget(shards, memory_budget, depth)
    metadata = {"depth": depth, "base_model": manifest.model.uri, "run_id": manifest.run_id, "mode": manifest.mode,
                "eval_loss": manifest.layer(depth).eval_loss}

    def put(local: Path) -> None:
        publish_dir(out, storage_options, lambda directory: [_moved(local, directory)])

    _clear_weights(out, storage_options)
    with tempfile.TemporaryDirectory(prefix="segprop-export-", dir=scratch_dir()) as tmp:
        work = Path(tmp)
        sources = _FetchedFiles(WeightStore(layout, work / "fetched"), needed)
        write_shards(shards, plan, arch, depth, sources.open, put, work, done_with=sources.drop, tied=tied)
        put(write_index(shards, work))
        publish_dir(out, storage_options, lambda directory: _model_files(directory, exit_config(hf_config, plan, depth),
                                                                         model_dir, metadata, extra_files))
    return depth, out


def _check_budget(shards: ShardPlan, budget: int | None, depth: int) -> None:
    if budget is not None and shards.largest > budget:
        raise StorageError(f"exit {depth}: its largest shard is {shards.largest / 2**30:.2f} GiB, more than the "
                           f"export's memory budget of {budget / 2**30:.2f} GiB (resources.export.memory_gb)")


def _clear_weights(out: str, storage_options: dict[str, Any] | None) -> None:
    """Remove the weight files of an earlier export to ``out`` (another shard count would leave stale shards)."""
    fs, path = resolve_filesystem(out, storage_options)
    for name in fs.glob(f"{path}/model*.safetensors") + fs.glob(f"{path}/{INDEX_NAME}"):
        fs.rm_file(name)


class _FetchedFiles:
    """Committed files fetched (and hash-checked) on first use into a private cache, removed when done with."""

    def __init__(self, store: WeightStore, files: dict[str, str]):
        self.store, self.files, self.opened = store, files, {}

    def open(self, path: str) -> SafetensorsSource:
        """The tensors of committed file ``path``."""
        if path not in self.opened:
            self.opened[path] = SafetensorsSource([self.store.fetch(path, self.files[path])])
        return self.opened[path]

    def drop(self, path: str) -> None:
        """Forget ``path`` and delete its local copy."""
        self.opened.pop(path, None)
        (self.store.cache_dir / f"{self.files[path]}.safetensors").unlink(missing_ok=True)


def _moved(local: Path, directory: Path) -> str:
    if local.parent != directory:
        directory.mkdir(parents=True, exist_ok=True)
        shutil.move(str(local), directory / local.name)
    return local.name


def _model_files(local: Path, config, model_dir, metadata, extra_files) -> list[str]:
    before = {file.name for file in local.iterdir()} if local.is_dir() else set()
    write_model_files(local, config, tokenizer_dir=model_dir, metadata=metadata)
    for name, text in (extra_files or {}).items():
        (local / name).write_text(text)
    return sorted(file.name for file in local.iterdir() if file.is_file() and file.name not in before)
