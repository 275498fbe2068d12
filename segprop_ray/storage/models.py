"""Resolving the ``model`` setting to a local Hugging Face model directory on this node.

``model`` is a local directory, a remote directory on any fsspec URI (``s3://bucket/models/x``,
copied once into a local cache), or a Hugging Face hub id (fetched through ``huggingface_hub``'s
own cache). Only config, tokenizer and safetensors files are fetched; pickled weights never are.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from segprop_ray.storage.errors import StorageError, one_line
from segprop_ray.storage.fs import cache_root, redact_uri, resolve_filesystem, split_protocol

MODEL_FILE_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model", "*.jinja")


def resolve_model_dir(model: str, storage_options: dict[str, Any] | None = None, cache_dir: str | Path | None = None) -> Path:
    """A local directory holding ``model``'s config, tokenizer and safetensors weights."""
    protocol, path = split_protocol(model)
    if protocol == "file":
        local = Path(path)
        if local.is_dir():
            return _checked(local, model)
        if model.startswith((".", "/", "~")) or "://" in model or model.count("/") > 1:
            raise StorageError(f"model directory not found: {model}")
        return _from_hub(model)
    return _checked(_from_fsspec(model, storage_options, cache_dir), model)


def model_config_dir(model: str, storage_options: dict[str, Any] | None = None,
                     cache_dir: str | Path | None = None) -> Path:
    """A local directory holding ``model``'s ``config.json`` (enough to plan a run), without fetching weights.

    A remote directory must also list safetensors weights; a hub id's weights are checked when fetched.
    """
    protocol, path = split_protocol(model)
    if protocol == "file":
        local = Path(path)
        if local.is_dir() or model.startswith((".", "/", "~")) or "://" in model or model.count("/") > 1:
            return resolve_model_dir(model, storage_options)  # local: nothing to fetch
        return _from_hub(model, patterns=("config.json",))
    target = Path(cache_dir or cache_root() / "models") / (hashlib.sha256(model.encode()).hexdigest()[:16] + "-config")
    try:
        fs, root = resolve_filesystem(model, storage_options)
        names = fs.ls(root, detail=False)
        if not any(name.endswith(".safetensors") for name in names):
            raise StorageError(f"model {redact_uri(model)}: no safetensors weights found")
        if not any(name.rsplit("/", 1)[-1] == "config.json" for name in names):
            raise StorageError(f"model {redact_uri(model)} has no config.json: not a Hugging Face model directory")
        target.mkdir(parents=True, exist_ok=True)
        fs.get_file(f"{root.rstrip('/')}/config.json", str(target / "config.json"))
    except StorageError:
        raise
    except Exception as error:  # noqa: BLE001 - one line naming the model
        raise StorageError(f"model {redact_uri(model)} could not be read: {one_line(error)}") from None
    return target


def _checked(local: Path, model: str) -> Path:
    if not (local / "config.json").is_file():
        raise StorageError(f"model {redact_uri(model)} has no config.json: not a Hugging Face model directory")
    return local


def _from_fsspec(model: str, storage_options: dict[str, Any] | None, cache_dir: str | Path | None) -> Path:
    cache = Path(cache_dir or cache_root() / "models")
    target = cache / hashlib.sha256(model.encode()).hexdigest()[:16]
    done = target / ".complete"
    if done.is_file():
        return target
    try:
        fs, root = resolve_filesystem(model, storage_options)
        names = [p for p in fs.ls(root, detail=False) if any(Path(p).match(pat) for pat in MODEL_FILE_PATTERNS)]
        if not names:
            raise StorageError(f"model {redact_uri(model)}: no model files found")
        target.mkdir(parents=True, exist_ok=True)
        for remote in names:
            fs.get_file(remote, str(target / Path(remote).name))
    except StorageError:
        raise
    except Exception as error:  # noqa: BLE001 - one line naming the model
        raise StorageError(f"model {redact_uri(model)} could not be read: {one_line(error)}") from None
    done.write_text(model)
    return target


def _from_hub(repo_id: str, patterns: tuple[str, ...] = MODEL_FILE_PATTERNS) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=list(patterns)))
    except Exception as error:  # noqa: BLE001 - offline, unknown id, gated model...
        raise StorageError(
            f"model {repo_id!r} is not a local directory and could not be fetched from the Hugging Face hub: "
            f"{one_line(error)}"
        ) from None
