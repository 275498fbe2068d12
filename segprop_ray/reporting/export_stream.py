"""Writing an exit as sharded safetensors, one shard in memory at a time, with HF's ``model.safetensors.index.json``.

Which committed or exit tensor each name of the exported model is comes from
:func:`segprop_ray.core.assemble.exit_state_dict` itself, run on placeholder tensors (meta device, no
data): the naming (layers kept, LL renumbered after the exit, what a tied head stores) has one
definition. The tensors are grouped into one shard per unit (the embeddings, each decoder layer, the
final norm with the head), and each shard is read, written and handed on before the next is read, so
memory holds about one decoder layer or the embedding / head, never the model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch
from safetensors.torch import save_file

from segprop_ray.core.assemble import exit_state_dict
from segprop_ray.core.layout import ArchLayout
from segprop_ray.core.plan import SegPropPlan
from segprop_ray.core.weights import TensorSource

INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorRef:
    """One tensor of the exported model: its name there, and where it is read from."""

    out: str
    """Name in the exported model (``model.layers.5.mlp.up_proj.weight``)."""
    file: str
    """Run-relative committed file holding it."""
    name: str
    """Its name in that file."""
    nbytes: int


@dataclass(frozen=True)
class ShardPlan:
    """The exported model's tensors, shard by shard (in order: embeddings, layers, head)."""

    shards: tuple[tuple[TensorRef, ...], ...]

    @property
    def total_size(self) -> int:
        """Bytes of every tensor (the index's ``metadata.total_size``)."""
        return sum(ref.nbytes for shard in self.shards for ref in shard)

    @property
    def largest(self) -> int:
        """Bytes of the largest shard: about what the export holds in memory at once."""
        return max((sum(ref.nbytes for ref in shard) for shard in self.shards), default=0)

    def file_name(self, index: int) -> str:
        """HF's shard name: ``model-00001-of-00012.safetensors``."""
        return f"model-{index + 1:05d}-of-{len(self.shards):05d}.safetensors"

    def index(self) -> dict:
        """The body of ``model.safetensors.index.json``."""
        weight_map = {ref.out: self.file_name(i) for i, shard in enumerate(self.shards) for ref in shard}
        return {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}

    def last_use(self) -> dict[str, int]:
        """The last shard that reads each committed file (after it, the file's local copy can go)."""
        return {ref.file: i for i, shard in enumerate(self.shards) for ref in shard}


def plan_shards(plan: SegPropPlan, arch: ArchLayout, depth: int, sizes: Mapping[str, Mapping[str, int]],
                exit_path: str) -> ShardPlan:
    """The shards of the exit at ``depth``; ``sizes`` maps each committed file (run-relative; ``exit_path`` is the
    exit's LL + head file) to its tensors' byte sizes."""
    placeholders: dict[int, tuple[str, str, int]] = {}
    committed: dict[str, torch.Tensor] = {}
    exits: dict[str, torch.Tensor] = {}
    for path, names in sizes.items():
        for name, nbytes in names.items():
            placeholder = torch.empty(0, device="meta")
            (exits if path == exit_path else committed)[name] = placeholder
            placeholders[id(placeholder)] = (path, name, nbytes)
    state = exit_state_dict(plan, arch, depth, committed, exits)
    refs = []
    for out, tensor in state.items():
        if id(tensor) not in placeholders:
            raise RuntimeError(f"exit_state_dict made {out} a new tensor: the export can only copy committed ones")
        refs.append(TensorRef(out, *placeholders[id(tensor)]))
    return ShardPlan(_group(refs, arch))


def _group(refs: list[TensorRef], arch: ArchLayout) -> tuple[tuple[TensorRef, ...], ...]:
    """One shard per unit, in model order: embeddings, each decoder layer, then the rest (final norm, head)."""
    embed = tuple(path + "." for path in arch.embed_paths())

    def unit(ref: TensorRef) -> tuple[int, int]:
        if ref.out.startswith(embed):
            return (0, 0)
        if ref.out.startswith(arch.layers + "."):
            return (1, int(ref.out[len(arch.layers) + 1:].split(".", 1)[0]))
        return (2, 0)

    shards: dict[tuple[int, int], list[TensorRef]] = {}
    for ref in sorted(refs, key=lambda r: r.out):
        shards.setdefault(unit(ref), []).append(ref)
    return tuple(tuple(shards[key]) for key in sorted(shards))


def write_shards(shard_plan: ShardPlan, open_file: Callable[[str], TensorSource], put: Callable[[Path], None],
                 work_dir: Path, done_with: Callable[[str], None] = lambda path: None) -> None:
    """Write each shard into ``work_dir`` and hand it to ``put`` (which publishes it; the local file is removed
    after), reading its tensors through ``open_file(committed path)``. ``done_with(path)`` hears when no later
    shard needs a committed file."""
    last_use = shard_plan.last_use()
    for index, shard in enumerate(shard_plan.shards):
        tensors = {ref.out: open_file(ref.file).get(ref.name) for ref in shard}
        local = work_dir / shard_plan.file_name(index)
        save_file(tensors, str(local), metadata={"format": "pt"})
        del tensors  # freed before the next shard is read
        put(local)
        local.unlink(missing_ok=True)
        for path in sorted(p for p, last in last_use.items() if last == index):
            done_with(path)


def write_index(shard_plan: ShardPlan, work_dir: Path) -> Path:
    """``model.safetensors.index.json`` in ``work_dir``."""
    path = work_dir / INDEX_NAME
    path.write_text(json.dumps(shard_plan.index(), indent=2) + "\n")
    return path
