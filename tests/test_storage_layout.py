"""The run directory layout: paths, names, and travelling to workers."""

from __future__ import annotations

import pickle

import pytest

from segprop_ray.storage.layout import RunLayout, depth_of_dir, part_index, part_name
from segprop_ray.storage.weights_store import EMBED_FILE, exit_file, layer_file


def test_paths_follow_the_documented_layout(tmp_path):
    layout = RunLayout.open(str(tmp_path / "run"))
    root = str(tmp_path / "run")
    assert layout.manifest == f"{root}/manifest.json"
    assert layout.config_resolved == f"{root}/config.resolved.yaml"
    assert layout.shard_file("train", None, 3) == f"{root}/tokens/train/part-00003.parquet"
    assert layout.shard_file("eval", 7, 12) == f"{root}/snapshots/eval/depth=7/part-00012.parquet"
    assert layout.commit_marker("train", 7) == f"{root}/snapshots/train/depth=7/_COMMITTED"
    assert layout.commit_marker("train", None) == f"{root}/tokens/train/_COMMITTED"
    assert layout.join(layer_file(17)) == f"{root}/layers/layer-17.safetensors"
    assert layout.join(exit_file(4)) == f"{root}/exits/exit-4/ll.safetensors"
    assert layout.written_record("eval", 7, 12) == f"{root}/snapshots/eval/depth=7/_written/part-00012.json"
    assert layout.checkpoints_dir("layer-5") == f"{root}/checkpoints/layer-5"
    assert layout.export_dir() == f"{root}/export" and layout.report_dir == f"{root}/report"
    assert layout.uri(layout.manifest) == f"file://{root}/manifest.json"


def test_s3_layout_paths_and_uris(s3_bucket):
    layout = RunLayout.open(f"s3://{s3_bucket}/runs/a/")
    assert layout.root == f"{s3_bucket}/runs/a"
    assert layout.uri(layout.join(EMBED_FILE)) == f"s3://{s3_bucket}/runs/a/layers/embed.safetensors"
    pa_fs, path = layout.pyarrow_filesystem()
    assert path == f"{s3_bucket}/runs/a"


def test_names_parse_back():
    assert part_name(42) == "part-00042.parquet" and part_index("x/part-00042.parquet") == 42
    assert part_index("_COMMITTED") is None
    assert depth_of_dir("bucket/run/snapshots/train/depth=12") == 12 and depth_of_dir("tmp") is None
    with pytest.raises(ValueError):
        part_name(-1)


def test_unknown_split_and_negative_depth_are_rejected(tmp_path):
    layout = RunLayout.open(str(tmp_path))
    with pytest.raises(ValueError, match="split"):
        layout.tokens_dir("test")
    with pytest.raises(ValueError, match="depth"):
        layout.shard_dir("train", -1)


def test_layout_pickles_and_repr_hides_options(s3_bucket):
    layout = RunLayout.open(f"s3://{s3_bucket}/run", {"secret": "hush", "key": "AKIA"})
    clone = pickle.loads(pickle.dumps(layout))
    assert clone.root == layout.root and clone.storage_options == layout.storage_options
    assert "hush" not in repr(layout) and "AKIA" not in repr(layout)
