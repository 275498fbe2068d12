"""Filesystems for run directories: any fsspec URI plus ``storage_options``, for fsspec and for pyarrow.

S3 settings come from the standard AWS environment and config (credentials, ``AWS_PROFILE``, instance
roles are left to botocore / the AWS C++ SDK); ``storage_options`` override them. The endpoint is the one
setting resolved here explicitly (``AWS_ENDPOINT_URL_S3`` before ``AWS_ENDPOINT_URL``), because pyarrow's
S3 client ignores those variables (apache/arrow#49643) and a filesystem pickled to a Ray worker on another
node should talk to the same endpoint as the driver. Credentials never appear in messages: use
:func:`redact_uri` / :func:`describe_storage` for anything that is logged.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import fsspec
import pyarrow.fs as pafs
from fsspec.implementations.local import LocalFileSystem

from segprop_ray.storage.errors import StorageError, one_line

S3_PROTOCOLS = ("s3", "s3a")
LOCAL_PROTOCOLS = ("file", "local")
OBJECT_STORE_PROTOCOLS = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss")
_SECRET_NAME = re.compile(r"secret|token|password|passwd|key|credential|signature|^sig$", re.IGNORECASE)
# storage_options that pyarrow's native S3FileSystem can express; anything else goes through s3fs.
_PYARROW_S3_OPTIONS = {"endpoint_url", "key", "secret", "token", "anon", "region", "region_name",
                       "client_kwargs", "use_listings_cache"}


def split_protocol(uri: str) -> tuple[str, str]:
    """``(protocol, rest)`` of a URI; a plain path is ``("file", absolute path)``."""
    if "://" not in uri:
        return "file", os.path.abspath(os.path.expanduser(uri))
    protocol, rest = uri.split("://", 1)
    protocol = protocol.lower()
    if protocol in LOCAL_PROTOCOLS:
        return "file", os.path.abspath(rest)
    return protocol, rest


def resolve_filesystem(uri: str,
                       storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and the path inside it (no protocol, no trailing slash) for ``uri``."""
    protocol, rest = split_protocol(uri)
    options = dict(storage_options or {})
    if protocol == "file":
        return LocalFileSystem(auto_mkdir=True), rest.rstrip("/") or "/"
    if protocol in S3_PROTOCOLS:
        import s3fs

        return s3fs.S3FileSystem(**s3fs_options(options)), rest.strip("/")
    fs, path = fsspec.core.url_to_fs(uri, **options)
    return fs, path.rstrip("/")


def s3_endpoint(storage_options: dict[str, Any] | None = None) -> str | None:
    """The S3 endpoint: storage_options, else ``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL``, else None (AWS)."""
    options = storage_options or {}
    explicit = options.get("endpoint_url") or (options.get("client_kwargs") or {}).get("endpoint_url")
    if explicit:
        return explicit
    if os.environ.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").lower() == "true":
        return None
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_region(storage_options: dict[str, Any] | None = None) -> str | None:
    """The S3 region: storage_options (``region`` / ``client_kwargs.region_name``), else ``AWS_REGION`` /
    ``AWS_DEFAULT_REGION`` (botocore itself reads only the latter)."""
    options = storage_options or {}
    client_region = (options.get("client_kwargs") or {}).get("region_name")
    explicit = options.get("region") or options.get("region_name") or client_region
    return explicit or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None


def s3fs_options(storage_options: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments for ``s3fs.S3FileSystem``: the user's options with endpoint and region made explicit."""
    options = {"use_listings_cache": False, **storage_options}
    options.pop("region", None)
    options.pop("region_name", None)
    client_kwargs = {k: v for k, v in (options.pop("client_kwargs", None) or {}).items() if k != "endpoint_url"}
    region, endpoint = s3_region(storage_options), s3_endpoint(storage_options)
    if region:
        client_kwargs["region_name"] = region
    if endpoint:
        options["endpoint_url"] = endpoint
    options["client_kwargs"] = client_kwargs
    return options


def resolve_pyarrow_filesystem(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[pafs.FileSystem, str]:
    """A ``pyarrow.fs`` filesystem and path (``bucket/prefix`` for S3, no ``s3://``) for ``uri``.

    This is what Ray Train's ``RunConfig(storage_filesystem=fs, storage_path=path)`` and Ray Data's
    ``filesystem=`` take. S3 uses pyarrow's native client with the endpoint passed explicitly; options it
    cannot express (e.g. ``profile``) fall back to s3fs wrapped in ``pyarrow.fs.FSSpecHandler``.
    """
    protocol, rest = split_protocol(uri)
    options = dict(storage_options or {})
    if protocol == "file":
        return pafs.LocalFileSystem(), rest.rstrip("/") or "/"
    if protocol in S3_PROTOCOLS and set(options) <= _PYARROW_S3_OPTIONS:
        return _pyarrow_s3(options), rest.strip("/")
    fs, path = resolve_filesystem(uri, options)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def _pyarrow_s3(options: dict[str, Any]) -> pafs.S3FileSystem:
    kwargs: dict[str, Any] = {}
    endpoint = s3_endpoint(options)
    if endpoint:
        parsed = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs.update(endpoint_override=parsed.netloc + parsed.path.rstrip("/"), scheme=parsed.scheme)
    region = s3_region(options)
    if region:
        kwargs["region"] = region
    for ours, theirs in (("key", "access_key"), ("secret", "secret_key"), ("token", "session_token")):
        if options.get(ours):
            kwargs[theirs] = options[ours]
    if options.get("anon"):
        kwargs["anonymous"] = True
    return pafs.S3FileSystem(**kwargs)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether ``fs`` is the local disk (where os.replace/fsync apply)."""
    return isinstance(fs, LocalFileSystem)


def is_object_store(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether ``fs`` is an object store (no directories; a single PUT is atomic)."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return any(p in OBJECT_STORE_PROTOCOLS for p in protocols)


def ensure_parent_dir(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Create the directory holding ``path`` where directories exist (not on object stores: s3fs would create
    a missing bucket)."""
    if not is_object_store(fs):
        fs.makedirs(path.rsplit("/", 1)[0] or "/", exist_ok=True)


def file_sha256(fs: fsspec.AbstractFileSystem, path: str | Path, chunk_bytes: int = 16 << 20) -> str:
    """sha256 of a file on ``fs`` (a local one: ``LocalFileSystem()``), streamed in chunks."""
    digest = hashlib.sha256()
    with fs.open(str(path), "rb", **({} if is_local(fs) else {"cache_type": "none"})) as file:
        while chunk := file.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def publish_dir(out: str, storage_options: dict[str, Any] | None,
                build: Callable[[Path], list[str]]) -> dict[str, str]:
    """Have ``build`` write files into a local directory and return their names; returns name -> location.

    A local ``out`` is that directory itself; for any other URI ``build`` writes into a temporary
    directory whose files are then copied to ``out``.
    """
    protocol, path = split_protocol(out)
    if protocol == "file":
        names = build(Path(path))
        return {name: str(Path(path) / name) for name in names}
    fs, remote = resolve_filesystem(out, storage_options)
    with tempfile.TemporaryDirectory() as tmp:
        names = build(Path(tmp))
        for name in names:
            fs.put_file(str(Path(tmp) / name), f"{remote}/{name}")
    return {name: f"{out.rstrip('/')}/{name}" for name in names}


def cache_root() -> Path:
    """This node's local cache of fetched models and weights: ``SEGPROP_CACHE`` or ``~/.cache/segprop_ray``."""
    return Path(os.environ.get("SEGPROP_CACHE", Path.home() / ".cache" / "segprop_ray"))


def scratch_dir() -> Path:
    """Where large temporary files go (the export's shards, a model file being staged): ``tmp/`` in the node's
    cache, which on a cluster is the cache volume rather than the container's own disk."""
    path = cache_root() / "tmp"
    path.mkdir(parents=True, exist_ok=True)
    return path


def redact_uri(uri: str) -> str:
    """``uri`` safe for logs: user:password@ and secret-looking query values replaced by ``***``."""
    parts = urlsplit(uri)
    if len(parts.scheme) <= 1:  # a plain path (or a Windows drive letter)
        return uri
    netloc = parts.netloc if "@" not in parts.netloc else "***@" + parts.netloc.rsplit("@", 1)[1]
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    query = "&".join(f"{k}={'***' if _SECRET_NAME.search(k) else v}" for k, v in pairs)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def describe_storage(uri: str, storage_options: dict[str, Any] | None = None) -> str:
    """One log line saying where ``uri`` lives (endpoint, region, option names), with no secret in it."""
    options = storage_options or {}
    details = []
    if split_protocol(uri)[0] in S3_PROTOCOLS:
        details.append(f"endpoint {redact_uri(s3_endpoint(options) or 'AWS default')}")
        details.append(f"region {s3_region(options) or 'from AWS config'}")
    if options:
        shown = [f"{k}=***" if _SECRET_NAME.search(k) else k for k in sorted(options)]
        details.append("storage_options: " + ", ".join(shown))
    return redact_uri(uri) + (f" ({'; '.join(details)})" if details else "")


def check_writable(uri: str, storage_options: dict[str, Any] | None = None, timeout_s: float = 5.0) -> None:
    """Write and delete a small probe object under ``uri``; raise a one-line :class:`StorageError` if that fails.

    Uses small connect/read timeouts and one attempt, and gives up after about ``3 * timeout_s``, so an
    unreachable endpoint or a missing bucket is reported in seconds, before any expensive work starts.
    """
    try:
        fs, path = _probe_filesystem(uri, storage_options or {}, timeout_s)
        probe = f"{path.rstrip('/')}/.segprop-write-probe-{uuid.uuid4().hex}"
        _run_with_deadline(lambda: _write_and_remove(fs, probe), deadline_s=3 * timeout_s)
    except TimeoutError:
        raise StorageError(f"run directory {describe_storage(uri, storage_options)} did not answer within "
                           f"{3 * timeout_s:.0f} s (endpoint unreachable?)") from None
    except Exception as error:  # noqa: BLE001 - every cause becomes one line naming the URI
        raise StorageError(f"run directory {describe_storage(uri, storage_options)} is not writable: "
                           f"{one_line(error)}") from None


def _probe_filesystem(uri: str, options: dict[str, Any], timeout_s: float) -> tuple[fsspec.AbstractFileSystem, str]:
    if split_protocol(uri)[0] not in S3_PROTOCOLS:
        return resolve_filesystem(uri, options)
    import s3fs

    config = {**(options.get("config_kwargs") or {}), "connect_timeout": timeout_s, "read_timeout": timeout_s,
              "retries": {"max_attempts": 1, "mode": "standard"}}
    fs = s3fs.S3FileSystem(**{**s3fs_options(options), "config_kwargs": config}, skip_instance_cache=True)
    fs.retries = 1  # s3fs's own retry loop (default 5, with back-off) on top of botocore's
    return fs, split_protocol(uri)[1].strip("/")


def _write_and_remove(fs: fsspec.AbstractFileSystem, probe: str) -> None:
    ensure_parent_dir(fs, probe)
    fs.pipe_file(probe, b"segprop_ray write probe\n")
    fs.rm_file(probe)


def _run_with_deadline(work: Callable[[], None], deadline_s: float) -> None:
    """Run ``work`` in a daemon thread; re-raise its error, or TimeoutError when it outlives ``deadline_s``."""
    errors: list[BaseException] = []

    def _work_and_record() -> None:
        try:
            work()
        except BaseException as error:  # noqa: BLE001 - handed to the caller
            errors.append(error)

    thread = threading.Thread(target=_work_and_record, name="segprop-storage-probe", daemon=True)
    thread.start()
    thread.join(deadline_s)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {deadline_s} s")
    if errors:
        raise errors[0]
