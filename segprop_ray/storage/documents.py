"""Small JSON documents (manifest, commit markers) written atomically and read with a format-version check.

A reader never sees a torn document: on local disk the body goes to a temporary file in the same
directory, is fsynced and renamed over the target (``os.replace``); on an object store it is one PUT of
the whole body (a PUT is atomic: readers see the old object or the new one); on other filesystems it is
written beside the target and moved over it.

Every versioned document carries an envelope ``{"format": name, "format_version": N, "written_by":
"segprop_ray X"}``; reading one of another version fails with a one-line :class:`FormatVersionError`
that says what to do.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec

from segprop_ray import __version__
from segprop_ray.storage.errors import DocumentNotFound, FormatVersionError, StorageError
from segprop_ray.storage.fs import ensure_parent_dir, is_local, is_object_store, redact_uri

ENVELOPE_KEYS = ("format", "format_version", "written_by")
WRITTEN_BY = f"segprop_ray {__version__}"


def write_json_atomic(fs: fsspec.AbstractFileSystem, path: str, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` so that readers see either the previous document or this one, whole."""
    body = (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
    if is_local(fs):
        _replace_local_file(path, body)
    elif is_object_store(fs):
        fs.pipe_file(path, body)  # a single PUT
    else:
        temporary = f"{path}.tmp-{uuid.uuid4().hex}"
        ensure_parent_dir(fs, path)
        fs.pipe_file(temporary, body)
        fs.mv(temporary, path)


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    """The JSON document at ``path``; :class:`DocumentNotFound` if absent, :class:`StorageError` if unparsable."""
    where = describe_path(fs, path)
    try:
        body = fs.cat_file(path)
    except FileNotFoundError:
        raise DocumentNotFound(f"{where}: no such document") from None
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise StorageError(f"{where}: not a valid JSON document ({error})") from None


def describe_path(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """``path`` as a full URI, safe for messages."""
    return redact_uri(fs.unstrip_protocol(path))


@dataclass(frozen=True)
class DocumentFormat:
    """A named, versioned JSON document kind (e.g. ``DocumentFormat("segprop_ray.manifest", 1)``)."""

    name: str
    version: int

    def write(self, fs: fsspec.AbstractFileSystem, path: str, body: dict[str, Any]) -> None:
        """Write ``body`` atomically inside this format's envelope."""
        clash = [key for key in ENVELOPE_KEYS if key in body]
        if clash:
            raise ValueError(f"document body must not contain the envelope key(s) {clash}")
        envelope = {"format": self.name, "format_version": self.version, "written_by": WRITTEN_BY}
        write_json_atomic(fs, path, {**envelope, **body})

    def read(self, fs: fsspec.AbstractFileSystem, path: str) -> dict[str, Any]:
        """The body of the document at ``path`` (envelope removed), after checking name and version."""
        return self.unwrap(read_json(fs, path), describe_path(fs, path))

    def unwrap(self, document: Any, where: str) -> dict[str, Any]:
        """Check ``document``'s envelope against this format and return its body; one-line errors otherwise."""
        if not isinstance(document, dict) or "format_version" not in document:
            raise StorageError(f"{where}: not a segprop_ray document (no format_version)")
        if document.get("format") != self.name:
            raise StorageError(f"{where}: is a {document.get('format')!r} document, expected {self.name!r}")
        found, written_by = document["format_version"], document.get("written_by", "an unknown segprop_ray")
        if not isinstance(found, int):
            raise StorageError(f"{where}: format_version {found!r} is not an integer")
        if found > self.version:
            raise FormatVersionError(f"{where}: written by a newer segprop_ray ({written_by}), format {found} > "
                                     f"{self.version}: upgrade segprop_ray to read it")
        if found < self.version:
            raise FormatVersionError(f"{where}: format {found} < {self.version}: this version ({WRITTEN_BY}) cannot "
                                     f"read it; start a new run dir or use {written_by}")
        return {key: value for key, value in document.items() if key not in ENVELOPE_KEYS}


def _replace_local_file(path: str, body: bytes) -> None:
    """Temp file in the target's directory, fsync, ``os.replace``, fsync the directory."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=directory)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(body)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename is still atomic
        return
    try:
        os.fsync(handle)
    finally:
        os.close(handle)
