"""Input data files: paths, directories and globs on any fsspec URI, expanded and checked up front."""

from __future__ import annotations

import json
from typing import Any

from segprop_ray.storage.errors import StorageError
from segprop_ray.storage.fs import resolve_filesystem, split_protocol

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


def expand_inputs(spec: str | list[str], storage_options: dict[str, Any] | None = None,
                  setting: str = "data input") -> list[str]:
    """Files named by ``spec`` (paths, directories or globs), as URIs; a one-line error naming the config
    ``setting`` if an item matches nothing."""
    files: list[str] = []
    for item in [spec] if isinstance(spec, str) else spec:
        found = _expand_one(item, storage_options or {})
        if not found:
            raise StorageError(f"{setting} {item!r} matches no file")
        twice = sorted(set(files) & set(found))
        if twice:
            raise StorageError(f"{setting} names {twice[0]} more than once (via {item!r}): list each file once")
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


def input_sizes(files: list[str], storage_options: dict[str, Any] | None = None) -> list[int]:
    """The byte size of each input file (what tells an input edited in place from the one a job started on)."""
    sizes = []
    for file in files:
        fs, path = resolve_filesystem(file, storage_options)
        sizes.append(int(fs.size(path)))
    return sizes


def input_format(files: list[str], configured: str) -> str:
    """The input format: as configured, else from the first file's extension (jsonl, parquet, else text)."""
    if configured != "auto":
        return configured
    name = files[0].rsplit("/", 1)[-1]
    suffix = "." + name.rsplit(".", 1)[-1].lower() if "." in name else ""
    return FORMATS.get(suffix, "text")


def check_text_field(files: list[str], fmt: str, text_field: str, storage_options: dict[str, Any] | None = None) -> None:
    """One-line error if the first file's records have no ``text_field`` (JSONL: the first record's keys;
    Parquet: the schema's columns; plain text has no fields). Reads one line or the Parquet footer only."""
    if fmt not in ("jsonl", "parquet"):
        return
    fs, path = resolve_filesystem(files[0], storage_options)
    fields = _parquet_columns(fs, path) if fmt == "parquet" else _first_record_keys(fs, path)
    if fields is not None and text_field not in fields:
        raise StorageError(f"data file {files[0]} has no {text_field!r} field (it has: {', '.join(fields[:8]) or 'none'}); "
                           "set data.text_field")


def _parquet_columns(fs: Any, path: str) -> list[str]:
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as handle:
        return list(pq.read_schema(handle).names)


def _first_record_keys(fs: Any, path: str) -> list[str] | None:
    """Keys of the first non-empty line's JSON object (None when it is not one: the reader will say so)."""
    with fs.open(path, "rb") as handle:
        for line in handle:
            if line.strip():
                try:
                    record = json.loads(line)
                except ValueError:
                    return None
                return list(record) if isinstance(record, dict) else None
    return None
