"""Filesystem resolution, endpoint precedence, pyarrow filesystems, redaction and the writability probe."""

from __future__ import annotations

import socket
import threading
import time

import pyarrow.fs as pafs
import pytest
from fsspec.implementations.local import LocalFileSystem
from s3_server import free_port

from segprop_ray.storage.errors import StorageError
from segprop_ray.storage.fs import (check_writable, describe_storage, redact_uri, resolve_filesystem,
                                    resolve_pyarrow_filesystem, s3_endpoint)


def test_plain_path_and_file_uri_resolve_to_local(tmp_path):
    fs, path = resolve_filesystem(str(tmp_path / "run"))
    assert isinstance(fs, LocalFileSystem) and path == str(tmp_path / "run")
    fs2, path2 = resolve_filesystem((tmp_path / "run").as_uri() + "/")
    assert isinstance(fs2, LocalFileSystem) and path2 == str(tmp_path / "run")
    pa_fs, pa_path = resolve_pyarrow_filesystem((tmp_path / "run").as_uri())
    assert isinstance(pa_fs, pafs.LocalFileSystem) and pa_path == str(tmp_path / "run")


def test_other_fsspec_protocols_pass_through():
    fs, path = resolve_filesystem("memory://segprop-fs-test/run")
    fs.pipe_file(f"{path}/x", b"1")
    assert fs.cat_file(f"{path}/x") == b"1"
    pa_fs, pa_path = resolve_pyarrow_filesystem("memory://segprop-fs-test/run")
    assert isinstance(pa_fs, pafs.PyFileSystem) and pa_path == "/segprop-fs-test/run"


def test_s3_endpoint_precedence(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://generic:1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-specific:2")
    assert s3_endpoint() == "http://s3-specific:2"
    assert s3_endpoint({"endpoint_url": "http://option:3"}) == "http://option:3"
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    assert s3_endpoint() == "http://generic:1"
    monkeypatch.setenv("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "true")
    assert s3_endpoint() is None


def test_s3_through_environment_only(s3_bucket):
    fs, path = resolve_filesystem(f"s3://{s3_bucket}/run/")
    assert path == f"{s3_bucket}/run"
    fs.pipe_file(f"{path}/hello.txt", b"hi")
    assert fs.cat_file(f"{path}/hello.txt") == b"hi"


def test_generic_endpoint_variable_is_used_when_s3_specific_is_absent(s3_bucket, s3_env, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env)
    fs, path = resolve_filesystem(f"s3://{s3_bucket}/run")
    fs.pipe_file(f"{path}/a", b"1")
    assert fs.exists(f"{path}/a")


def test_storage_options_override_environment(s3_bucket, s3_env, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    fs, path = resolve_filesystem(f"s3://{s3_bucket}/run", {"endpoint_url": s3_env})
    fs.pipe_file(f"{path}/a", b"1")
    assert fs.cat_file(f"{path}/a") == b"1"


def test_pyarrow_s3_filesystem_gets_endpoint_from_environment(s3_bucket):
    pa_fs, path = resolve_pyarrow_filesystem(f"s3://{s3_bucket}/run")
    assert isinstance(pa_fs, pafs.S3FileSystem) and path == f"{s3_bucket}/run"
    with pa_fs.open_output_stream(f"{path}/from-pyarrow.bin") as stream:
        stream.write(b"pyarrow wrote this")
    fs, fs_path = resolve_filesystem(f"s3://{s3_bucket}/run")
    assert fs.cat_file(f"{fs_path}/from-pyarrow.bin") == b"pyarrow wrote this"


def test_pyarrow_falls_back_to_s3fs_for_options_it_cannot_express(s3_bucket):
    pa_fs, path = resolve_pyarrow_filesystem(f"s3://{s3_bucket}/run", {"requester_pays": False})
    assert isinstance(pa_fs, pafs.PyFileSystem)
    with pa_fs.open_output_stream(f"{path}/x") as stream:
        stream.write(b"ok")
    assert pa_fs.get_file_info(f"{path}/x").size == 2


def test_redaction_hides_credentials():
    assert redact_uri("s3://AKIAXX:topsecret@bucket/run") == "s3://***@bucket/run"
    redacted = redact_uri("s3://b/x?access_key=AK&secret_key=SK&region=us-east-1")
    assert "SK" not in redacted and "AK" not in redacted and "region=us-east-1" in redacted
    assert redact_uri("/plain/path") == "/plain/path"
    line = describe_storage("s3://b/run", {"key": "AKIAEXAMPLE", "secret": "shh", "endpoint_url": "http://h:1"})
    assert "AKIAEXAMPLE" not in line and "shh" not in line and "endpoint http://h:1" in line


def test_check_writable_passes_on_a_good_run_dir(run_uri):
    check_writable(run_uri)


def test_check_writable_missing_bucket_is_one_clear_line(s3_env):
    options = {"key": "testing", "secret": "do-not-print-me"}
    start = time.perf_counter()
    with pytest.raises(StorageError) as caught:
        check_writable("s3://segprop-no-such-bucket/run", options)
    message = str(caught.value)
    assert time.perf_counter() - start < 10
    assert "s3://segprop-no-such-bucket/run" in message and "\n" not in message
    assert "do-not-print-me" not in message and caught.value.__suppress_context__


def test_check_writable_unreachable_endpoint_fails_fast(s3_env, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")
    start = time.perf_counter()
    with pytest.raises(StorageError, match="not writable"):
        check_writable("s3://some-bucket/run", timeout_s=1)
    assert time.perf_counter() - start < 10


def test_check_writable_silent_endpoint_times_out(s3_env, monkeypatch):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # accepts connections (backlog) but never answers
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{listener.getsockname()[1]}")
    start = time.perf_counter()
    try:
        with pytest.raises(StorageError, match="s3://some-bucket/run"):
            check_writable("s3://some-bucket/run", timeout_s=0.5)
    finally:
        listener.close()
    assert time.perf_counter() - start < 8


def test_check_writable_local_failure(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(StorageError, match="not writable"):
        check_writable(str(blocker / "run"))


def test_probe_thread_does_not_outlive_the_check(run_uri):
    before = {thread.name for thread in threading.enumerate()}
    check_writable(run_uri)
    assert "segprop-storage-probe" not in {t.name for t in threading.enumerate()} - before


def test_planning_a_run_reads_only_the_config_of_a_remote_model(s3_bucket, tmp_path):
    from helpers import tiny_model_dir, upload
    from segprop_ray.storage.models import model_config_dir

    fs, _ = resolve_filesystem(f"s3://{s3_bucket}")
    model = tiny_model_dir(tmp_path, "llama", 2)
    upload(model, f"s3://{s3_bucket}/models/tiny")
    local = model_config_dir(f"s3://{s3_bucket}/models/tiny", cache_dir=tmp_path / "cache")
    assert [p.name for p in local.iterdir() if not p.name.startswith(".")] == ["config.json"]  # no weights to plan
    assert local.joinpath("config.json").read_bytes() == (model / "config.json").read_bytes()

    fs.pipe_file(f"{s3_bucket}/models/no-weights/config.json", b"{}")
    with pytest.raises(StorageError, match=r"models/no-weights: no safetensors weights found"):
        model_config_dir(f"s3://{s3_bucket}/models/no-weights", cache_dir=tmp_path / "cache")


def test_concurrent_fetches_of_a_remote_model_publish_one_whole_copy(s3_bucket, tmp_path):
    """Several actors on one node fetch the same model at once: each reader gets complete files."""
    from concurrent.futures import ThreadPoolExecutor

    from helpers import tiny_model_dir, upload
    from segprop_ray.storage.models import TOKENIZER_FILE_PATTERNS, resolve_model_dir

    model = tiny_model_dir(tmp_path, "llama", 2)
    upload(model, f"s3://{s3_bucket}/models/tiny")
    uri, cache = f"s3://{s3_bucket}/models/tiny", tmp_path / "cache"
    with ThreadPoolExecutor(4) as pool:
        dirs = list(pool.map(lambda _: resolve_model_dir(uri, cache_dir=cache), range(4)))
    # no private staging directory left (the entry's lock file stays: removing it would let two fetchers lock two files)
    leftovers = [p for p in cache.iterdir() if p.name.startswith(".") and not (p.suffix == ".lock" and p.is_file())]
    assert len(set(dirs)) == 1 and not leftovers
    assert {p.name: p.read_bytes() for p in dirs[0].iterdir() if p.suffix} == \
        {p.name: p.read_bytes() for p in model.iterdir()}
    tokenizer_only = resolve_model_dir(uri, cache_dir=cache, patterns=TOKENIZER_FILE_PATTERNS)
    assert tokenizer_only != dirs[0] and not list(tokenizer_only.glob("*.safetensors"))


def test_inputs_expand_directories_and_globs_in_order_and_refuse_a_file_named_twice(tmp_path):
    from segprop_ray.storage.inputs import expand_inputs

    for name in ("b.jsonl", "a.jsonl", "_SUCCESS", ".hidden"):
        (tmp_path / "data" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "data" / name).write_text("{}\n")
    data = tmp_path / "data"
    assert expand_inputs(str(data)) == [str(data / "a.jsonl"), str(data / "b.jsonl")]  # sorted, markers skipped
    assert expand_inputs(str(data / "*.jsonl")) == [str(data / "a.jsonl"), str(data / "b.jsonl")]
    with pytest.raises(StorageError, match=r"data.train names .*a.jsonl more than once \(via '.*a.jsonl'\)"):
        expand_inputs([str(data), str(data / "a.jsonl")], setting="data.train")
    with pytest.raises(StorageError, match=r"evaluation.mc_path '.*nothing\*' matches no file"):
        expand_inputs(str(data / "nothing*"), setting="evaluation.mc_path")


def test_a_remote_model_written_again_under_the_same_uri_is_fetched_again(s3_bucket, tmp_path):
    """A model staged again after --restart keeps its URI: the node cache keys on the files' versions too, so no
    process reads the copy it fetched before."""
    from helpers import tiny_model_dir, upload
    from segprop_ray.storage.models import resolve_model_dir

    first, second = tiny_model_dir(tmp_path / "a", "llama", 2), tiny_model_dir(tmp_path / "b", "llama", 3)
    uri, cache = f"s3://{s3_bucket}/models/again", tmp_path / "cache"
    upload(first, uri)
    before = resolve_model_dir(uri, cache_dir=cache)
    assert (before / "model.safetensors").read_bytes() == (first / "model.safetensors").read_bytes()
    upload(second, uri)
    after = resolve_model_dir(uri, cache_dir=cache)
    assert after != before
    assert {p.name: p.read_bytes() for p in after.iterdir() if p.suffix} == \
        {p.name: p.read_bytes() for p in second.iterdir()}
    assert resolve_model_dir(uri, cache_dir=cache) == after  # unchanged: the same entry
