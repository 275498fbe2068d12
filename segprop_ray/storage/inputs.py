"""Input data files: paths, directories and globs on any fsspec URI, expanded and checked up front."""

from __future__ import annotations

from typing import Any

from segprop_ray.storage.errors import StorageError
from segprop_ray.storage.fs import resolve_filesystem, split_protocol

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


def expand_inputs(spec: str | list[str], storage_options: dict[str, Any] | None = None) -> list[str]:
    """Files named by ``spec`` (paths, directories or globs), as URIs; one-line error if an item matches nothing."""
    files: list[str] = []
    for item in [spec] if isinstance(spec, str) else spec:
        found = _expand_one(item, storage_options or {})
        if not found:
            raise StorageError(f"data input {item!r} matches no file")
        files += found
    return files


def _expand_one(item: str, storage_options: dict[str, Any]) -> list[str]:
    fs, path = resolve_filesystem(item, storage_options)
    protocol = split_protocol(item)[0]
    matches = fs.glob(path) if any(c in path for c in "*?[") else [path]
    files: list[str] = []
    for match in matches:
        if fs.isdir(match):
            files += sorted(p for p in fs.find(match) if not p.rsplit("/", 1)[-1].startswith((".", "_")))
        elif fs.exists(match):
            files.append(match)
    return [f if protocol == "file" else f"{protocol}://{f}" for f in files]


def input_format(files: list[str], configured: str) -> str:
    """The input format: as configured, else from the first file's extension (jsonl, parquet, else text)."""
    if configured != "auto":
        return configured
    name = files[0].rsplit("/", 1)[-1]
    suffix = "." + name.rsplit(".", 1)[-1].lower() if "." in name else ""
    return FORMATS.get(suffix, "text")
