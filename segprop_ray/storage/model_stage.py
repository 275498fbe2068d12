"""The input model staged once into the run directory, so no worker fetches it from its origin.

``<run_dir>/model/`` holds the model's config, tokenizer and safetensors files, copied one file at a
time from wherever ``model`` names (a local directory, any fsspec URI, or a Hugging Face hub id, whose
files come through ``huggingface_hub`` with ``HF_TOKEN`` for gated models); ``model/_STAGED`` is
written last and names the source, every file's size and sha256, the hub commit the files were taken at
(a hub model's revision is resolved once and every file fetched at that commit, so a push to the repo
during staging cannot mix two versions) and an ``identity`` digest of all that. A copy that is complete
for the same source is kept, so a resumed run stages nothing and reads what the first attempt staged even
if the origin has changed since. Workers then read ``<run_dir>/model`` into their node-local cache
(:func:`segprop_ray.storage.models.resolve_model_dir`).
"""

from __future__ import annotations

import hashlib
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
    marker: ``{"source", "uri", "files": {name: size}, "bytes", "sha256": {name: digest}, "revision", "identity"}``
    (``revision``: the hub commit the files were fetched at, None for a directory)."""
    existing = staged_copy(layout, model)
    if existing is not None:
        return existing
    target = staged_dir(layout)
    marker = f"{target}/{STAGED_MARKER}"
    if layout.fs.exists(marker):
        layout.fs.rm_file(marker)  # another source's copy: replaced file by file
    files: dict[str, int] = {}
    digests: dict[str, str] = {}
    try:
        revision = hub_revision(model) if _is_hub(model) else None
        for name, local in _model_files(model, storage_options, revision):
            files[name], digests[name] = local.stat().st_size, _sha256(local)
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
    body = {"source": model, "uri": layout.uri(target), "files": files, "bytes": sum(files.values()),
            "sha256": digests, "revision": revision, "identity": content_identity(digests, revision)}
    STAGE_FORMAT.write(layout.fs, marker, body)
    return body


def content_identity(digests: dict[str, str], revision: str | None) -> str:
    """What the staged model is, in one digest: every file's name and sha256, and the hub commit (if any)."""
    return hashlib.sha256(repr((sorted(digests.items()), revision)).encode()).hexdigest()


def hub_revision(repo_id: str) -> str:
    """The commit a Hugging Face hub model's default branch points at now (every staged file is fetched at it)."""
    from huggingface_hub import HfApi

    return str(HfApi().model_info(repo_id).sha)


def _is_hub(model: str) -> bool:
    protocol, path = split_protocol(model)
    return protocol == "file" and not is_gguf(model) and not Path(path).is_dir()


def _sha256(local: Path) -> str:
    digest = hashlib.sha256()
    with open(local, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _wanted(name: str) -> bool:
    return any(Path(name).match(pattern) for pattern in MODEL_FILE_PATTERNS)


def _model_files(model: str, storage_options: dict[str, Any] | None,
                 revision: str | None) -> Iterator[tuple[str, Path]]:
    """``(name, local file)`` of each model file, one at a time, in a temporary directory (the caller may delete
    each file once copied: a local model's files are hard links or copies there); a hub model's at ``revision``."""
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
            yield from _hub_files(model, str(revision), Path(tmp))
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


def _hub_files(repo_id: str, revision: str, tmp: Path) -> Iterator[tuple[str, Path]]:
    from huggingface_hub import HfApi, hf_hub_download

    names = HfApi().list_repo_files(repo_id, revision=revision)
    for name in sorted(n for n in names if "/" not in n and _wanted(n)):
        yield name, Path(hf_hub_download(repo_id, name, revision=revision, local_dir=tmp / "hub"))
