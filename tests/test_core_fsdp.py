"""FSDP as the train job applies it (one FullyShardedDataParallel unit, original parameters kept), here on CPU
with gloo and two processes, without Ray: the loop trains like one process on both ranks' batches (gradient
clipping included), and a loop restored from a mid-run ``state_dict``, or from the sharded checkpoint the train job
writes (each rank its own half of the weights and optimizer state, as safetensors), ends where the uninterrupted
one does.
The Ray Train path is tests/test_pipeline.py's data-parallel test.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import corpus_blocks, make_config, tiny_model_dir

WORLD, STEPS, SAVE_AT, PER_RANK = 2, 6, 3, 2
TRAINING = {"learning_rate": 1e-2, "max_steps": STEPS, "max_grad_norm": 0.05, "save_steps": SAVE_AT,
            "logging_steps": 1, "warmup_steps": 1, "weight_decay": 0.1}  # clipping and decay both act


def fsdp_kwargs() -> dict:
    """What the pipeline hands Ray's prepare_model for FSDP, plus the CPU device for this test."""
    from segprop_ray.pipeline.train_job import FSDP_OPTIONS

    return {**FSDP_OPTIONS, "device_id": torch.device("cpu")}


def build_loop(model_dir: str, blocks: torch.Tensor, batch_ids: list[list[int]], wrap=None, checkpoint=None):
    """A SegmentLoop training the whole model (embedder, every layer, head) on the given batches."""
    from transformers import AutoConfig

    from segprop_ray.core.exits import IterationExit
    from segprop_ray.core.parts import ModelParts, SegmentSpec
    from segprop_ray.core.training import LoopHooks, SegmentLoop
    from segprop_ray.core.weights import SafetensorsSource

    cfg = make_config(model_dir, training=TRAINING)
    source = SafetensorsSource.from_model_dir(model_dir)
    parts = ModelParts(AutoConfig.from_pretrained(model_dir))
    segment = parts.segment(SegmentSpec([(i, source) for i in range(parts.num_layers)], source, source))
    segment.loss_chunk_tokens = 5  # several chunks, so FSDP meets the chunked loss's own gradients
    model = wrap(segment) if wrap else segment
    args = cfg.training

    def batches(epoch: int, skip: int):
        return iter([{"input_ids": blocks[ids]} for ids in batch_ids[skip:]])

    return SegmentLoop(model, args, batches, len(batch_ids), torch.device("cpu"),
                       IterationExit.from_config(cfg.exit.layer, args), LoopHooks(checkpoint=checkpoint))


def rank_batches(rank: int, world: int) -> list[list[int]]:
    """Rank ``rank``'s block ids per step: step s uses blocks s*W*B .. (s+1)*W*B, split by rank."""
    per_step = world * PER_RANK
    return [list(range(s * per_step + rank * PER_RANK, s * per_step + (rank + 1) * PER_RANK)) for s in range(STEPS)]


def fsdp_worker(rank: int, store: str, model_dir: str, blocks: torch.Tensor, out: str, kwargs: dict) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # stay on loopback whatever the host's interfaces
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)  # no port to race for
    torch.manual_seed(0)
    wrap = lambda module: FullyShardedDataParallel(module, **kwargs)  # noqa: E731
    from segprop_ray.core.sharded_state import load_sharded, save_sharded

    saved, sharded = {}, Path(out).parent / "sharded"

    def checkpoint(loop) -> None:
        saved.setdefault(loop.state.step, loop.state_dict())
        if loop.state.step == SAVE_AT:
            save_sharded(loop, sharded, rank)  # both ranks into one directory, as Ray Train merges them

    first = build_loop(model_dir, blocks, rank_batches(rank, WORLD), wrap, checkpoint=checkpoint)
    first.run()
    uninterrupted = first.state_dict()["model"]
    second = build_loop(model_dir, blocks, rank_batches(rank, WORLD), wrap)
    second.load_state_dict(saved[SAVE_AT])
    second.run()
    resumed = second.state_dict()["model"]
    third = build_loop(model_dir, blocks, rank_batches(rank, WORLD), wrap)
    load_sharded(third, sharded)
    third.run()
    from_shards = third.state_dict()["model"]
    if rank == 0:
        torch.save({"uninterrupted": {k: v.clone() for k, v in uninterrupted.items()},
                    "resumed": {k: v.clone() for k, v in resumed.items()},
                    "from_shards": {k: v.clone() for k, v in from_shards.items()},
                    "steps": [second.state.step, first.state.step, third.state.step]}, out)
    dist.destroy_process_group()


def test_fsdp_loop_equals_one_process_and_resumes_exactly(tmp_path: Path):
    model_dir = str(tiny_model_dir(tmp_path, "llama", 4))
    blocks = corpus_blocks(WORLD * PER_RANK * STEPS, 16)
    out = tmp_path / "fsdp.pt"
    mp.spawn(fsdp_worker, args=(str(tmp_path / "store"), model_dir, blocks, str(out), fsdp_kwargs()), nprocs=WORLD)
    result = torch.load(out)
    assert result["steps"] == [STEPS, STEPS, STEPS]

    reference = build_loop(model_dir, blocks, [sum(step, []) for step in zip(*(rank_batches(r, WORLD)
                                                                               for r in range(WORLD)))])
    reference.run()
    expected = reference.state_dict()["model"]
    assert set(result["uninterrupted"]) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(result["uninterrupted"][name], tensor, rtol=1e-4, atol=1e-6, msg=name)
        assert torch.equal(result["resumed"][name], result["uninterrupted"][name]), name
        assert torch.equal(result["from_shards"][name], result["uninterrupted"][name]), name

    # on disk: one safetensors file per rank, each holding half of the weights and of the optimizer's moments
    from safetensors import safe_open

    shards = sorted(p for p in (tmp_path / "sharded").glob("*.safetensors") if not p.name.startswith("loop-meta"))
    assert len(shards) == WORLD and not (tmp_path / "sharded" / ".metadata").exists()  # no pickled DCP metadata
    full_elements = sum(tensor.numel() for tensor in expected.values())
    for shard in shards:
        with safe_open(shard, framework="pt") as f:
            model_elements = sum(torch.Size(f.get_slice(k).get_shape()).numel() for k in f.keys()
                                 if k.startswith("model."))
            moments = [k for k in f.keys() if k.startswith("optimizer.") and k.endswith("exp_avg")]
        assert abs(model_elements - full_elements / WORLD) <= full_elements * 0.05, shard.name
        assert moments, shard.name
