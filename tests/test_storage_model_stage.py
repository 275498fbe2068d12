"""The input model staged once into the run directory (file:// and moto's S3), read back into a node cache that
stays under its size limit."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from helpers import tiny_model_dir
from segprop_ray.storage import node_cache
from segprop_ray.storage.errors import StorageError
from segprop_ray.storage.model_stage import STAGED_MARKER, content_identity, stage_model, staged_copy, staged_dir
from segprop_ray.storage.models import resolve_model_dir


def test_the_model_is_staged_once_and_read_back_into_the_node_cache(tmp_path, run_layout, monkeypatch):
    monkeypatch.setenv("SEGPROP_CACHE", str(tmp_path / "cache"))
    model = tiny_model_dir(tmp_path)
    (model / "pytorch_model.bin").write_bytes(b"pickled weights are never copied")

    body = stage_model(str(model), run_layout)

    originals = {p.name: p.read_bytes() for p in model.iterdir() if p.name != "pytorch_model.bin"}
    assert body["files"] == {name: len(data) for name, data in originals.items()}
    assert "model.safetensors" in body["files"] and body["uri"] == run_layout.uri(staged_dir(run_layout))
    puts = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(run_layout.fs), "put_file", lambda fs, *args, **kw: puts.append(args))
        assert stage_model(str(model), run_layout) == body and puts == []  # a resumed run stages nothing

    local = resolve_model_dir(body["uri"])
    assert {name: (local / name).read_bytes() for name in originals} == originals


def test_an_incomplete_copy_or_another_model_is_staged_again(tmp_path, run_layout):
    model = tiny_model_dir(tmp_path)
    stage_model(str(model), run_layout)
    weights = f"{staged_dir(run_layout)}/model.safetensors"
    run_layout.fs.pipe_file(weights, b"torn")  # a copy cut short
    assert staged_copy(run_layout, str(model)) is None
    assert stage_model(str(model), run_layout)["files"]["model.safetensors"] == run_layout.fs.size(weights)
    other = tiny_model_dir(tmp_path / "other", num_layers=2)
    assert staged_copy(run_layout, str(other)) is None  # the marker names its source
    assert stage_model(str(other), run_layout)["source"] == str(other)
    assert run_layout.fs.exists(f"{staged_dir(run_layout)}/{STAGED_MARKER}")


def test_a_directory_without_safetensors_is_refused(tmp_path, run_layout):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text("{}")
    with pytest.raises(StorageError, match="no safetensors weights to stage"):
        stage_model(str(bare), run_layout)
    assert staged_copy(run_layout, str(bare)) is None


def test_the_node_cache_evicts_what_was_not_used_lately_and_refuses_past_its_limit(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    (root / "weights").mkdir(parents=True)
    old, recent = root / "weights" / "old.safetensors", root / "weights" / "recent.safetensors"
    old.write_bytes(b"x" * 600)
    recent.write_bytes(b"y" * 600)
    long_ago = time.time() - 2 * node_cache.IN_USE_S
    os.utime(old, (long_ago, long_ago))
    monkeypatch.setenv(node_cache.LIMIT_ENV, str(1500 / 2**30))  # 1500 bytes

    node_cache.make_room(root, 800)  # 1200 used + 800 > 1500: the old entry goes

    assert not old.exists() and recent.exists()
    with pytest.raises(StorageError, match=r"cannot take .* GiB more: .* used in the last 600 s"):
        node_cache.make_room(root, 1000)  # the recent entry may be in use: kept, and the fetch refused
    assert recent.exists()
    monkeypatch.delenv(node_cache.LIMIT_ENV)
    node_cache.make_room(root, 10**12)  # no limit set: nothing happens
    assert recent.exists()


def test_the_staged_copy_carries_its_content_identity_and_outlives_a_changed_origin(tmp_path, run_layout):
    model = tiny_model_dir(tmp_path)
    body = stage_model(str(model), run_layout)
    weights = (model / "model.safetensors").read_bytes()
    assert body["revision"] is None and body["sha256"]["model.safetensors"] == hashlib.sha256(weights).hexdigest()
    assert body["identity"] == content_identity(body["sha256"], None)

    (model / "model.safetensors").write_bytes(b"the origin changed after staging")  # a resumed run keeps the copy
    assert stage_model(str(model), run_layout) == body == staged_copy(run_layout, str(model))
    assert run_layout.fs.cat_file(f"{staged_dir(run_layout)}/model.safetensors") == weights


class FakeHub:
    """huggingface_hub's calls, offline: the repo's head moves to commit ``new`` after its revision was resolved."""

    def __init__(self, model):
        self.model, self.head, self.downloads = model, "old", []

    def model_info(self, repo_id):
        head, self.head = self.head, "new"  # a push lands right after staging resolved the revision
        return type("Info", (), {"sha": head})()

    def list_repo_files(self, repo_id, revision=None):
        return sorted(p.name for p in self.model.iterdir()) + (["added-later.json"] if revision != "old" else [])

    def download(self, repo_id, name, revision=None, local_dir=None):
        self.downloads.append((name, revision))
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        (Path(local_dir) / name).write_bytes((self.model / name).read_bytes() if revision == "old" else b"new")
        return str(Path(local_dir) / name)


def test_a_hub_model_is_staged_at_one_commit(tmp_path, run_layout, monkeypatch):
    import huggingface_hub

    hub = FakeHub(tiny_model_dir(tmp_path))
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: hub)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub.download)

    body = stage_model("org/tiny-model", run_layout)

    assert body["revision"] == "old" and {revision for _, revision in hub.downloads} == {"old"}
    assert "added-later.json" not in body["files"]
    assert run_layout.fs.cat_file(f"{staged_dir(run_layout)}/model.safetensors") == \
        (hub.model / "model.safetensors").read_bytes()


def fetch_in_a_process(uri: str, log: str, start, out: str) -> None:
    """A worker process on the node: resolve the S3 model (its weights downloads logged, made slow) and note what it got."""
    import asyncio
    import json

    import s3fs

    original = s3fs.S3FileSystem._get_file

    async def logged(self, rpath, lpath, **kwargs):
        with open(log, "a") as handle:
            handle.write(f"{rpath}\n")
        await asyncio.sleep(0.5)  # a large file: the other processes arrive while it downloads
        return await original(self, rpath, lpath, **kwargs)

    s3fs.S3FileSystem._get_file = logged
    start.wait()
    local = resolve_model_dir(uri)
    Path(out).write_text(json.dumps({"dir": str(local), "files": {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                                                                  for p in sorted(local.iterdir()) if p.is_file()}}))


@pytest.mark.slow
def test_processes_on_a_node_fetch_a_model_once(tmp_path, s3_bucket, monkeypatch):
    import json
    import multiprocessing

    from segprop_ray.storage.fs import resolve_filesystem

    model = tiny_model_dir(tmp_path)
    fs, _ = resolve_filesystem(f"s3://{s3_bucket}")
    for file in model.iterdir():
        fs.put_file(str(file), f"{s3_bucket}/models/tiny/{file.name}")
    monkeypatch.setenv("SEGPROP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(node_cache.LIMIT_ENV, "1")
    spawn = multiprocessing.get_context("spawn")
    start, log = spawn.Barrier(3), tmp_path / "downloads.log"
    workers = [spawn.Process(target=fetch_in_a_process,
                             args=(f"s3://{s3_bucket}/models/tiny", str(log), start, str(tmp_path / f"out-{i}.json")))
               for i in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    assert [worker.exitcode for worker in workers] == [0, 0, 0]

    downloads = log.read_text().split()
    assert len([d for d in downloads if d.endswith("model.safetensors")]) == 1  # one process fetched, two waited
    results = [json.loads((tmp_path / f"out-{i}.json").read_text()) for i in range(3)]
    expected = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in model.iterdir()}
    assert all(r == results[0] for r in results) and expected.items() <= results[0]["files"].items()
    assert not list((tmp_path / "cache" / "fetching").glob("*"))  # the finished fetch no longer counts


def test_a_fetch_under_way_counts_against_the_cache_limit(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv(node_cache.LIMIT_ENV, str(1000 / 2**30))  # 1000 bytes
    with node_cache.fetching(root, "first", 700):  # another entry's 700 bytes are on their way
        with pytest.raises(StorageError, match="cannot take"):
            node_cache.make_room(root, 400)
    node_cache.make_room(root, 400)  # that fetch ended (published or not): room again
    stale = root / "fetching" / "gone.999999999"
    stale.write_text("700")  # the record of a process that died mid-fetch
    node_cache.make_room(root, 400)
    assert not stale.exists()
