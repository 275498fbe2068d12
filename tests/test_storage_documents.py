"""Atomic JSON documents and the format-version envelope, on file:// and s3://."""

from __future__ import annotations

import json
import os
import threading

import pytest

from segprop_ray.storage.documents import DocumentFormat, read_json, write_json_atomic
from segprop_ray.storage.errors import DocumentNotFound, FormatVersionError, StorageError
from segprop_ray.storage.fs import resolve_filesystem

MANIFEST_V2 = DocumentFormat("segprop_ray.test_manifest", 2)


def test_json_round_trip_and_overwrite(run_layout):
    fs, path = run_layout.fs, run_layout.join("state.json")
    write_json_atomic(fs, path, {"step": 1, "nested": {"a": [1, 2]}})
    write_json_atomic(fs, path, {"step": 2})
    assert read_json(fs, path) == {"step": 2}


def test_local_write_leaves_no_temporary_files(tmp_path):
    fs, root = resolve_filesystem(str(tmp_path / "run"))
    for step in range(5):
        write_json_atomic(fs, f"{root}/manifest.json", {"step": step})
    assert os.listdir(tmp_path / "run") == ["manifest.json"]


def test_local_readers_never_see_a_torn_document(tmp_path):
    fs, root = resolve_filesystem(str(tmp_path))
    path, body = f"{root}/m.json", {"payload": "x" * 200_000}
    write_json_atomic(fs, path, {**body, "step": -1})
    stop, reading, bad, steps = threading.Event(), threading.Event(), [], []

    def reader() -> None:  # any failure counts (a missing file mid-rename, a torn read), and ends the reader
        try:
            while not stop.is_set():
                with open(path, "rb") as handle:
                    steps.append(json.loads(handle.read())["step"])
                reading.set()
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            bad.append(error)

    thread = threading.Thread(target=reader)
    thread.start()
    assert reading.wait(10), bad
    for step in range(40):
        write_json_atomic(fs, path, {**body, "step": step})
    stop.set()
    thread.join()
    assert not bad
    assert steps[0] == -1 and steps == sorted(steps)  # never an older document after a newer one


def test_other_filesystems_use_temp_and_move():
    fs, root = resolve_filesystem("memory://segprop-doc-test")
    write_json_atomic(fs, f"{root}/d/doc.json", {"a": 1})
    assert read_json(fs, f"{root}/d/doc.json") == {"a": 1}
    assert [name.rsplit("/", 1)[-1] for name in fs.ls(f"{root}/d", detail=False)] == ["doc.json"]


def test_missing_and_unparsable_documents(run_layout):
    fs = run_layout.fs
    with pytest.raises(DocumentNotFound, match="no such document"):
        read_json(fs, run_layout.join("absent.json"))
    fs.pipe_file(run_layout.join("torn.json"), b'{"step": 1, "pay')
    with pytest.raises(StorageError, match="not a valid JSON document") as caught:
        read_json(fs, run_layout.join("torn.json"))
    assert "\n" not in str(caught.value)


def test_versioned_document_round_trip(run_layout):
    MANIFEST_V2.write(run_layout.fs, run_layout.manifest, {"stage": "stage1", "layers": {"3": "done"}})
    assert MANIFEST_V2.read(run_layout.fs, run_layout.manifest) == {"stage": "stage1", "layers": {"3": "done"}}
    raw = read_json(run_layout.fs, run_layout.manifest)
    assert raw["format_version"] == 2 and raw["written_by"].startswith("segprop_ray ")


def test_newer_document_says_upgrade(run_layout):
    DocumentFormat(MANIFEST_V2.name, 3).write(run_layout.fs, run_layout.manifest, {"stage": "x"})
    with pytest.raises(FormatVersionError, match=r"newer segprop_ray .*format 3 > 2: upgrade") as caught:
        MANIFEST_V2.read(run_layout.fs, run_layout.manifest)
    assert "\n" not in str(caught.value)


def test_older_document_says_start_new_run_or_use_old_version(run_layout):
    write_json_atomic(run_layout.fs, run_layout.manifest,
                      {"format": MANIFEST_V2.name, "format_version": 1, "written_by": "segprop_ray 0.0.9"})
    with pytest.raises(FormatVersionError, match=r"format 1 < 2: this version .* cannot read it; start a new run "
                                                 r"dir or use segprop_ray 0\.0\.9"):
        MANIFEST_V2.read(run_layout.fs, run_layout.manifest)


def test_wrong_document_kind_and_missing_envelope(run_layout):
    DocumentFormat("segprop_ray.other", 2).write(run_layout.fs, run_layout.manifest, {})
    with pytest.raises(StorageError, match="expected 'segprop_ray.test_manifest'"):
        MANIFEST_V2.read(run_layout.fs, run_layout.manifest)
    write_json_atomic(run_layout.fs, run_layout.manifest, {"stage": "x"})
    with pytest.raises(StorageError, match="no format_version"):
        MANIFEST_V2.read(run_layout.fs, run_layout.manifest)
    with pytest.raises(ValueError, match="envelope"):
        MANIFEST_V2.write(run_layout.fs, run_layout.manifest, {"format_version": 7})
