"""The figure that sizes a snapshot job: bytes written per second of each actor's busy span."""

from __future__ import annotations

from segprop_ray.pipeline.snapshot_job import SnapshotFiles


def test_bytes_per_second_per_actor_over_each_actors_busy_span():
    """Actor a wrote 300 bytes in two overlapping files between t = 10 and 13 (100 B/s), actor b 50 bytes in 1 s;
    kept files (no span) count for nothing."""
    files = SnapshotFiles(files_per_actor=2)
    files.spans = [("a", 10.0, 12.0, 100), ("a", 11.0, 13.0, 200), ("b", 5.0, 6.0, 50)]
    assert files.sizing() == {"actors": 2, "files_per_actor": 2, "bytes_per_s_per_actor": 75,
                              "bytes_per_s_per_actor_range": [50, 100]}
    assert SnapshotFiles().sizing() == {"actors": 0, "files_per_actor": 1, "bytes_per_s_per_actor": None}
