"""Committed weights in the run directory: per-layer safetensors files, hashed, fetched into a local cache.

Layout (paths relative to the run directory)::

    layers/embed.safetensors         embedding tables (Stage 1)
    layers/layer-<q>.safetensors     decoder layer q, original parameter names
    exits/exit-<q>/ll.safetensors    LL layers + final norm + LM head as trained in iteration q

A file's sha256 is recorded in the manifest when it is committed; a fetch checks it, so a torn
upload is never used. The hash of the weights that produced snapshot depth q chains the hashes
of the embedding file and of layers 0..q.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Mapping

import torch
from fsspec.implementations.local import LocalFileSystem

from segprop_ray.core.layout import ArchLayout
from segprop_ray.core.weights import SafetensorsSource, save_tensors
from segprop_ray.storage import node_cache
from segprop_ray.storage.errors import StorageError
from segprop_ray.storage.fs import cache_root, file_sha256
from segprop_ray.storage.layout import RunLayout

EMBED_FILE = "layers/embed.safetensors"


def layer_file(index: int | str) -> str:
    """Run-relative path of committed decoder layer ``index`` (``<q>-attn``: layer q after its attention half)."""
    return f"layers/layer-{index}.safetensors"


def exit_file(depth: int | str) -> str:
    """Run-relative path of exit ``depth``'s LL + head weights (``<q>-attn``: those of layer q's attention half)."""
    return f"exits/exit-{depth}/ll.safetensors"


def group_committed(tensors: Mapping[str, torch.Tensor], arch: ArchLayout, layers: list[int],
                    suffix: str = "") -> dict[str, dict]:
    """Committed tensors grouped by the file each belongs in (embedding file, one file per layer, named
    ``layer-<q><suffix>``)."""
    groups: dict[str, dict] = {}
    embed_prefixes = tuple(p + "." for p in arch.embed_paths())
    for name, tensor in tensors.items():
        if name.startswith(embed_prefixes):
            groups.setdefault(EMBED_FILE, {})[name] = tensor
    for index in layers:
        prefix = arch.layer_path(index) + "."
        groups[layer_file(f"{index}{suffix}")] = {k: v for k, v in tensors.items() if k.startswith(prefix)}
    return groups


def weights_hash(file_hashes: list[str]) -> str:
    """One hash for an ordered list of committed files (the weights a snapshot depth depends on)."""
    return hashlib.sha256("|".join(file_hashes).encode()).hexdigest()


def snapshot_weights_hash(files: Mapping[str, str], depth: int) -> str:
    """Weights hash of snapshot depth ``depth``: the embedding file and layers 0..depth.

    ``files`` maps committed run-relative paths to their sha256 (the manifest's committed files).
    """
    return weights_hash([files[EMBED_FILE]] + [files[layer_file(i)] for i in range(depth + 1)])


def _local_sha256(path: str | Path) -> str:
    return file_sha256(LocalFileSystem(), path)


class WeightStore:
    """Puts committed weight files into the run directory and fetches them back into a local cache."""

    def __init__(self, layout: RunLayout, cache_dir: str | Path | None = None):
        self.layout = layout
        self.cache_dir = Path(cache_dir or cache_root() / "weights")
        self.node_cache = cache_dir is None
        """Whether this is the node's cache, kept under its size limit (:mod:`segprop_ray.storage.node_cache`)."""

    def put(self, rel_path: str, tensors: Mapping[str, torch.Tensor]) -> str:
        """Write ``tensors`` to ``rel_path`` in the run directory (overwriting); returns the file's sha256."""
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.cache_dir) as tmp:
            local = Path(tmp) / "weights.safetensors"
            save_tensors(tensors, local, metadata={"format": "pt"})
            sha = _local_sha256(local)
            target = self.layout.join(*rel_path.split("/"))
            self.layout.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            self.layout.fs.put_file(str(local), target)
            cached = self.cache_dir / f"{sha}.safetensors"
            if not cached.exists():
                os.replace(local, cached)
        return sha

    def fetch(self, rel_path: str, sha256: str) -> Path:
        """A local copy of ``rel_path`` whose content has hash ``sha256`` (downloaded once, then cached)."""
        cached = self.cache_dir / f"{sha256}.safetensors"
        if cached.exists():
            node_cache.touch(cached)
            return cached
        remote = self.layout.join(*rel_path.split("/"))
        room = (node_cache.fetching(self.cache_dir.parent, sha256, self.layout.fs.size(remote)) if self.node_cache
                else contextlib.nullcontext())
        with room:  # counted against the node's cache limit while it downloads, as model fetches are
            self._download(remote, rel_path, sha256, cached)
        return cached

    def _download(self, remote: str, rel_path: str, sha256: str, cached: Path) -> None:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=self.cache_dir, delete=False, suffix=".part") as handle:
            partial = Path(handle.name)
        try:
            self.layout.fs.get_file(remote, str(partial))
            found = _local_sha256(partial)
            if found != sha256:
                raise StorageError(f"{self.layout.uri(self.layout.join(rel_path))}: sha256 {found[:12]} does not match "
                                   f"the committed {sha256[:12]} (torn or replaced file)")
            os.replace(partial, cached)
        finally:
            partial.unlink(missing_ok=True)

    def source(self, files: Mapping[str, str]) -> SafetensorsSource:
        """A lazy tensor source over committed files given as ``{rel_path: sha256}``."""
        return SafetensorsSource([self.fetch(path, sha) for path, sha in files.items()])


def safetensors_sizes(layout: RunLayout, rel_path: str) -> dict[str, int]:
    """Tensor name -> bytes of a committed safetensors file, from its header alone (two range reads, no weights).

    The format is an 8-byte little-endian header length, then a JSON header with each tensor's
    ``data_offsets``.
    """
    path = layout.join(*rel_path.split("/"))
    length = int.from_bytes(layout.fs.cat_file(path, start=0, end=8), "little")
    header = json.loads(layout.fs.cat_file(path, start=8, end=8 + length))
    return {name: entry["data_offsets"][1] - entry["data_offsets"][0] for name, entry in header.items()
            if name != "__metadata__"}
