"""Input data files: paths, directories and globs on any fsspec URI, expanded and checked up front."""

from __future__ import annotations

import json
from typing import Any, Iterator

from segprop_ray.storage.errors import StorageError
from segprop_ray.storage.fs import redact_uri, resolve_filesystem, split_protocol

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


def sample_records(file: str, fmt: str, fields: tuple[str, ...], limit: int,
                   storage_options: dict[str, Any] | None = None) -> Iterator[tuple[str, Any]]:
    """``(where, record)`` for the first ``limit`` records of ``file`` (``where``: ``file line N`` or ``file row N``);
    a JSONL line that does not parse gives a :class:`StorageError` naming it. Reads only what it yields."""
    fs, path = resolve_filesystem(file, storage_options)
    name = redact_uri(file)
    if fmt == "parquet":
        yield from ((f"{name} row {i + 1}", record) for i, record in enumerate(_parquet_records(fs, path, fields, limit)))
        return
    with fs.open(path, "rb") as handle:
        count = 0
        for number, line in enumerate(handle, start=1):
            if count >= limit:
                return
            if not line.strip():
                continue
            count += 1
            yield f"{name} line {number}", _parse_line(line, fmt, fields, f"{name} line {number}")


def _parse_line(line: bytes, fmt: str, fields: tuple[str, ...], where: str) -> Any:
    text = line.decode("utf-8", errors="replace")
    if fmt != "jsonl":
        return {fields[0]: text.rstrip("\n")}
    try:
        return json.loads(text)
    except ValueError as error:
        raise StorageError(f"{where}: not a JSON record ({error})") from None


def _parquet_records(fs: Any, path: str, fields: tuple[str, ...], limit: int) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        columns = list(fields) if set(fields) <= set(parquet.schema_arrow.names) else None  # all: the error shows them
        for batch in parquet.iter_batches(batch_size=min(limit, 1024), columns=columns):
            for record in batch.to_pylist():
                yield record
                limit -= 1
                if limit <= 0:
                    return


def read_chat_template(uri: str, storage_options: dict[str, Any] | None = None) -> str:
    """The text of a Jinja chat template file (local path or fsspec URI); one-line error if it cannot be read."""
    fs, path = resolve_filesystem(uri, storage_options)
    try:
        return fs.cat_file(path).decode()
    except (OSError, UnicodeDecodeError) as error:
        raise StorageError(f"data.chat_template {uri}: cannot be read ({error})") from None
