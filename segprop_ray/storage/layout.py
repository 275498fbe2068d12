"""The run directory's layout: every path of a run, in one place.

```
<run_dir>/
  manifest.json                                   run state (written atomically)
  config.resolved.yaml                            the config the run uses
  tokens/<split>/part-NNNNN.parquet + _COMMITTED  packed token blocks
  tokens/_resume/                                 where an unfinished tokenize job stands
  snapshots/<split>/depth=<q>/part-NNNNN.parquet + _COMMITTED   activations after layer q
  snapshots/<split>/depth=<q>/_written/part-NNNNN.json          per-file records of a depth being written
  layers/layer-<q>.safetensors                    committed weights, original parameter names
  exits/exit-<q>/                                 LL weights trained in iteration q
  checkpoints/<name>/                             Ray Train checkpoints of one iteration (until it is committed)
  export/<name>/                                  exported HF model directories
  report/                                         tables and plots
```
``<split>`` is ``train`` or ``eval``. The weight files' run-relative names (``layers/...``,
``exits/...``, the manifest's keys) come from :mod:`segprop_ray.storage.weights_store`. Paths are
fsspec paths inside :attr:`RunLayout.fs` (no protocol); :meth:`RunLayout.uri` turns one back into a
full URI.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow.fs as pafs

from segprop_ray.storage.fs import describe_storage, resolve_filesystem, resolve_pyarrow_filesystem

SPLITS = ("train", "eval")
COMMIT_MARKER = "_COMMITTED"
_DEPTH_DIR = re.compile(r"^depth=(\d+)$")
_PART_FILE = re.compile(r"^part-(\d{5,})\.parquet$")


def part_name(file_index: int) -> str:
    """The deterministic name of shard file ``file_index`` (``part-00000.parquet``)."""
    if file_index < 0:
        raise ValueError(f"file index must be >= 0, got {file_index}")
    return f"part-{file_index:05d}.parquet"


def part_index(name: str) -> int | None:
    """The file index in a shard file name, or None for any other name."""
    match = _PART_FILE.match(name.rsplit("/", 1)[-1])
    return int(match.group(1)) if match else None


def depth_of_dir(name: str) -> int | None:
    """The depth in a ``depth=<q>`` directory name, or None."""
    match = _DEPTH_DIR.match(name.rstrip("/").rsplit("/", 1)[-1])
    return int(match.group(1)) if match else None


@dataclass(frozen=True, eq=False)
class RunLayout:
    """Paths of one run directory on one filesystem (picklable: it travels to Ray workers)."""

    fs: fsspec.AbstractFileSystem
    root: str
    uri_text: str = ""
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, uri: str, storage_options: dict[str, Any] | None = None) -> "RunLayout":
        """The layout of the run directory at ``uri`` (any fsspec URI or a local path)."""
        fs, root = resolve_filesystem(uri, storage_options)
        return cls(fs=fs, root=root, uri_text=uri, storage_options=dict(storage_options or {}))

    def __repr__(self) -> str:
        return f"RunLayout({self.describe()})"

    def describe(self) -> str:
        """Where the run lives, for logs (no credentials)."""
        return describe_storage(self.uri_text or self.uri(self.root), self.storage_options)

    def join(self, *parts: str) -> str:
        """A path under the run directory."""
        return "/".join([self.root.rstrip("/"), *parts])

    def uri(self, path: str) -> str:
        """``path`` (inside :attr:`fs`) as a full URI, e.g. ``s3://bucket/run/layers``."""
        return self.fs.unstrip_protocol(path)

    def pyarrow_filesystem(self) -> tuple[pafs.FileSystem, str]:
        """A pyarrow filesystem and the run directory's path in it (for Ray Train / Ray Data)."""
        return resolve_pyarrow_filesystem(self.uri_text or self.uri(self.root), self.storage_options)

    @property
    def manifest(self) -> str:
        """``manifest.json``: the run state."""
        return self.join("manifest.json")

    @property
    def config_resolved(self) -> str:
        """``config.resolved.yaml``: the configuration the run uses."""
        return self.join("config.resolved.yaml")

    def tokens_dir(self, split: str) -> str:
        """``tokens/<split>``: packed token blocks."""
        return self.join("tokens", _checked_split(split))

    def snapshots_dir(self, split: str) -> str:
        """``snapshots/<split>``: one ``depth=<q>`` directory per snapshot depth."""
        return self.join("snapshots", _checked_split(split))

    def shard_dir(self, split: str, depth: int | None) -> str:
        """Token shards (``depth=None``) or the snapshot shards after layer ``depth``."""
        if depth is None:
            return self.tokens_dir(split)
        if depth < 0:
            raise ValueError(f"depth must be >= 0, got {depth}")
        return f"{self.snapshots_dir(split)}/depth={depth}"

    def shard_file(self, split: str, depth: int | None, file_index: int) -> str:
        """Shard file ``file_index`` of a split's tokens (``depth=None``) or of a snapshot depth."""
        return f"{self.shard_dir(split, depth)}/{part_name(file_index)}"

    def written_record(self, split: str, depth: int, file_index: int) -> str:
        """The record of one finished snapshot file of a depth not yet committed (what a restarted job keeps)."""
        return f"{self.written_dir(split, depth)}/{part_name(file_index).replace('.parquet', '.json')}"

    def written_dir(self, split: str, depth: int) -> str:
        """``_written/``: the per-file records of a snapshot depth being written."""
        return f"{self.shard_dir(split, depth)}/_written"

    def tokenize_state_dir(self) -> str:
        """``tokens/_resume``: where an unfinished tokenize job stands (see :mod:`segprop_ray.storage.tokenize_state`)."""
        return self.join("tokens", "_resume")

    def commit_marker(self, split: str, depth: int | None) -> str:
        """The ``_COMMITTED`` marker of a split's tokens or of a snapshot depth."""
        return f"{self.shard_dir(split, depth)}/{COMMIT_MARKER}"

    def checkpoints_dir(self, name: str = "") -> str:
        """``checkpoints/`` or ``checkpoints/<name>``: Ray Train checkpoints."""
        return self.join("checkpoints", name) if name else self.join("checkpoints")

    def export_dir(self, name: str = "") -> str:
        """``export/`` or ``export/<name>``: exported HF model directories."""
        return self.join("export", name) if name else self.join("export")

    @property
    def report_dir(self) -> str:
        """``report/``: tables and plots."""
        return self.join("report")


def _checked_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split
