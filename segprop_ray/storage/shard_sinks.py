"""Where a shard file's bytes go as they are made: hashed on the way, written without copying where possible.

:class:`HashedOutput` takes segments (headers, and views of the tensors' own memory) in file order. It
hashes them on a thread of its own while a sink stores them, so the sha256 is of exactly the bytes
written and costs no second pass. Sinks:

- :class:`LocalSink`: ``os.write`` of each segment into the file (no intermediate buffer), fsynced on close;
  an aborted file is removed.
- :class:`S3PartSink`: an S3 multipart upload whose parts (``part_bytes`` each) are uploaded by up to
  ``concurrency`` threads at once through s3fs's client (its retries included); a file smaller than one
  part is one PUT. Nothing exists under the key until the upload completes; an aborted one is aborted.
- :class:`FsspecSink`: any other fsspec filesystem, through its file object.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import sys
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import fsspec

from segprop_ray.storage.fs import ensure_parent_dir, is_local

MIB = 1 << 20


@dataclass(frozen=True)
class WriteOptions:
    """How shard files are written (from the run's ``snapcheck`` settings)."""

    upload_part_bytes: int = 64 * MIB
    """Bytes per S3 multipart part (S3 needs at least 5 MiB for all but the last)."""
    upload_concurrency: int = 4
    """S3 parts uploaded at once per file."""
    groups_in_flight: int = 1
    """Row groups a writer holds, queued, while it writes the one before (the caller goes on meanwhile)."""


class OrderedWorker:
    """Applies ``consume`` to queued items, in order, on its own thread (bounded queue); errors kept for
    :meth:`finish` or the next :meth:`put`."""

    def __init__(self, consume: Any, depth: int, name: str) -> None:
        self._consume, self._queue, self.error = consume, queue.Queue(maxsize=max(1, depth)), None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self.error is None:
                try:
                    self._consume(item)
                except BaseException as error:  # noqa: BLE001 - re-raised by put()/finish()
                    self.error = error

    def put(self, item: Any) -> None:
        """Queue ``item`` (blocks while the queue is full); raises an earlier item's error."""
        if self.error is not None:
            raise self.error
        self._queue.put(item)

    def finish(self, raise_error: bool = True) -> None:
        """Wait for the queued items; raise the first error (unless ``raise_error`` is False)."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if raise_error and self.error is not None:
            raise self.error


class HashedOutput:
    """Writes segments to a sink in order while a second thread sha256-hashes the same segments."""

    def __init__(self, sink: Any, depth: int = 8) -> None:
        self.sink, self.sha256, self.bytes_written = sink, hashlib.sha256(), 0
        self._hasher = OrderedWorker(self.sha256.update, depth, "segprop-shard-hash")

    def write(self, segment: bytes | memoryview) -> int:
        """Hash (queued) and store ``segment``; returns its length. The segment must stay unchanged until
        :meth:`finish`."""
        if len(segment):
            self._hasher.put(segment)
            self.sink.write(segment)
            self.bytes_written += len(segment)
        return len(segment)

    def finish(self) -> str:
        """Wait for the hash; its hex digest."""
        self._hasher.finish()
        return self.sha256.hexdigest()

    def abandon(self) -> None:
        """Stop the hashing thread, ignoring its errors."""
        self._hasher.finish(raise_error=False)


WRITEBACK_BYTES = 16 * MIB
"""A local sink asks the kernel to start writing its file out every this many bytes, so the fsync at the end
waits for the last few only (the disk works while later bytes are laid out and hashed)."""


def _sync_file_range() -> Any:
    """libc's ``sync_file_range`` (Linux), else None."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # the C library this process already has loaded
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return function


_SYNC_FILE_RANGE = _sync_file_range() if sys.platform.startswith("linux") else None
SYNC_FILE_RANGE_WRITE = 2  # start writeback of the range's dirty pages, do not wait


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing ``length`` bytes at ``offset`` of ``fd`` to disk, without waiting (a hint:
    nothing happens where ``sync_file_range`` is missing or fails; the fsync on close is what makes it durable)."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, length, SYNC_FILE_RANGE_WRITE)


class LocalSink:
    """A local file written with ``os.write`` straight from each segment's memory."""

    def __init__(self, path: str) -> None:
        self.path = path
        os.makedirs(os.path.dirname(path) or "/", exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._written = self._flushed = 0

    def write(self, segment: bytes | memoryview) -> None:
        """Write all of ``segment``; every :data:`WRITEBACK_BYTES` the kernel is asked to start writing them out."""
        view = memoryview(segment).cast("B")
        while len(view):
            done = os.write(self._fd, view)
            view, self._written = view[done:], self._written + done
        if self._written - self._flushed >= WRITEBACK_BYTES:
            start_writeback(self._fd, self._flushed, self._written - self._flushed)
            self._flushed = self._written

    def close(self) -> None:
        """fsync and close: the file is durable once this returns."""
        fd, self._fd = self._fd, -1
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def abort(self) -> None:
        """Close (unless closed already: the number may be another file's by now) and remove the file."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass
        if os.path.exists(self.path):
            os.unlink(self.path)


class S3PartSink:
    """An S3 object written as a multipart upload of fixed-size parts, several in flight at once."""

    def __init__(self, fs: Any, path: str, part_bytes: int, concurrency: int) -> None:
        if part_bytes < 5 * MIB:
            raise ValueError(f"S3 parts must be at least 5 MiB, got {part_bytes} bytes")
        self.fs, self.path, self.part_bytes = fs, path, part_bytes
        self.bucket, self.key, _ = fs.split_path(path)
        self._pool = ThreadPoolExecutor(max(1, concurrency), thread_name_prefix="segprop-s3-part")
        self._limit, self._pending, self._parts = max(1, concurrency), [], []
        self._buffer, self._fill, self._upload_id = bytearray(part_bytes), 0, None

    def write(self, segment: bytes | memoryview) -> None:
        """Copy ``segment`` into the current part; full parts go to the upload threads."""
        view = memoryview(segment).cast("B")
        while len(view):
            take = min(len(view), self.part_bytes - self._fill)
            self._buffer[self._fill : self._fill + take] = view[:take]
            self._fill, view = self._fill + take, view[take:]
            if self._fill == self.part_bytes:
                self._submit(self._buffer)
                self._buffer, self._fill = bytearray(self.part_bytes), 0

    def _submit(self, data: bytearray) -> None:
        if self._upload_id is None:
            self._upload_id = self.fs.call_s3("create_multipart_upload", Bucket=self.bucket, Key=self.key)["UploadId"]
        while len(self._pending) >= self._limit:  # at most `concurrency` parts held in memory besides this one
            self._collect(self._pending.pop(0))
        number = len(self._parts) + len(self._pending) + 1
        self._pending.append(self._pool.submit(self._upload, number, data))

    def _upload(self, number: int, data: bytearray) -> dict[str, Any]:
        out = self.fs.call_s3("upload_part", Bucket=self.bucket, Key=self.key, UploadId=self._upload_id,
                              PartNumber=number, Body=data)  # botocore takes the bytearray as it is
        return {"PartNumber": number, "ETag": out["ETag"]}

    def _collect(self, future: Future) -> None:
        self._parts.append(future.result())

    def close(self) -> None:
        """Upload what is left and complete the upload (or PUT the whole object if it is smaller than a part)."""
        del self._buffer[self._fill :]  # the last part: what was filled
        try:
            if self._upload_id is None:
                self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=self._buffer)
            else:
                if self._fill:
                    self._submit(self._buffer)
                for future in self._pending:
                    self._collect(future)
                self._pending = []
                self.fs.call_s3("complete_multipart_upload", Bucket=self.bucket, Key=self.key,
                                UploadId=self._upload_id, MultipartUpload={"Parts": self._parts})
        finally:
            self._pool.shutdown(wait=True)
        self.fs.invalidate_cache(self.path)

    def abort(self) -> None:
        """Abort the upload: nothing appears under the key."""
        for future in self._pending:
            future.cancel()
        self._pool.shutdown(wait=True)
        if self._upload_id is not None:
            try:
                self.fs.call_s3("abort_multipart_upload", Bucket=self.bucket, Key=self.key, UploadId=self._upload_id)
            except Exception:  # noqa: BLE001 - best effort: an unfinished upload is invisible anyway
                pass
        self.fs.invalidate_cache(self.path)


class FsspecSink:
    """Any other fsspec filesystem, through its own file object (which buffers and uploads as it does)."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str) -> None:
        self.fs, self.path = fs, path
        ensure_parent_dir(fs, path)
        self._file = fs.open(path, "wb")

    def write(self, segment: bytes | memoryview) -> None:
        """Hand ``segment`` to the file object."""
        self._file.write(segment)

    def close(self) -> None:
        """Close (commit) the file."""
        self._file.close()

    def abort(self) -> None:
        """Discard the file (an object store's upload is aborted) and remove what exists."""
        for step in (getattr(self._file, "discard", None), self._file.close):
            try:
                if step is not None:
                    step()
            except Exception:  # noqa: BLE001 - best effort: the file is being thrown away
                pass
        try:
            if self.fs.exists(self.path):
                self.fs.rm_file(self.path)
        except Exception:  # noqa: BLE001 - best effort
            pass


def open_sink(fs: fsspec.AbstractFileSystem, path: str, options: WriteOptions) -> Any:
    """The sink for ``path`` on ``fs``: the local disk, S3 (multipart, parallel parts) or another fsspec store."""
    if is_local(fs):
        return LocalSink(path)
    if type(fs).__name__ == "S3FileSystem" and hasattr(fs, "call_s3"):
        return S3PartSink(fs, path, options.upload_part_bytes, options.upload_concurrency)
    return FsspecSink(fs, path)
