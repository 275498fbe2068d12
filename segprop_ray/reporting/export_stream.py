"""Writing an exit as sharded safetensors, one shard in memory at a time, with HF's ``model.safetensors.index.json``.

The committed tensors are grouped into units by the module they belong to (the embeddings, each
decoder layer, the final norm with the head), and each unit goes through
:func:`segprop_ray.core.assemble.exit_state_dict` on its own: the naming (which layers are kept, LL
renumbered after the exit, what a tied head stores) keeps its one definition, and each call sees
only one unit's tensors. Each unit becomes one shard, written and handed on before the next is read,
so memory holds about one decoder layer or the embedding / head, never the model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from safetensors.torch import save_file

from segprop_ray.core.assemble import exit_state_dict
from segprop_ray.core.layout import ArchLayout
from segprop_ray.core.plan import SegPropPlan
from segprop_ray.core.weights import TensorSource

INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class Unit:
    """The committed tensors of one shard: ``(file, name)`` of each, the exit file's among them."""

    tensors: tuple[tuple[str, str], ...]
    nbytes: int


@dataclass
class ShardPlan:
    """The exported model's units, in order (embeddings, layers, head); fills its index as shards are written."""

    units: tuple[Unit, ...]
    exit_path: str
    """Run-relative path of the exit's LL + head file (the rest are committed layers and embeddings)."""
    weight_map: dict[str, str] = field(default_factory=dict)
    total_size: int = 0

    @property
    def largest(self) -> int:
        """Bytes of the largest unit: about what the export holds in memory at once."""
        return max((unit.nbytes for unit in self.units), default=0)

    def file_name(self, index: int) -> str:
        """HF's shard name: ``model-00001-of-00012.safetensors``."""
        return f"model-{index + 1:05d}-of-{len(self.units):05d}.safetensors"

    def index(self) -> dict:
        """The body of ``model.safetensors.index.json`` (after every shard is written)."""
        return {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}

    def last_use(self) -> dict[str, int]:
        """The last unit that reads each committed file (after it, the file's local copy can go)."""
        return {path: i for i, unit in enumerate(self.units) for path, _ in unit.tensors}


def plan_shards(arch: ArchLayout, sizes: Mapping[str, Mapping[str, int]], exit_path: str,
                head_with_embedding: bool = False) -> ShardPlan:
    """Units of the committed files ``sizes`` (run-relative path -> tensor name -> bytes; ``exit_path`` is the
    exit's file): the embeddings, each decoder layer (by its original index, which keeps model order), then the
    rest (final norm, head). ``head_with_embedding`` puts the head into the embeddings' unit: a tied exit's head
    is checked against the embedding (and not stored) within one ``exit_state_dict`` call."""
    embed = tuple(path + "." for path in arch.embed_paths())

    def unit_of(name: str) -> tuple[int, int]:
        if name.startswith(embed):
            return (0, 0)
        if name.startswith(arch.layers + "."):
            return (1, int(name[len(arch.layers) + 1:].split(".", 1)[0]))
        return (0, 0) if head_with_embedding else (2, 0)

    grouped: dict[tuple[int, int], list[tuple[str, str, int]]] = {}
    for path in sorted(sizes):
        for name, nbytes in sorted(sizes[path].items()):
            grouped.setdefault(unit_of(name), []).append((path, name, nbytes))
    units = tuple(Unit(tuple((p, n) for p, n, _ in grouped[key]), sum(b for _, _, b in grouped[key]))
                  for key in sorted(grouped))
    return ShardPlan(units, exit_path)


def write_shards(shard_plan: ShardPlan, plan: SegPropPlan, arch: ArchLayout, depth: int,
                 open_file: Callable[[str], TensorSource], put: Callable[[Path], None], work_dir: Path,
                 done_with: Callable[[str], None] = lambda path: None, **state_options: Any) -> None:
    """Write each unit's part of the exit at ``depth`` as a shard in ``work_dir`` and hand it to ``put`` (which
    publishes it; the local file is removed after), reading tensors through ``open_file(committed path)``.
    ``done_with(path)`` hears when no later unit needs a committed file; ``state_options`` are passed on to
    ``exit_state_dict``."""
    last_use = shard_plan.last_use()
    for index, unit in enumerate(shard_plan.units):
        committed = {name: open_file(path).get(name) for path, name in unit.tensors if path != shard_plan.exit_path}
        exits = {name: open_file(path).get(name) for path, name in unit.tensors if path == shard_plan.exit_path}
        state = exit_state_dict(plan, arch, depth, committed, exits, **state_options)
        del committed, exits
        local = work_dir / shard_plan.file_name(index)
        if state:
            save_file(state, str(local), metadata={"format": "pt"})
        shard_plan.weight_map.update({name: local.name for name in state})
        shard_plan.total_size += sum(tensor.nbytes for tensor in state.values())
        del state  # freed before the next unit is read
        if local.exists():
            put(local)
            local.unlink(missing_ok=True)
        for path in sorted(p for p, last in last_use.items() if last == index):
            done_with(path)
    _check_every_shard_written(shard_plan)


def _check_every_shard_written(shard_plan: ShardPlan) -> None:
    written = set(shard_plan.weight_map.values())
    missing = [shard_plan.file_name(i) for i in range(len(shard_plan.units)) if shard_plan.file_name(i) not in written]
    if missing:  # a unit whose tensors the exit does not keep: the shard count in the names would be wrong
        raise RuntimeError(f"the export kept no tensor of shard(s) {missing}: committed files hold tensors "
                           "the exit does not use")


def write_index(shard_plan: ShardPlan, work_dir: Path) -> Path:
    """``model.safetensors.index.json`` in ``work_dir``."""
    path = work_dir / INDEX_NAME
    path.write_text(json.dumps(shard_plan.index(), indent=2) + "\n")
    return path
