"""Resolving the ``model`` setting to a local Hugging Face model directory on this node.

``model`` is a local directory, a remote directory on any fsspec URI (``s3://bucket/models/x``,
copied once into a local cache), a Hugging Face hub id (fetched through ``huggingface_hub``'s
own cache), or a ``.gguf`` file (local or remote, converted once into a local directory:
:mod:`segprop_ray.storage.gguf`). Only config, tokenizer and safetensors files are fetched; pickled
weights never are.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from segprop_ray.storage import node_cache
from segprop_ray.storage.errors import StorageError, one_line
from segprop_ray.storage.fs import cache_root, redact_uri, resolve_filesystem, split_protocol
from segprop_ray.storage.gguf import gguf_model_dir, is_gguf

MODEL_FILE_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model", "*.jinja")
"""What a model directory is made of here: config, tokenizer and safetensors weights."""
TOKENIZER_FILE_PATTERNS = ("*.json", "*.txt", "*.model", "*.jinja")
"""What loading the tokenizer (and config) needs: no weights."""
CONFIG_FILE_PATTERNS = ("config.json",)


def resolve_model_dir(model: str, storage_options: dict[str, Any] | None = None, cache_dir: str | Path | None = None,
                      patterns: tuple[str, ...] = MODEL_FILE_PATTERNS) -> Path:
    """A local directory holding ``model``'s files matching ``patterns`` (default: config, tokenizer, weights).

    Remote files are fetched once per node and pattern set: concurrent callers (several actors on one node)
    take the entry's file lock, one fetches into a private directory and publishes it by a rename (no reader
    ever sees a partly written file), the others wait and then use it.
    """
    if is_gguf(model):  # converted once per node: config and tokenizer, and the weights when asked for
        return gguf_model_dir(model, storage_options, cache_dir, weights=any("safetensors" in p for p in patterns))
    protocol, path = split_protocol(model)
    if protocol == "file":
        local = Path(path)
        if local.is_dir():
            return _checked(local, model)
        if model.startswith((".", "/", "~")) or "://" in model or model.count("/") > 1:
            raise StorageError(f"model directory not found: {model}")
        return _from_hub(model, patterns)
    return _checked(_from_fsspec(model, storage_options, cache_dir, patterns), model)


def model_config_dir(model: str, storage_options: dict[str, Any] | None = None,
                     cache_dir: str | Path | None = None) -> Path:
    """A local directory holding ``model``'s ``config.json`` (enough to plan a run), without fetching weights.

    A remote directory must also list safetensors weights; a hub model's are first fetched by the workers.
    """
    protocol, _ = split_protocol(model)
    if protocol != "file" and not is_gguf(model):
        fs, root = _remote(model, storage_options)
        if not any(name.endswith(".safetensors") for name in _listing(fs, root, model)):
            raise StorageError(f"model {redact_uri(model)}: no safetensors weights found")
    return resolve_model_dir(model, storage_options, cache_dir, CONFIG_FILE_PATTERNS)


def _checked(local: Path, model: str) -> Path:
    if not (local / "config.json").is_file():
        raise StorageError(f"model {redact_uri(model)} has no config.json: not a Hugging Face model directory")
    return local


def _remote(model: str, storage_options: dict[str, Any] | None) -> tuple[Any, str]:
    try:
        return resolve_filesystem(model, storage_options)
    except Exception as error:  # noqa: BLE001 - one line naming the model
        raise StorageError(f"model {redact_uri(model)} could not be read: {one_line(error)}") from None


def _listing(fs: Any, root: str, model: str, detail: bool = False) -> list[Any]:
    try:
        fs.invalidate_cache(root)  # this process may have listed it before it was written again
        return fs.ls(root, detail=detail)
    except Exception as error:  # noqa: BLE001 - one line naming the model
        raise StorageError(f"model {redact_uri(model)} could not be read: {one_line(error)}") from None


VERSION_FIELDS = ("ETag", "etag", "md5Hash", "crc32c", "generation", "LastModified", "updated", "mtime")
"""Fields of an fsspec listing entry that change when the object is replaced (S3, GCS, local files...)."""


def _from_fsspec(model: str, storage_options: dict[str, Any] | None, cache_dir: str | Path | None,
                 patterns: tuple[str, ...]) -> Path:
    fs, root = _remote(model, storage_options)
    entries = [entry for entry in _listing(fs, root, model, detail=True)
               if any(Path(entry["name"]).match(pat) for pat in patterns)]
    # the key names the files' versions too: a directory written again under the same URI (a model staged again after
    # --restart) is a new cache entry, never the copy a node fetched before
    versions = sorted((entry["name"].rsplit("/", 1)[-1], entry.get("size"),
                       [str(entry.get(field)) for field in VERSION_FIELDS if field in entry]) for entry in entries)
    key = hashlib.sha256(repr((model, patterns, versions)).encode()).hexdigest()[:16]
    target = Path(cache_dir or cache_root() / "models") / key
    if _cached(target):
        return target
    with node_cache.entry_lock(target.parent / f".{key}.lock"):  # one process per node fetches, the others wait
        if _cached(target):  # fetched by another process while this one waited
            return target
        names = [entry["name"] for entry in entries]
        if not names:
            raise StorageError(f"model {redact_uri(model)}: no model files found")
        if cache_dir is not None:
            _fetch(fs, names, target, model)
        else:  # the node's cache: kept under its size limit, this fetch counted while it runs
            with node_cache.fetching(cache_root(), key, sum(int(entry.get("size") or 0) for entry in entries)):
                _fetch(fs, names, target, model)
    return target


def _cached(target: Path) -> bool:
    if (target / ".complete").is_file():
        node_cache.touch(target / ".complete")
        return True
    return False


def _fetch(fs: Any, names: list[str], target: Path, model: str) -> None:
    """Download ``names`` into a private directory and publish it as ``target``."""
    staging = target.parent / f".{target.name}.{uuid.uuid4().hex}"
    try:
        staging.mkdir(parents=True)
        for remote in names:
            fs.get_file(remote, str(staging / Path(remote).name))
        (staging / ".complete").write_text(model)
        _publish(staging, target)
    except Exception as error:  # noqa: BLE001 - one line naming the model
        raise StorageError(f"model {redact_uri(model)} could not be read: {one_line(error)}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish(staging: Path, target: Path) -> None:
    """Rename the finished ``staging`` directory to ``target``, unless another process already published it."""
    try:
        os.rename(staging, target)
    except OSError:
        if not (target / ".complete").is_file():  # a stale, unfinished target of an older version: replace it
            shutil.rmtree(target, ignore_errors=True)
            os.rename(staging, target)


def _from_hub(repo_id: str, patterns: tuple[str, ...] = MODEL_FILE_PATTERNS) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=list(patterns)))
    except Exception as error:  # noqa: BLE001 - offline, unknown id, gated model...
        raise StorageError(
            f"model {repo_id!r} is not a local directory and could not be fetched from the Hugging Face hub: "
            f"{one_line(error)}"
        ) from None
