"""A resumed driver checks the committed shards without reading them: it lists sizes and reads the markers, and
Ray tasks on the workers hash the files. Counted here: the shard bytes read through fsspec in the driver process
(the workers are other processes) stay at zero, while a corrupted file of the right size is still caught."""

from __future__ import annotations

import pytest
from fsspec.implementations.local import LocalFileOpener

from pipeline_setup import BASE_DEPTH, make_inputs, pipeline_config
from segprop_ray.config import validate_config
from segprop_ray.pipeline.driver import Driver

pytestmark = pytest.mark.slow


class ShardReads:
    """Bytes of token and snapshot shard files read through local fsspec files in this process."""

    def __init__(self, monkeypatch):
        self.bytes = 0
        original_read = LocalFileOpener.read

        def read(opener, *args, **kwargs):
            data = original_read(opener, *args, **kwargs)
            self._count(opener, len(data))
            return data

        def readinto(opener, buffer):  # otherwise passed on to the open file by LocalFileOpener.__getattr__
            count = opener.f.readinto(buffer)
            self._count(opener, count or 0)
            return count

        monkeypatch.setattr(LocalFileOpener, "read", read)
        monkeypatch.setattr(LocalFileOpener, "readinto", readinto, raising=False)

    def _count(self, opener, count: int) -> None:
        if str(opener.path).endswith(".parquet") and ("/tokens/" in opener.path or "/snapshots/" in opener.path):
            self.bytes += count


def test_a_resumed_driver_reads_no_shard_bytes_and_still_catches_a_corrupted_file(local_ray, tmp_path, monkeypatch):
    model, train, evaluation = make_inputs(tmp_path)
    run_dir = tmp_path / "run"
    cfg = validate_config(pipeline_config(run_dir.as_uri(), str(model), str(train), str(evaluation)))
    first = Driver(cfg)
    first.prepare()
    first.tokenize()
    first.train_depth(BASE_DEPTH)
    first.ensure_snapshot(BASE_DEPTH)
    first.setup.lease.release()
    victim = run_dir / "snapshots" / "train" / f"depth={BASE_DEPTH}" / "part-00000.parquet"
    original = victim.read_bytes()
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0xFF  # same size: only a checksum tells
    victim.write_bytes(bytes(flipped))

    counter = ShardReads(monkeypatch)
    said: list[str] = []
    second = Driver(cfg, echo=said.append)
    second.prepare()
    second.tokenize()  # committed: checked, not redone
    second.ensure_snapshot(BASE_DEPTH)

    assert counter.bytes == 0
    assert not any("tokenizing" in line for line in said)
    assert any("snapshot S[0] cannot be used (part-00000.parquet sha256 differs" in line for line in said), said
    assert victim.read_bytes() == original  # regenerated on the workers, bit for bit
    assert second.manifest.steps[f"snapshot:{BASE_DEPTH}"].attempts == 2
    second.setup.lease.release()
