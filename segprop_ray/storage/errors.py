"""Errors of the storage layer: each one prints as a single line a user can act on."""

from __future__ import annotations


class StorageError(RuntimeError):
    """A run directory, document or shard cannot be used; the message is one line with the URI and the cause."""


class DocumentNotFound(StorageError, FileNotFoundError):
    """A document (manifest, marker) does not exist at the given path."""


class FormatVersionError(StorageError):
    """A document or shard was written in a format version this segprop_ray cannot read."""


def one_line(error: BaseException, limit: int = 300) -> str:
    """``TypeName: first line of the message``, cut to ``limit`` characters (for error messages and logs)."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text if len(text) <= limit else text[: limit - 3] + "..."
