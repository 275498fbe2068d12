"""Where a driver lease document lives: conditional create, replace and delete of its bytes on one filesystem.

Each store deals in bodies and versions; a write or delete is conditional on the version read:

- local disk: create by hard link (atomic, fails if the name exists); replace and delete under an ``flock``
  of ``<lease>.lock``; the version is the body's sha256;
- S3: create with ``If-None-Match: *``; replace and delete with ``If-Match: <ETag>`` (the version is the
  ETag). A store that ignores ``If-Match`` on DELETE deletes unconditionally: the body is re-read and
  compared just before, which leaves a window of one round trip in which a successor's takeover can be
  deleted (that successor then finds no lease at its next renewal and stops writing);
- any other filesystem: the same steps without atomicity.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import uuid
from typing import Any, Iterator

from segprop_ray.storage.documents import describe_path
from segprop_ray.storage.errors import StorageError
from segprop_ray.storage.fs import S3_PROTOCOLS, ensure_parent_dir, is_local

log = logging.getLogger(__name__)


class LeaseConflict(Exception):
    """A conditional write found another version of the lease than the one expected."""


def store_for(fs: Any) -> "Store":
    """The lease store of filesystem ``fs`` (local disk, S3, or any other without conditional writes)."""
    if is_local(fs):
        return LocalStore(fs)
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    if any(p in S3_PROTOCOLS for p in protocols):
        return S3Store(fs)
    return Store(fs)


def _digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


class Store:
    """Lease documents on a filesystem without conditional writes: the same steps, not atomic."""

    def __init__(self, fs: Any):
        self.fs = fs

    def read(self, path: str) -> tuple[bytes, str] | None:
        """``(body, version)`` of the lease at ``path``, or None if there is none."""
        try:
            body = self.fs.cat_file(path)
        except FileNotFoundError:
            return None
        return body, _digest(body)

    def create(self, path: str, body: bytes) -> str:
        """Write ``body`` unless ``path`` exists (FileExistsError); returns the new version."""
        if self.fs.exists(path):
            raise FileExistsError(path)
        ensure_parent_dir(self.fs, path)
        self.fs.pipe_file(path, body)
        return _digest(body)

    def replace(self, path: str, body: bytes, version: str | None) -> str:
        """Write ``body`` if the lease at ``path`` is still ``version`` (LeaseConflict otherwise)."""
        self._expect(path, version)
        self.fs.pipe_file(path, body)
        return _digest(body)

    def delete(self, path: str, version: str | None) -> None:
        """Remove the lease if it is still ``version`` (LeaseConflict otherwise; FileNotFoundError if gone)."""
        self._expect(path, version)
        self.fs.rm_file(path)

    def _expect(self, path: str, version: str | None) -> None:
        current = self.read(path)
        if current is None:
            raise FileNotFoundError(path)
        if current[1] != version:
            raise LeaseConflict(describe_path(self.fs, path))


class LocalStore(Store):
    """Local disk: create by hard link (atomic, fails if the name exists); replace and delete under an ``flock``."""

    def create(self, path: str, body: bytes) -> str:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        temporary = self._write_temporary(path, body)
        try:
            os.link(temporary, path)
        finally:
            os.unlink(temporary)
        return _digest(body)

    def replace(self, path: str, body: bytes, version: str | None) -> str:
        with self._locked(path):
            self._expect(path, version)
            os.replace(self._write_temporary(path, body), path)
        return _digest(body)

    def delete(self, path: str, version: str | None) -> None:
        with self._locked(path):  # the lock a takeover's replace holds: no takeover between the check and the unlink
            self._expect(path, version)
            os.unlink(path)

    def _write_temporary(self, path: str, body: bytes) -> str:
        """``body`` written and synced to a new file beside ``path``; returns its name."""
        temporary = f"{path}.{uuid.uuid4().hex}.tmp"
        with open(temporary, "wb") as file:
            file.write(body)
            file.flush()
            os.fsync(file.fileno())
        return temporary

    @contextlib.contextmanager
    def _locked(self, path: str) -> Iterator[None]:
        with open(f"{path}.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


class S3Store(Store):
    """S3: create with ``If-None-Match: *``, replace and delete with ``If-Match: <ETag>`` (the version is the ETag)."""

    def read(self, path: str) -> tuple[bytes, str] | None:
        for _ in range(5):  # the body and the ETag from one version of the object
            try:
                before = self.fs.info(path, refresh=True)["ETag"]
                body = self.fs.cat_file(path)
                after = self.fs.info(path, refresh=True)["ETag"]
            except FileNotFoundError:
                return None
            if before == after:
                return body, before
        raise StorageError(f"{describe_path(self.fs, path)}: changing too fast to read")

    def create(self, path: str, body: bytes) -> str:
        return self.fs.pipe_file(path, body, mode="create")["ETag"]  # FileExistsError when it exists

    def replace(self, path: str, body: bytes, version: str | None) -> str:
        with _precondition(self.fs, path):
            return self.fs.pipe_file(path, body, IfMatch=version)["ETag"]

    def delete(self, path: str, version: str | None) -> None:
        self._expect(path, version)  # also where a store ignores If-Match on DELETE (see the module docstring)
        bucket, key, _ = self.fs.split_path(path)
        try:
            with _precondition(self.fs, path):
                self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=version)
        except FileNotFoundError:
            raise
        except OSError as error:  # not a 412 (that is a LeaseConflict by now): a store that refuses the header
            log.warning("conditional delete of %s refused (%s): deleting after the re-read", path, error)
            self.fs.rm_file(path)  # a store without conditional deletes: the re-read above is the check
        finally:
            self.fs.invalidate_cache(path)


def _is_precondition(error: BaseException) -> bool:
    """Whether ``error`` is S3's 412 PreconditionFailed (s3fs maps it to OSError(EINVAL))."""
    text = str(error).lower()
    return "pre-condition" in text or "precondition" in text


@contextlib.contextmanager
def _precondition(fs: Any, path: str) -> Iterator[None]:
    """Turn S3's 412 PreconditionFailed into :class:`LeaseConflict`."""
    try:
        yield
    except FileNotFoundError:
        raise
    except OSError as error:
        if _is_precondition(error):
            raise LeaseConflict(describe_path(fs, path)) from None
        raise
