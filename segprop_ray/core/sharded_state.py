"""A segment loop's checkpoint sharded per rank with ``torch.distributed.checkpoint``, as safetensors (never pickle).

Every rank writes its own shard of the trainable weights and of the optimizer state: DCP's Hugging
Face storage writer with ``save_distributed``, one safetensors file per rank whose header carries each
shard's offsets (under FSDP a rank holds 1/world of every tensor; replicated tensors, as under DDP, are
written once, by one rank). Rank 0 adds the rest of the loop's state (the optimizer's parameter
groups, scheduler, counters, RNG, kept best weights) with :mod:`.state_io`. The files of all ranks go
to one directory (Ray Train merges the ranks' checkpoint directories), and a restoring rank reads only
the slices of its own shards from it. Nothing is gathered to one rank, so a checkpoint's cost per rank
falls with the world size.

A directory written by the full-state format of earlier versions (``loop.json``) is still restored.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)

from segprop_ray.core.state_io import load_state, save_state
from segprop_ray.core.training import load_trainable

if TYPE_CHECKING:
    from segprop_ray.core.training import SegmentLoop

SHARDED = StateDictOptions(full_state_dict=False, ignore_frozen_params=True, strict=False)
"""Each rank's own shards (FSDP: ShardedTensors of its flat-parameter slices; otherwise the local tensors) of the
trainable parameters (frozen ones are rebuilt from their sources: a LoRA segment's checkpoint holds its adapters)."""
META = "loop-meta"
"""Rank 0's files beside the shards: ``loop-meta.json`` + ``loop-meta.safetensors``."""
FULL_STATE = "loop"
"""The full-state format of earlier versions: ``loop.json`` + ``loop.safetensors``, one rank's gathered copy."""


def _local_parts(tensor: Any) -> list[torch.Tensor]:
    """The tensors this rank holds of a state-dict entry: a ShardedTensor's local shards, a DTensor's local part."""
    if hasattr(tensor, "local_shards"):
        return [shard.tensor for shard in tensor.local_shards()]
    if hasattr(tensor, "to_local"):
        return [tensor.to_local()]
    return [tensor] if isinstance(tensor, torch.Tensor) else []


def _storage_key(tensor: Any) -> Any:
    """What two state-dict entries share when they are one parameter under two names (tied embeddings): the memory
    of this rank's part of it (an entry holding no memory here is its own)."""
    parts = [part for part in _local_parts(tensor) if part.numel() > 0]
    if not parts:
        return id(tensor)
    memory = tuple((part.untyped_storage().data_ptr(), part.storage_offset(), tuple(part.shape)) for part in parts)
    return memory, tuple(tensor.shape), tensor.dtype


def tied_aliases(tensors: dict[str, Any]) -> dict[str, str]:
    """``{alias: name}`` for entries of ``tensors`` that are the same tensor as an earlier entry (a tied head's
    weight is the embedding's): safetensors stores each tensor once, so aliases are dropped and put back on load."""
    first: dict[Any, str] = {}
    aliases: dict[str, str] = {}
    for name, tensor in tensors.items():
        key = _storage_key(tensor)
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
    return aliases


def save_sharded(loop: SegmentLoop, directory: str | Path, rank: int) -> None:
    """Write this rank's shards of ``loop``'s weights and optimizer state into ``directory`` (rank 0: and the rest).

    Every rank must call it at the same step (the save plan is agreed over the process group, if any).
    """
    tensors, param_groups, aliases = _sharded_tensors(loop)
    dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(directory), save_distributed=True),
             no_dist=not dist.is_initialized())
    if rank == 0:
        world = dist.get_world_size() if dist.is_initialized() else 1
        save_state({**loop.meta_state_dict(), "param_groups": param_groups, "aliases": aliases, "world_size": world},
                   directory, META)


def _check_shard_files(directory: Path, world_size: int | None) -> None:
    """Refuse a directory holding shard files of a rank the checkpoint's world did not have (files left there by
    another attempt would otherwise be read as part of this checkpoint)."""
    if world_size is None:
        return
    # DCP numbers the ranks' files from 1: rank i writes shard-{i+1:05d}-model-...
    strays = sorted(f.name for f in directory.glob("shard-*.safetensors")
                    if not f.name.split("-")[1].isdigit() or not 1 <= int(f.name.split("-")[1]) <= world_size)
    if strays:
        raise ValueError(f"checkpoint {directory.name}: shard files {strays} are not of its {world_size} rank(s)")


def load_sharded(loop: SegmentLoop, directory: str | Path) -> None:
    """Restore ``loop`` from a directory :func:`save_sharded` wrote (every rank, the same directory)."""
    directory = Path(directory)
    if (directory / f"{FULL_STATE}.json").exists():
        loop.load_state_dict(load_state(directory, FULL_STATE))
        return
    meta = load_state(directory, META)
    _check_shard_files(directory, meta.pop("world_size", None))
    tensors, _, _ = _sharded_tensors(loop)  # the layout to read into: this rank's shards, optimizer state initialised
    dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(directory)), no_dist=not dist.is_initialized())
    model = tensors["model"]
    model.update({alias: model[name] for alias, name in meta.pop("aliases").items()})
    load_trainable(loop.model, model, options=SHARDED)
    optimizer = {"state": tensors["optimizer"], "param_groups": meta.pop("param_groups")}
    set_optimizer_state_dict(loop.model, loop.optimizer, optimizer, options=SHARDED)
    loop.load_meta_state_dict(meta)


def _sharded_tensors(loop: SegmentLoop) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, str]]:
    """``({"model": shards, "optimizer": per-parameter state shards}, param_groups, tied aliases)`` of this rank
    (the model's shards without the aliases)."""
    model = get_model_state_dict(loop.model, options=SHARDED)
    aliases = tied_aliases(model)
    model = {name: tensor for name, tensor in model.items() if name not in aliases}
    optimizer = get_optimizer_state_dict(loop.model, loop.optimizer, options=SHARDED)
    return {"model": model, "optimizer": optimizer["state"]}, optimizer["param_groups"], aliases
