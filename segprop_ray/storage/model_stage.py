"""The input model staged once into the run directory, so no worker fetches it from its origin.

``<run_dir>/model/`` holds the model's config, tokenizer and safetensors files, copied one file at a
time from wherever ``model`` names (a local directory, any fsspec URI, or a Hugging Face hub id, whose
files come through ``huggingface_hub`` with ``HF_TOKEN`` for gated models); ``model/_STAGED`` is
written last and names the source and every file's size. A copy that is complete for the same source
is kept, so a resumed run stages nothing. Workers then read ``<run_dir>/model`` into their node-local
cache (:func:`segprop_ray.storage.models.resolve_model_dir`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from segprop_ray.storage.documents import DocumentFormat
from segprop_ray.storage.errors import DocumentNotFound, StorageError, one_line
from segprop_ray.storage.fs import redact_uri, resolve_filesystem, scratch_dir, split_protocol
from segprop_ray.storage.layout import RunLayout
from segprop_ray.storage.gguf import is_gguf
from segprop_ray.storage.models import MODEL_FILE_PATTERNS, resolve_model_dir

STAGED_DIR = "model"
STAGED_MARKER = "_STAGED"
STAGE_FORMAT = DocumentFormat("segprop_ray.staged_model", 1)


def staged_dir(layout: RunLayout) -> str:
    """``model/`` in the run directory (a path inside ``layout.fs``)."""
    return layout.join(STAGED_DIR)


def staged_copy(layout: RunLayout, model: str) -> dict[str, Any] | None:
    """The marker of a complete staged copy of ``model`` (every file there with its size), or None."""
    try:
        body = STAGE_FORMAT.read(layout.fs, f"{staged_dir(layout)}/{STAGED_MARKER}")
    except (DocumentNotFound, StorageError):
        return None
    if body.get("source") != model:
        return None
    layout.fs.invalidate_cache(staged_dir(layout))
    sizes = {entry["name"].rsplit("/", 1)[-1]: entry["size"] for entry in layout.fs.ls(staged_dir(layout), detail=True)}
    complete = all(sizes.get(name) == size for name, size in body.get("files", {}).items())
    return body if complete and body.get("files") else None


def stage_model(model: str, layout: RunLayout, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Copy ``model``'s files into ``model/`` of the run directory (unless a complete copy is there); returns the
    marker: ``{"source", "uri", "files": {name: size}, "bytes"}``."""
    existing = staged_copy(layout, model)
    if existing is not None:
        return existing
    target = staged_dir(layout)
    marker = f"{target}/{STAGED_MARKER}"
    if layout.fs.exists(marker):
        layout.fs.rm_file(marker)  # another source's copy: replaced file by file
    files: dict[str, int] = {}
    try:
        for name, local in _model_files(model, storage_options):
            files[name] = local.stat().st_size
            layout.fs.makedirs(target, exist_ok=True)
            layout.fs.put_file(str(local), f"{target}/{name}")
            local.unlink(missing_ok=True)  # one file on local disk at a time
    except StorageError:
        raise
    except Exception as error:  # noqa: BLE001 - one line naming the model
        raise StorageError(f"model {redact_uri(model)} could not be staged into {layout.describe()}: "
                           f"{one_line(error)}") from None
    if not any(name.endswith(".safetensors") for name in files):
        raise StorageError(f"model {redact_uri(model)}: no safetensors weights to stage")
    body = {"source": model, "uri": layout.uri(target), "files": files, "bytes": sum(files.values())}
    STAGE_FORMAT.write(layout.fs, marker, body)
    return body


def _wanted(name: str) -> bool:
    return any(Path(name).match(pattern) for pattern in MODEL_FILE_PATTERNS)


def _model_files(model: str, storage_options: dict[str, Any] | None) -> Iterator[tuple[str, Path]]:
    """``(name, local file)`` of each model file, one at a time, in a temporary directory (the caller may delete
    each file once copied: a local model's files are hard links or copies there)."""
    protocol, path = split_protocol(model)
    with tempfile.TemporaryDirectory(prefix="segprop-stage-", dir=scratch_dir()) as tmp:
        if is_gguf(model):  # the dequantized model directory, converted on this (CPU) node
            converted = resolve_model_dir(model, storage_options)
            for local in sorted(converted.iterdir()):
                if local.is_file() and _wanted(local.name):
                    yield local.name, _linked(local, Path(tmp) / local.name)
        elif protocol == "file" and Path(path).is_dir():
            for local in sorted(Path(path).iterdir()):
                if local.is_file() and _wanted(local.name):
                    yield local.name, _linked(local, Path(tmp) / local.name)
        elif protocol == "file":  # not a directory: a hub id
            yield from _hub_files(model, Path(tmp))
        else:
            fs, root = resolve_filesystem(model, storage_options)
            for remote in sorted(fs.ls(root, detail=False)):
                name = remote.rsplit("/", 1)[-1]
                if _wanted(name):
                    fs.get_file(remote, str(Path(tmp) / name))
                    yield name, Path(tmp) / name


def _linked(source: Path, target: Path) -> Path:
    try:
        os.link(source, target)
    except OSError:  # another filesystem
        shutil.copy2(source, target)
    return target


def _hub_files(repo_id: str, tmp: Path) -> Iterator[tuple[str, Path]]:
    from huggingface_hub import HfApi, hf_hub_download

    for name in sorted(n for n in HfApi().list_repo_files(repo_id) if "/" not in n and _wanted(n)):
        yield name, Path(hf_hub_download(repo_id, name, local_dir=tmp / "hub"))
