"""Exporting the model that exits at depth K as a standard Hugging Face directory (any fsspec URI)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from segprop_ray.core.assemble import exit_config, exit_state_dict, write_model_dir
from segprop_ray.core.parts import ModelParts
from segprop_ray.core.plan import exit_is_tied
from segprop_ray.core.weights import ChainSource, SafetensorsSource
from segprop_ray.storage.errors import StorageError
from segprop_ray.storage.fs import publish_dir
from segprop_ray.storage.layout import RunLayout
from segprop_ray.storage.manifest import Manifest, ManifestStore
from segprop_ray.storage.models import resolve_model_dir
from segprop_ray.storage.weights_store import EMBED_FILE, WeightStore, exit_file, layer_file


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
                 extra_files: dict[str, str] | None = None) -> tuple[int, str]:
    """Write the model exiting at ``depth`` to ``out`` (local path or URI); returns ``(depth, out)``."""
    layout, manifest = open_run(run_dir, storage_options)
    depth = choose_depth(manifest, depth)
    model_dir = resolve_model_dir(manifest.model.uri, storage_options)
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(model_dir)
    parts = ModelParts(hf_config)
    plan = manifest.plan()
    files = manifest.committed_files()
    needed = [EMBED_FILE] + [layer_file(i) for i in range(depth + 1)]
    store = WeightStore(layout)
    committed = store.source({p: files[p] for p in needed})
    exit_weights = store.source({exit_file(depth): files[exit_file(depth)]})
    state = exit_state_dict(plan, parts.layout, depth, _all(committed), _all(exit_weights),
                            tied=exit_is_tied(plan, depth, parts.tied))
    metadata = {"depth": depth, "base_model": manifest.model.uri, "run_id": manifest.run_id, "mode": manifest.mode,
                "eval_loss": manifest.layer(depth).eval_loss}
    publish_dir(out, storage_options,
                lambda local: _write_dir(local, hf_config, plan, depth, state, model_dir, metadata, extra_files))
    return depth, out


def _all(source: SafetensorsSource | ChainSource) -> dict:
    return {name: source.get(name) for name in source.keys()}


def _write_dir(local: Path, hf_config, plan, depth, state, model_dir, metadata, extra_files) -> list[str]:
    write_model_dir(local, exit_config(hf_config, plan, depth), state, tokenizer_dir=model_dir, metadata=metadata)
    for name, text in (extra_files or {}).items():
        (local / name).write_text(text)
    return sorted(file.name for file in local.iterdir() if file.is_file())
